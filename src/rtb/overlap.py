"""Run independent pieces of a CLI stage at the same time: the one place threads are started
to overlap I/O and compute.

Stage cores are synchronous functions from data to results. Where a stage's wrapper has
independent work (hash a file while it is parsed, load a model while the input is read,
cross-validate while the refitted model is written), it hands the pieces to `in_parallel`.
The heavy parts run in numpy, Arrow, zlib and sklearn kernels that release the GIL, so two
threads use both cores.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


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
