"""What one Airflow run has to do, decided from what is on disk: `rtb plan predict|train`.

A DAG cannot know, when it is parsed, whether the project holds hourly partitions or the
two single files, nor which days of a training window have their labels yet. The plan says
so once per run, as one JSON object whose argument lists the tasks pass on unchanged (the
DAG adds only the command name, `--run-id` and `--project-dir`):

- `mode`: "partitions" once `data/raw/requests` (predict) or `data/raw/labelled` (train)
  exists, else "files" (the single-file layout).
- `wait_for`: markers or files, relative to `data/raw`, a sensor waits for before any work.
- `units`: one per partition (or split) for `make-dataset` and `preprocess`, with its `args`.
- `predict_args` (one list per unit) and `monitor_args` for predict runs, `train_args` for
  train runs.

Predict runs cover the hours of their data interval. Train runs cover the moving window of
labelled days before the interval's end: the complete days, and the newest day (the one
whose labels arrive last), which the run waits for before processing any unit.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rtb import partitions
from rtb.config import ProjectPaths
from rtb.dataset_config import DatasetConfig
from rtb.errors import RtbError

PREDICT = "predict"
TRAIN = "train"
KINDS = (PREDICT, TRAIN)
PARTITIONS_MODE = "partitions"
FILES_MODE = "files"


def interval_args(start: datetime, end: datetime) -> list[str]:
    """The CLI arguments that hand a data interval on to `rtb predict` and `rtb monitor`."""
    return ["--interval-start", start.isoformat(), "--interval-end", end.isoformat()]


def plan_run(
    paths: ProjectPaths,
    cfg: DatasetConfig,
    kind: str,
    start: datetime,
    end: datetime,
    *,
    window_days: int,
) -> dict[str, Any]:
    """The work of one run over [start, end) as a JSON-ready dict (see the module docstring)."""
    if kind not in KINDS:
        raise RtbError(f"plan: expected {' or '.join(KINDS)}, got {kind!r}")
    start, end = partitions.utc_hour(start, name="--start"), partitions.utc_hour(end, name="--end")
    if end < start:
        raise RtbError(f"plan: --end {end.isoformat()} is before --start {start.isoformat()}")
    plan: dict[str, Any] = {
        "mode": FILES_MODE,
        "kind": kind,
        "interval": {"start": start.isoformat(), "end": end.isoformat()},
        "window_days": None,
    }
    if kind == PREDICT:
        plan.update(_predict(paths, cfg, start, end))
    else:
        plan.update(_train(paths, cfg, end, window_days))
    return plan


def _predict(paths: ProjectPaths, cfg: DatasetConfig, start: datetime, end: datetime) -> dict[str, Any]:
    if not (paths.raw_dir / partitions.REQUESTS).is_dir():
        return {
            "wait_for": [cfg.files["test"]],
            "units": [{"name": "test", "args": ["--split", "test"]}],
            "predict_args": [[]],
            "monitor_args": ["--split", "test"],
            "publish_args": [],
        }
    names = [partitions.request_name(hour)
             for hour in partitions.hours_between(start, end)]
    return {
        "mode": PARTITIONS_MODE,
        "wait_for": [f"{name}/{partitions.SUCCESS}" for name in names],
        "units": [{"name": name, "args": ["--partition", name]} for name in names],
        "predict_args": [["--partition", name, *interval_args(start, end)] for name in names],
        "monitor_args": interval_args(start, end),
        "publish_args": interval_args(start, end),
    }


def _train(paths: ProjectPaths, cfg: DatasetConfig, end: datetime, window_days: int) -> dict[str, Any]:
    if not (paths.raw_dir / partitions.LABELLED).is_dir():
        return {
            "wait_for": [cfg.files["train"]],
            "units": [{"name": "train", "args": ["--split", "train"]}],
            "train_args": [],
        }
    if window_days < 1:
        raise RtbError(f"plan: --window-days must be >= 1, got {window_days}")
    names = [partitions.labelled_name(day) for day in partitions.window_days(end, window_days)]
    # The newest day is a unit whether complete yet or not: the run waits for its marker
    # before any unit is processed (and is skipped if it never comes).
    complete = [name for name in names[:-1] if partitions.is_complete(paths.raw_partition(name))]
    complete.append(names[-1])
    return {
        "mode": PARTITIONS_MODE,
        "window_days": window_days,
        "wait_for": [f"{names[-1]}/{partitions.SUCCESS}"],
        "units": [{"name": name, "args": ["--partition", name]} for name in complete],
        "train_args": ["--window-end", end.isoformat(), "--window-days", str(window_days)],
    }
