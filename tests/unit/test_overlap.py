"""prefetched: items in order, the producer's error at its item, no thread left behind."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from rtb.overlap import prefetched


def _counting(n: int, fail_at: int | None = None) -> Iterator[int]:
    for i in range(n):
        if i == fail_at:
            raise ValueError(f"bad item {i}")
        yield i


def _prefetch_threads() -> int:
    return sum(thread.name == "rtb-prefetch" for thread in threading.enumerate())


def test_items_come_in_order_and_the_thread_ends() -> None:
    assert list(prefetched(_counting(50), depth=3)) == list(range(50))
    assert _prefetch_threads() == 0


def test_the_producers_error_is_raised_after_the_items_before_it() -> None:
    seen = []
    with pytest.raises(ValueError, match="bad item 7"):
        for item in prefetched(_counting(50, fail_at=7)):
            seen.append(item)
    assert seen == list(range(7))
    assert _prefetch_threads() == 0


def test_a_consumer_that_stops_early_stops_the_producer() -> None:
    produced = []

    def endless() -> Iterator[int]:
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    stream = prefetched(endless(), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert _prefetch_threads() == 0
    assert len(produced) <= 3 + 2 + 1  # at most `depth` (and the one being put) ahead
