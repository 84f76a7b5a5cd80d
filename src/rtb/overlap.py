"""Run independent pieces of a CLI stage at the same time: the one place threads are started
to overlap I/O and compute.

Stage cores are synchronous functions from data to results. Where a stage's wrapper has
independent work (hash a file while it is parsed, load a model while the input is read,
cross-validate while the refitted model is written), it hands the pieces to `in_parallel`;
where a stream of batches is parsed and then checked and written, `prefetched` parses the
next batch while the current one is handled; where every item of a stream needs the same
costly step (format a batch as CSV text), `in_order` runs it on several items at once.
The heavy parts run in numpy, Arrow, zlib and sklearn kernels that release the GIL, so two
threads use both cores.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")
_DONE = object()


def in_parallel(*calls: Callable[[], Any]) -> tuple[Any, ...]:
    """Run every call at once; their results in the order given.

    All calls run to the end before anything is raised, so no work is left running in the
    background; then the exception of the earliest failing call (in argument order) is
    raised, which keeps error messages deterministic when several calls fail on one bad
    input.
    """
    if len(calls) == 1:
        return (calls[0](),)
    with ThreadPoolExecutor(max_workers=len(calls), thread_name_prefix="rtb") as pool:
        futures = [pool.submit(call) for call in calls]
        for future in futures:
            future.exception()  # wait for every call, raising nothing yet
    return tuple(future.result() for future in futures)


def prefetched(items: Iterable[T], depth: int = 1) -> Iterator[T]:
    """The items of `items`, produced on another thread up to `depth` ahead of the consumer.

    An exception of the producer is raised here, at the item where it happened. When the
    consumer stops early (an error while handling a batch, or `close()`), the producer is told
    to stop and is waited for, so no thread outlives the stage's read.
    """
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            put((_DONE, exc))
            return
        put((_DONE, None))

    producer = threading.Thread(target=produce, name="rtb-prefetch", daemon=True)
    producer.start()
    try:
        while True:
            item, error = handoff.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        producer.join()


def in_order(work: Callable[[T], R], items: Iterable[T], *, threads: int = 2,
             ahead: int = 4) -> Iterator[R]:
    """`work(item)` for every item, run on `threads` threads with at most `ahead` items in
    flight; the results in the order of the items.

    For kernels that release the GIL (Arrow's CSV formatting, numpy), so the items of one
    stream use every core while memory stays bounded by `ahead` results. The items are drawn
    on the consumer's thread. When the consumer stops early or `work` raises, the items not
    yet started are cancelled and the running ones waited for, so no thread outlives it.
    """
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rtb-work")
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(work, item))
            while len(pending) > ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
