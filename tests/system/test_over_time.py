"""The pipeline over time, through the real stack: each run works on its own data interval.

After the single-file tests, a partitioned stream (hourly request partitions, daily labelled
ones, a planted shift on its last day) is written into the stack's data/raw, which switches
both DAGs to partition mode. Then, through the REST API as a user would: a backfill of three
hours, a re-run of one of them, an hour whose partition is missing and one that is
half-copied, a training run on the moving window with retention, and the drift watch
triggering (or not) a retraining. The stack runs with short sensor waits (conftest).
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from .conftest import RUN_TIMEOUT

pytestmark = pytest.mark.system

DAYS = 3
ROWS_PER_DAY = 20000  # ~800 requests an hour: enough for drift statistics to mean something


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _hour_name(hour: datetime) -> str:
    return f"requests/date={hour.date().isoformat()}/hour={hour.hour:02d}"


def _rows(raw_partition: Path) -> int:
    return sum(
        sum(1 for _ in gzip.open(path, "rt")) - 1 for path in sorted(raw_partition.glob("*.csv.gz"))
    )


class Stream:
    """What was written: the stream ends at `end` (exclusive), its last day `shift_day` is the
    planted shift, and the two complete days before it are the training window."""

    def __init__(self, root: Path, end: datetime) -> None:
        self.root, self.end = root, end
        self.raw = root / "data" / "raw"
        self.shift_day = end.date()
        self.window = [end.date() - timedelta(days=2), end.date() - timedelta(days=1)]

    def hour(self, day_offset: int, hour: int) -> datetime:
        """An hour of the stream: day_offset 0 is the shift day, -1 the day before."""
        day = self.shift_day + timedelta(days=day_offset)
        return datetime(day.year, day.month, day.day, hour, tzinfo=UTC)

    def prediction_sets(self) -> dict[str, Path]:
        folder = self.root / "data" / "predictions" / "requests"
        return {str(p.relative_to(self.root / "data" / "predictions")): p
                for p in sorted(folder.glob("date=*/hour=*"))}


@pytest.fixture(scope="module")
def stream(stack, api, predicted_run) -> Stream:
    """The partitioned stream, written after the single-file runs (they need files mode)."""
    api.wait_until_idle("train_pipeline")
    api.wait_until_idle("predict_pipeline")
    now = datetime.now(UTC)
    # The stream ends at 12:00 of a past day, so every hour used below is in the past.
    day = now.date() if now.hour >= 14 else now.date() - timedelta(days=1)
    end = datetime(day.year, day.month, day.day, 12, tzinfo=UTC)
    written = Stream(stack.root, end)
    subprocess.run(
        [sys.executable, "-m", "rtb.cli", "generate", "--stream", "--out", str(written.raw),
         "--days", str(DAYS), "--rows-per-day", str(ROWS_PER_DAY), "--end", _iso(end),
         "--shift-day", written.shift_day.isoformat()],
        check=True, capture_output=True, text=True, timeout=300,
    )
    return written


def _trigger_hour(api, hour: datetime) -> str:
    """A predict_pipeline run for `hour`: a run triggered with a logical date covers the
    schedule period that ended last by then (a backfill's runs start at theirs). One minute
    past the boundary: logical dates are unique, and the scheduler may have one there."""
    return api.trigger_interval("predict_pipeline", _iso(hour + timedelta(hours=1, minutes=1)))


def _wait_for_runs(api, dag_id: str, run_ids: list[str]) -> dict[str, str]:
    return {run_id: api.wait_for_run(dag_id, run_id, RUN_TIMEOUT) for run_id in run_ids}


@pytest.fixture(scope="module")
def backfilled(api, stream) -> dict:
    """A backfill of three past hours of the shift day's morning: one run per hour."""
    first, last = stream.hour(0, 1), stream.hour(0, 3)
    started = time.monotonic()
    api.backfill("predict_pipeline", _iso(first), _iso(last), max_active_runs=3)
    deadline = time.monotonic() + RUN_TIMEOUT
    while True:
        runs = [r for r in api.runs("predict_pipeline") if r["run_type"] == "backfill"]
        if len(runs) == 3 and all(r["state"] in ("success", "failed") for r in runs):
            break
        assert time.monotonic() < deadline, runs
        time.sleep(3)
    seconds = time.monotonic() - started
    print(f"\nbackfill of 3 hours: {seconds:.0f} s")
    return {"runs": runs, "hours": [first + timedelta(hours=i) for i in range(3)], "seconds": seconds}


def test_a_backfill_scores_each_hour_exactly_once(stream, backfilled) -> None:
    assert [r["state"] for r in backfilled["runs"]] == ["success"] * 3
    sets = stream.prediction_sets()
    assert sorted(sets) == [_hour_name(hour) for hour in backfilled["hours"]]
    for hour in backfilled["hours"]:
        name = _hour_name(hour)
        sidecar = yaml.safe_load((sets[name] / "predictions.yaml").read_text())
        assert sidecar["rows"] == _rows(stream.raw / name) > 0
        assert sidecar["partition"] == name
        assert sidecar["interval"]["start"].startswith(hour.strftime("%Y-%m-%dT%H:00:00"))
        assert sidecar["run_id"] in {r["dag_run_id"] for r in backfilled["runs"]}


def test_rerunning_an_interval_replaces_its_one_set_and_nothing_else(api, stream, backfilled) -> None:
    sets = stream.prediction_sets()
    target, others = _hour_name(backfilled["hours"][1]), [_hour_name(h) for h in backfilled["hours"][::2]]
    before = {name: os.readlink(sets[name]) for name in sets}
    untouched = {name: (sets[name] / "predictions.npy").read_bytes() for name in others}
    (run,) = [r for r in backfilled["runs"] if r["logical_date"].startswith(
        backfilled["hours"][1].strftime("%Y-%m-%dT%H"))]
    api.clear_run("predict_pipeline", run["dag_run_id"])
    time.sleep(5)
    assert api.wait_for_run("predict_pipeline", run["dag_run_id"], RUN_TIMEOUT) == "success"

    after = stream.prediction_sets()
    assert sorted(after) == sorted(sets), "one set per interval, never a duplicate"
    assert os.readlink(after[target]) != before[target], "the set was replaced"
    assert not (after[target].parent / before[target]).exists(), "the old set is gone"
    for name in others:
        assert os.readlink(after[name]) == before[name]
        assert (after[name] / "predictions.npy").read_bytes() == untouched[name]


@pytest.fixture(scope="module")
def skipped_runs(api, stream, backfilled) -> dict[str, str]:
    """An hour with no partition at all, and one whose files are there but not its marker."""
    missing, half = stream.end, stream.end + timedelta(hours=1)
    half_copied = stream.raw / _hour_name(half)
    half_copied.mkdir(parents=True)
    source = next((stream.raw / _hour_name(backfilled["hours"][0])).glob("*.csv.gz"))
    (half_copied / source.name).write_bytes(source.read_bytes())
    runs = {
        "missing": _trigger_hour(api, missing),
        "half": _trigger_hour(api, half),
    }
    states = _wait_for_runs(api, "predict_pipeline", list(runs.values()))
    return {kind: (run_id, states[run_id], hour) for (kind, run_id), hour in
            zip(runs.items(), (missing, half), strict=True)}


@pytest.mark.parametrize("kind", ["missing", "half"])
def test_an_hour_without_a_complete_partition_is_skipped_and_writes_nothing(
    api, stream, skipped_runs, kind
) -> None:
    run_id, state, hour = skipped_runs[kind]
    assert state == "success", "a missing partition is not a red failure"
    tis = api.task_instances("predict_pipeline", run_id)
    assert tis["wait_for_requests"]["state"] == "skipped"
    for task_id in ("make_dataset", "preprocessing", "predicting", "monitor", "trigger_training"):
        assert tis[task_id]["state"] == "skipped", (task_id, tis[task_id]["state"])
    log = api.task_log("predict_pipeline", run_id, "wait_for_requests", 1)
    assert "rtb: skipped:" in log and f"{_hour_name(hour)}/_SUCCESS" in log, log[-3000:]
    name = _hour_name(hour)
    assert name not in stream.prediction_sets()
    assert not (stream.root / "data" / "interim" / f"{name}.arrow").exists()


@pytest.fixture(scope="module")
def window_run(api, stream, skipped_runs) -> dict:
    """train_pipeline for the interval ending on the shift day: the two days before it. An
    old partition, past the stack's 5-day retention, is there to be removed."""
    old_day = stream.shift_day - timedelta(days=12)
    old = [stream.raw / f"requests/date={old_day.isoformat()}/hour=00",
           stream.raw / f"labelled/date={old_day.isoformat()}"]
    for folder in old:
        folder.mkdir(parents=True)
        source = next((stream.raw / _hour_name(stream.hour(0, 1))).glob("*.csv.gz"))
        (folder / source.name).write_bytes(source.read_bytes())
        (folder / "_SUCCESS").touch()
        past = time.time() - 3 * 86400
        os.utime(folder / source.name, (past, past))
        os.utime(folder / "_SUCCESS", (past, past))
        os.utime(folder, (past, past))
    day = stream.shift_day
    # Its interval is the day ending at 06:00 of the shift day: the window is the two days
    # before the shift day.
    logical = datetime(day.year, day.month, day.day, 6, 1, tzinfo=UTC)  # see _trigger_hour
    run_id = api.trigger_interval("train_pipeline", _iso(logical))
    state = api.wait_for_run("train_pipeline", run_id, RUN_TIMEOUT)
    reports = sorted((stream.root / "reports").glob("report_*.yaml"), key=lambda p: p.stat().st_mtime)
    return {"state": state, "run_id": run_id, "report": yaml.safe_load(reports[-1].read_text()),
            "old": old}


def test_training_uses_exactly_the_moving_window(stream, window_run) -> None:
    from rtb.io_utils import sha256_file

    assert window_run["state"] == "success"
    window = window_run["report"]["window"]
    names = [p["name"] for p in window["partitions"]]
    assert names == [f"labelled/date={day.isoformat()}" for day in stream.window]
    for partition in window["partitions"]:
        (raw,) = sorted((stream.raw / partition["name"]).glob("*.csv.gz"))
        assert partition["files"] == {raw.name: sha256_file(raw)}
        assert partition["rows"] == _rows(stream.raw / partition["name"])
    assert window_run["report"]["data"]["holdout_starts"].startswith(stream.window[-1].isoformat())


def test_retention_removes_only_partitions_past_the_age(stream, window_run) -> None:
    for folder in window_run["old"]:
        assert not folder.exists(), folder
    for day in stream.window:
        assert (stream.raw / f"labelled/date={day.isoformat()}" / "_SUCCESS").is_file()
    assert (stream.raw / _hour_name(stream.hour(0, 1)) / "_SUCCESS").is_file()


def test_drift_triggers_a_training_and_no_drift_does_not(api, stream, window_run) -> None:
    def train_runs() -> set[str]:
        return {r["dag_run_id"] for r in api.runs("train_pipeline")}

    # The backfill's hours are on the shift day too: their monitor may already have asked to
    # retrain the champion of that time (once per champion). Start from a clean slate.
    for record in (stream.root / "reports" / "drift").glob("retrain_requested_*.yaml"):
        record.unlink()
    api.wait_until_idle("train_pipeline")
    before = train_runs()
    calm = _trigger_hour(api, stream.hour(-1, 20))
    assert api.wait_for_run("predict_pipeline", calm, RUN_TIMEOUT) == "success"
    calm_tis = api.task_instances("predict_pipeline", calm)
    assert calm_tis["monitor"]["state"] == "success"
    assert calm_tis["trigger_training"]["state"] == "skipped"
    assert train_runs() == before

    drifted = _trigger_hour(api, stream.hour(0, 0))
    assert api.wait_for_run("predict_pipeline", drifted, RUN_TIMEOUT) == "success"
    assert api.task_instances("predict_pipeline", drifted)["trigger_training"]["state"] == "success"
    report = yaml.safe_load(
        (stream.root / "reports" / "drift" / f"{_hour_name(stream.hour(0, 0))}.yaml").read_text()
    )
    assert "campaignId" in str(report)
    (triggered,) = train_runs() - before
    run = api.request("GET", f"/api/v2/dags/train_pipeline/dagRuns/{api.quote(triggered)}")
    assert "campaignId" in run["conf"]["reason"]
    api.wait_until_idle("train_pipeline")
