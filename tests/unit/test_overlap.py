"""prefetched and in_order: items in order, an error at its item, no thread left behind."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from rtb.overlap import in_order, prefetched


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


def _work_threads() -> int:
    return sum(thread.name.startswith("rtb-work") for thread in threading.enumerate())


def test_in_order_keeps_the_order_when_later_items_finish_first() -> None:
    def slow_for_small(item: int) -> int:
        time.sleep(0.002 * (20 - item % 20))  # item 0 of each run of 20 takes longest
        return item * item

    assert list(in_order(slow_for_small, range(60), threads=3, ahead=5)) == [i * i for i in range(60)]
    assert _work_threads() == 0


def test_in_order_raises_the_works_error_at_its_item_and_starts_no_more() -> None:
    started: list[int] = []

    def work(item: int) -> int:
        started.append(item)
        if item == 5:
            raise ValueError("bad item 5")
        return item

    seen = []
    with pytest.raises(ValueError, match="bad item 5"):
        for result in in_order(work, range(1000), threads=2, ahead=3):
            seen.append(result)
    assert seen == list(range(5))
    assert max(started) <= 5 + 3 + 2  # at most `ahead` queued and `threads` running past it
    assert _work_threads() == 0


def test_in_order_holds_at_most_ahead_items_in_flight() -> None:
    drawn: list[int] = []

    def items() -> Iterator[int]:
        for i in range(100):
            drawn.append(i)
            yield i

    results = in_order(lambda item: item, items(), threads=2, ahead=4)
    assert next(results) == 0
    assert len(drawn) == 5  # the first result is handed out once `ahead` more are queued
    results.close()
    assert _work_threads() == 0
