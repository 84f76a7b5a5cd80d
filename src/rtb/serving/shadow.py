"""The shadow log: champion and challenger scores of the same requests, for `rtb uplift`.

Requests never wait for the disk: the handler puts one record per request on a bounded
queue and a writer thread appends rows to a CSV file. When the queue is full (the disk is
slower than the traffic) the record is dropped and counted in `rtb_shadow_dropped_rows`,
never blocking a request. A file being written is named `*.csv.part`; it becomes `*.csv`
(one rename, after an fsync) when it reaches `max_bytes`, when its UTC hour ends, or when
the service stops, so a reader of `*.csv` never sees a half-written file. Every process
writes its own files (the pid is in the name), so workers never interleave lines.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

log = logging.getLogger(__name__)

COLUMNS = ["logged_at", "id", "champion", "champion_p", "challenger", "challenger_p"]
PART = ".part"
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_QUEUE = 10_000
FLUSH_SECONDS = 1.0


@dataclass(frozen=True)
class ShadowRecord:
    """One request scored by both models: its ids and both probabilities, in row order."""

    logged_at: float
    ids: Sequence[object]
    champion: str
    champion_p: Sequence[float]
    challenger: str
    challenger_p: Sequence[float]


def shadow_dir(reports_dir: Path) -> Path:
    return reports_dir / "shadow"


class ShadowLog:
    """A bounded queue and the thread that turns its records into rotating CSV files."""

    def __init__(self, folder: Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 queue_size: int = DEFAULT_QUEUE,
                 on_written: Callable[[int], None] = lambda rows: None,
                 on_dropped: Callable[[int], None] = lambda rows: None) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.on_written, self.on_dropped = on_written, on_dropped
        self._queue: queue.Queue[ShadowRecord | None] = queue.Queue(maxsize=queue_size)
        self._thread: threading.Thread | None = None
        self._handle = None
        self._writer = None
        self._part: Path | None = None
        self._hour = ""
        self._sequence = 0

    def put(self, record: ShadowRecord) -> None:
        """Queue a record for writing; drop (and count) it when the queue is full."""
        if self._thread is None:
            self._start()
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.on_dropped(len(record.ids))

    def close(self) -> None:
        """Write what is queued, then publish the open file under its final name."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shadow-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last_flush = time.monotonic()
        while True:
            try:
                record = self._queue.get(timeout=FLUSH_SECONDS)
            except queue.Empty:
                record = False
            if record is None:
                break
            if record:
                try:
                    self._write(record)
                    self.on_written(len(record.ids))
                except OSError as exc:
                    log.error("shadow log %s: write failed (%s); dropping the record",
                              self._part, exc.strerror or exc)
                    self.on_dropped(len(record.ids))
                    self._abandon()
            if self._handle is not None and time.monotonic() - last_flush >= FLUSH_SECONDS:
                self._handle.flush()
                last_flush = time.monotonic()
            if self._handle is not None and self._hour != _hour(time.time()):
                self._publish()  # the hour ended while the service was idle
        self._publish()

    def _write(self, record: ShadowRecord) -> None:
        hour = _hour(record.logged_at)
        if self._handle is not None and (hour != self._hour or self._handle.tell() >= self.max_bytes):
            self._publish()
        if self._handle is None:
            self._open(hour)
        stamp = datetime.fromtimestamp(record.logged_at, UTC).isoformat(timespec="milliseconds")
        for request_id, old, new in zip(record.ids, record.champion_p, record.challenger_p,
                                        strict=True):
            self._writer.writerow([stamp, "" if request_id is None else request_id,
                                   record.champion, repr(old), record.challenger, repr(new)])

    def _open(self, hour: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._sequence += 1
        self._hour = hour
        self._part = self.folder / f"shadow_{hour}_{os.getpid()}_{self._sequence:04d}.csv{PART}"
        self._handle = open(self._part, "w", newline="")  # noqa: SIM115 - kept open on purpose
        self._writer = csv.writer(self._handle)
        self._writer.writerow(COLUMNS)

    def _publish(self) -> None:
        if self._handle is None or self._part is None:
            return
        try:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            os.replace(self._part, self._part.with_name(self._part.name.removesuffix(PART)))
        except OSError as exc:
            log.error("shadow log %s: could not publish (%s)", self._part, exc.strerror or exc)
        self._handle = self._writer = self._part = None

    def _abandon(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()
        self._handle = self._writer = None


def _hour(moment: float) -> str:
    return time.strftime("%Y%m%dT%H", time.gmtime(moment))
