"""Progress of long stages: a log line per step with elapsed seconds, plus a bar on a terminal.

Airflow task logs are not terminals, so there the log lines alone tell how far a stage got;
someone running `rtb train` by hand also sees a bar that fills step by step.
"""

from __future__ import annotations

import logging
import sys
import time

BAR_WIDTH = 24


class Progress:
    """Counts the steps of one stage; `advance` after each."""

    def __init__(self, log: logging.Logger, label: str, total: int) -> None:
        self.log = log
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.started = time.perf_counter()
        self.interactive = sys.stderr.isatty()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def advance(self, what: str) -> None:
        self.done = min(self.done + 1, self.total)
        self.log.info("%s: step %d/%d done: %s (%.1f s elapsed)", self.label, self.done,
                      self.total, what, self.elapsed)
        if self.interactive:
            filled = round(BAR_WIDTH * self.done / self.total)
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            sys.stderr.write(f"{self.label} [{bar}] {self.done}/{self.total} {self.elapsed:5.1f} s\n")
            sys.stderr.flush()
