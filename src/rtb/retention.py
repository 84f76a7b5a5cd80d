"""`rtb retention`: delete user-level rows once they are older than the retention period.

Raw partitions (both kinds) whose UTC day is older than `now - max_age_days`, and their
interim and processed copies, are removed. Never touched: a partition inside the training
window (an age shorter than the window plus a day is refused), a partition or copy modified
within the last hour (it may still be being copied or written), and anything under `models/`
or `reports/` (the pipeline's record). A partition is removed copies first and its
`_SUCCESS` marker before its data, so an interrupted sweep leaves either an incomplete raw
partition (never read) or nothing; running again finishes the job.
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from datetime import date, datetime, timedelta
from pathlib import Path

from rtb import partitions
from rtb.config import ProjectPaths
from rtb.errors import RtbError

log = logging.getLogger(__name__)

RECENT_SECONDS = 3600
_DAY_PREFIX = re.compile(rf"^{partitions.DATE_KEY}=(\d{{4}}-\d\d-\d\d)")


def old_days(paths: ProjectPaths, cutoff: date) -> dict[str, list[date]]:
    """Per kind, the days before `cutoff` that have a raw partition or a derived copy."""
    found: dict[str, set[date]] = {kind: set() for kind in partitions.KINDS}
    for kind in partitions.KINDS:
        for base in (paths.raw_dir, paths.interim_dir, paths.processed_dir):
            folder = base / kind
            if not folder.is_dir():
                continue
            for entry in folder.iterdir():
                match = _DAY_PREFIX.match(entry.name)
                if match:
                    try:
                        day = date.fromisoformat(match.group(1))
                    except ValueError:
                        continue
                    if day < cutoff:
                        found[kind].add(day)
    return {kind: sorted(days) for kind, days in found.items()}


def partition_names(kind: str, day: date) -> list[str]:
    """Every partition name of `kind` a day can have (24 hours for requests)."""
    if kind == partitions.LABELLED:
        return [partitions.labelled_name(day)]
    start = partitions.parse_hour(f"{day.isoformat()}T00:00")
    return [partitions.request_name(h) for h in partitions.hours_between(start, start + timedelta(days=1))]


def _latest_change(paths: list[Path]) -> float:
    latest = 0.0
    for path in paths:
        try:
            items = [path, *path.rglob("*")] if path.is_dir() else [path]
            latest = max([latest, *(p.lstat().st_mtime for p in items)])
        except FileNotFoundError:
            continue
    return latest


def run_retention(
    paths: ProjectPaths, *, now: datetime, max_age_days: int, window_days: int
) -> dict[str, int]:
    """CLI stage: remove the old partitions and copies; counts of what was removed and kept."""
    started = time.perf_counter()
    if max_age_days < window_days + 1:
        raise RtbError(f"--max-age-days {max_age_days} is shorter than the training window "
                       f"({window_days} days) plus one day; refusing to delete training data")
    cutoff = now.date() - timedelta(days=max_age_days)
    window_start = now.date() - timedelta(days=window_days)
    wall = time.time()
    counts = {"partitions": 0, "copies": 0, "recent_kept": 0}
    removed: list[str] = []
    for kind, days in old_days(paths, cutoff).items():
        for day in days:
            if day >= window_start:  # unreachable given the age check; a second lock on the door
                continue
            for name in partition_names(kind, day):
                raw = paths.raw_partition(name)
                copies = [p for p in paths.partition_copies(name) if p.exists()]
                if not raw.exists() and not copies:
                    continue
                if wall - _latest_change([raw, *copies]) < RECENT_SECONDS:
                    counts["recent_kept"] += 1
                    log.warning("%s: modified within the last hour; kept (run retention again later)", name)
                    continue
                for copy in copies:
                    copy.unlink(missing_ok=True)
                counts["copies"] += len(copies)
                if raw.exists():
                    (raw / partitions.SUCCESS).unlink(missing_ok=True)
                    shutil.rmtree(raw)
                    counts["partitions"] += 1
                removed.append(name)
            for base in (paths.raw_dir, paths.interim_dir, paths.processed_dir):
                _remove_if_empty(base / kind / f"{partitions.DATE_KEY}={day.isoformat()}")
    if removed:
        log.info("retention: removed %s", ", ".join(_ranges(removed)))
    log.info("retention: %d raw partition(s) and %d interim/processed copies older than %s "
             "(%d days before %s) removed, %d recently modified kept; %.1f s", counts["partitions"],
             counts["copies"], cutoff, max_age_days, now.isoformat(), counts["recent_kept"],
             time.perf_counter() - started)
    return counts


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _ranges(names: list[str]) -> list[str]:
    """Names grouped by kind and day, e.g. "requests/date=2026-10-01 (24 hours)"."""
    groups: dict[str, int] = {}
    for name in names:
        key = "/".join(name.split("/")[:2])
        groups[key] = groups.get(key, 0) + 1
    return [key if key.startswith(partitions.LABELLED) else f"{key} ({n} hour{'s' * (n != 1)})"
            for key, n in groups.items()]
