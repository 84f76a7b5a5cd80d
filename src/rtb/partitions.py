"""The one definition of the partitioned raw-log layout that runs over time.

Once the pipeline runs per data interval, raw logs arrive as partitions instead of two files::

    data/raw/requests/date=YYYY-MM-DD/hour=HH/*.csv.gz    requests to score (no `install`)
    data/raw/labelled/date=YYYY-MM-DD/*.csv.gz            the same day's requests with `install`

Every file keeps the format of today's single files (`;`-separated gzip CSV with a header, the
dataset config's columns). Choices, and why:

- Hive-style `key=value` folder names are what Spark, Hive, Athena and BigQuery external tables
  expect for partition pruning, so the same folders can be queried in place.
- Dates and hours are UTC: an hour partition holds the requests whose timestamp is in that
  hour, and Airflow's data intervals are UTC hours and days, so a task argument maps onto
  exactly one partition.
- A partition is complete only once its `_SUCCESS` marker exists. That is Hadoop's convention
  for a finished output (Spark, Hive and distcp write it last), so a folder still being copied,
  or left behind by a writer that died, is never read by mistake.
- Data files are the partition's `*.csv.gz`; names starting with `_` or `.` (markers,
  temporary files) are never data, as in Hadoop's input formats.

Layout only: paths, names and checks, stdlib and pathlib only, so that readers, the generator,
retention and Airflow task arguments all share it without importing anything heavy.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

from rtb.errors import RtbError

REQUESTS = "requests"
LABELLED = "labelled"
KINDS = (REQUESTS, LABELLED)
SUCCESS = "_SUCCESS"
DATA_SUFFIX = ".csv.gz"
DATE_KEY = "date"
HOUR_KEY = "hour"

_DATE_DIR = re.compile(rf"^{DATE_KEY}=(\d{{4}}-\d\d-\d\d)$")
_HOUR_DIR = re.compile(rf"^{HOUR_KEY}=(\d\d)$")
_HOUR = timedelta(hours=1)
_DAY = timedelta(days=1)


class PartitionKey(NamedTuple):
    """What a partition folder holds: its kind, its UTC day and, for requests, its UTC hour."""

    kind: str
    day: date
    hour: datetime | None  # the hour's start (aware, UTC) for request partitions, else None


def utc_hour(moment: datetime, *, name: str = "hour") -> datetime:
    """`moment` as an aware UTC datetime, which must be exactly on an hour boundary.

    Naive datetimes are refused rather than guessed: a local-time hour would silently name
    another partition. Aware ones in other zones (Airflow's pendulum datetimes) are converted.
    """
    if not isinstance(moment, datetime):
        raise RtbError(f"{name}: expected a datetime, got {moment!r}")
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise RtbError(f"{name}: expected a timezone-aware UTC datetime, got naive {moment.isoformat()}")
    moment = moment.astimezone(UTC)
    if (moment.minute, moment.second, moment.microsecond) != (0, 0, 0):
        raise RtbError(f"{name}: expected a UTC hour boundary (HH:00:00), got {moment.isoformat()}")
    return moment


def floor_hour(moment: datetime) -> datetime:
    """The UTC start of the hour holding `moment` (aware; naive is refused, see `utc_hour`)."""
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise RtbError(f"expected a timezone-aware datetime, got naive {moment.isoformat()}")
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def request_partition(raw_dir: Path, hour: datetime) -> Path:
    """`raw_dir/requests/date=YYYY-MM-DD/hour=HH`: the requests whose timestamp is in `hour`."""
    hour = utc_hour(hour)
    return Path(raw_dir) / REQUESTS / f"{DATE_KEY}={hour.date().isoformat()}" / f"{HOUR_KEY}={hour.hour:02d}"


def labelled_partition(raw_dir: Path, day: date) -> Path:
    """`raw_dir/labelled/date=YYYY-MM-DD`: the UTC day's requests with their `install` label.

    Labels are known only after the attribution window, so they arrive per day, later than the
    day's request partitions.
    """
    if isinstance(day, datetime) or not isinstance(day, date):
        raise RtbError(f"day: expected a date, got {day!r}")
    return Path(raw_dir) / LABELLED / f"{DATE_KEY}={day.isoformat()}"


def parse_partition(path: Path) -> PartitionKey:
    """Kind, day and hour of a partition folder (the inverse of the two builders above).

    Only the last folder names matter, so absolute, relative and `s3://`-like prefixes work.
    """
    parts = Path(path).parts
    expected = (
        f"expected .../{REQUESTS}/{DATE_KEY}=YYYY-MM-DD/{HOUR_KEY}=HH or .../{LABELLED}/{DATE_KEY}=YYYY-MM-DD"
    )
    if len(parts) >= 3 and parts[-3] == REQUESTS:
        day_match, hour_match = _DATE_DIR.match(parts[-2]), _HOUR_DIR.match(parts[-1])
        if day_match and hour_match:
            day = _parse_day(day_match.group(1), path, expected)
            hour_of_day = int(hour_match.group(1))
            if hour_of_day > 23:
                raise RtbError(f"{path}: hour {hour_of_day} is not 00-23; {expected}")
            start = datetime(day.year, day.month, day.day, hour_of_day, tzinfo=UTC)
            return PartitionKey(REQUESTS, day, start)
    if len(parts) >= 2 and parts[-2] == LABELLED:
        day_match = _DATE_DIR.match(parts[-1])
        if day_match:
            return PartitionKey(LABELLED, _parse_day(day_match.group(1), path, expected), None)
    raise RtbError(f"{path}: not a partition folder; {expected}")


def request_name(hour: datetime) -> str:
    """A request partition's name: its path relative to the raw folder, e.g.
    `requests/date=2025-06-10/hour=13`, which stages, artifacts and task arguments use."""
    return request_partition(Path(), hour).as_posix()


def labelled_name(day: date) -> str:
    """A labelled partition's name, e.g. `labelled/date=2025-06-10` (see `request_name`)."""
    return labelled_partition(Path(), day).as_posix()


def partition_name(key: PartitionKey) -> str:
    """The name of the partition `key` describes (see `request_name`)."""
    return request_name(key.hour) if key.kind == REQUESTS and key.hour is not None else labelled_name(key.day)


def parse_partition_name(text: str, *, name: str = "--partition") -> PartitionKey:
    """A partition named relative to the raw folder, exactly as `partition_name` spells it.

    Stricter than `parse_partition`: an absolute path, `..` or any prefix would name files
    outside the project's layout (and derived artifacts would land elsewhere too).
    """
    key = parse_partition(Path(text))
    if partition_name(key) != text:
        raise RtbError(
            f"{name}: expected a partition relative to data/raw such as {partition_name(key)!r}, got {text!r}"
        )
    return key


def _parse_day(text: str, path: Path, expected: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise RtbError(f"{path}: {text!r} is not a calendar date; {expected}") from None


def is_complete(partition: Path) -> bool:
    """True once the partition's `_SUCCESS` marker exists (its writer has finished)."""
    return (Path(partition) / SUCCESS).is_file()


def partition_files(partition: Path) -> list[Path]:
    """The sorted `*.csv.gz` data files of a complete partition.

    An incomplete partition is an error, never an empty result: reading a half-copied hour
    would score or train on part of it without anyone noticing. A complete partition may hold
    no file (an hour without traffic); markers and temporary files are never returned.
    """
    partition = Path(partition)
    if not partition.is_dir():
        raise RtbError(f"{partition}: partition folder not found")
    if not is_complete(partition):
        raise RtbError(f"{partition}: no {SUCCESS} marker: partition is incomplete (still being copied?)")
    return sorted(
        p
        for p in partition.iterdir()
        if p.name.endswith(DATA_SUFFIX) and not p.name.startswith(("_", ".")) and p.is_file()
    )


def hours_between(start: datetime, end: datetime) -> list[datetime]:
    """UTC hour starts in [start, end): the request partitions of a data interval.

    Half-open like Airflow's data intervals, so consecutive intervals never share an hour.
    """
    start, end = utc_hour(start, name="start"), utc_hour(end, name="end")
    count = max(0, int((end - start) / _HOUR))
    return [start + i * _HOUR for i in range(count)]


def days_between(start: date, end: date) -> list[date]:
    """Days in [start, end): the labelled partitions of a training window."""
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, datetime) or not isinstance(value, date):
            raise RtbError(f"{name}: expected a date, got {value!r}")
    return [start + i * _DAY for i in range(max(0, (end - start).days))]


def window_days(end: datetime, days: int) -> list[date]:
    """The labelled days of a training window: the `days` UTC days before `end`'s UTC date
    (a train run's data-interval end), so a run never trains on the day it ends in."""
    last = end.astimezone(UTC).date()
    return days_between(last - timedelta(days=days), last)


def parse_hour(text: str, *, name: str = "hour") -> datetime:
    """An hour boundary from task or CLI text (`2025-06-10T13:00:00+00:00`, `2025-06-10T13`).

    Text without an offset means UTC, the only zone partitions are named in; Airflow's
    `{{ data_interval_start }}` renders with `+00:00` anyway.
    """
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise RtbError(f"{name}: expected an ISO date-time such as 2025-06-10T13:00Z, got {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return utc_hour(moment, name=name)


def parse_day(text: str, *, name: str = "day") -> date:
    """A UTC day from task or CLI text (`2025-06-10`)."""
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise RtbError(f"{name}: expected a date YYYY-MM-DD, got {text!r}") from None
