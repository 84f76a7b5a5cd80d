"""The pipeline over time, through the real CLI: plans of Airflow runs, partitions made, scored,
trained on a moving window, monitored for drift and realised quality, and swept by retention.

One synthetic stream (`generate_stream`: five labelled days, the planted campaign shift on the
last one) is written once; each test works on its own copy of a project built from it.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest

from rtb import partitions
from rtb.config import ProjectPaths
from rtb.data.generate import StreamSummary, generate_stream
from rtb.data.make_dataset import run_make_dataset_partition
from rtb.data.preprocessing import run_preprocess
from rtb.dataset_config import load_dataset_config
from rtb.io_utils import read_yaml, sha256_file
from rtb.models.make_predicting import run_predicting_partition
from rtb.models.make_training import TrainingWindow, run_training
from rtb.models.registry import load_champion_entry

CFG = load_dataset_config("rtb")
END = datetime(2026, 11, 30, tzinfo=UTC)
SHIFT_DAY = date(2026, 11, 29)
TRAINED_DAYS = [date(2026, 11, 25), date(2026, 11, 26), date(2026, 11, 27)]
QUIET_HOUR = datetime(2026, 11, 28, 12, tzinfo=UTC)  # after the window, before the shift
SHIFT_HOUR = datetime(2026, 11, 29, 12, tzinfo=UTC)
HOUR = timedelta(hours=1)


def _labelled(day: date) -> str:
    return partitions.labelled_name(day)


def _copy(source: ProjectPaths, target: Path) -> ProjectPaths:
    shutil.copytree(source.root, target, symlinks=True)
    return ProjectPaths(target)


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def _raw_rows(partition: Path) -> int:
    total = 0
    for path in partitions.partition_files(partition):
        with gzip.open(path, "rt") as handle:
            total += sum(1 for _ in handle) - 1
    return total


def _make(paths: ProjectPaths, name: str) -> None:
    run_make_dataset_partition(paths, name, CFG)
    run_preprocess(paths, name, CFG)


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> tuple[ProjectPaths, StreamSummary]:
    """A project holding only the raw stream."""
    paths = ProjectPaths(tmp_path_factory.mktemp("stream") / "project")
    summary = generate_stream(paths.raw_dir, end=END, days=5, rows_per_day=20_000,
                              shift_day=SHIFT_DAY, seed=3)
    return paths, summary


@pytest.fixture(scope="module")
def prepared(
    stream: tuple[ProjectPaths, StreamSummary], tmp_path_factory: pytest.TempPathFactory
) -> ProjectPaths:
    """The stream with the training window's labelled days made and preprocessed."""
    paths = _copy(stream[0], tmp_path_factory.mktemp("prepared") / "project")
    for day in TRAINED_DAYS:
        _make(paths, _labelled(day))
    return paths


@pytest.fixture(scope="module")
def trained(prepared: ProjectPaths, tmp_path_factory: pytest.TempPathFactory) -> ProjectPaths:
    """`prepared` with a champion trained on its window (the days before the quiet day)."""
    paths = _copy(prepared, tmp_path_factory.mktemp("trained") / "project")
    run_training(paths, CFG, cv_folds=2, seed=0, window=TrainingWindow(END - 2 * timedelta(days=1), 3))
    return paths


def _serve(run_cli: Callable, paths: ProjectPaths, hour: datetime) -> str:
    """make-dataset, preprocess and predict one request hour through the CLI."""
    name = partitions.request_name(hour)
    project = ["--project-dir", str(paths.root)]
    assert run_cli("make-dataset", "--partition", name, *project).code == 0
    assert run_cli("preprocess", "--partition", name, *project).code == 0
    interval = ["--interval-start", hour.isoformat(), "--interval-end", (hour + HOUR).isoformat()]
    result = run_cli("predict", "--partition", name, *interval, "--run-id", "run-1", *project)
    assert result.code == 0, result.stderr
    return name


def _monitor(run_cli: Callable, paths: ProjectPaths, hour: datetime) -> dict:
    result = run_cli("monitor", "--interval-start", hour.isoformat(), "--interval-end",
                     (hour + HOUR).isoformat(), "--run-id", "run-1", "--project-dir", str(paths.root))
    assert result.code == 0, result.stderr
    return _last_json(result.stdout)


# --------------------------------------------------------------------------- plan
def test_plan_predict_lists_the_hours_of_the_interval(
    run_cli: Callable, stream: tuple[ProjectPaths, StreamSummary]
) -> None:
    paths, _ = stream
    result = run_cli("plan", "predict", "--start", "2026-11-29T21:00:00+00:00", "--end",
                     "2026-11-29T23:00:00+00:00", "--project-dir", str(paths.root))
    assert result.code == 0, result.stderr
    plan = _last_json(result.stdout)
    names = ["requests/date=2026-11-29/hour=21", "requests/date=2026-11-29/hour=22"]
    interval = ["--interval-start", "2026-11-29T21:00:00+00:00",
                "--interval-end", "2026-11-29T23:00:00+00:00"]
    assert plan == {
        "mode": "partitions",
        "kind": "predict",
        "interval": {"start": "2026-11-29T21:00:00+00:00", "end": "2026-11-29T23:00:00+00:00"},
        "window_days": None,
        "wait_for": [f"{name}/_SUCCESS" for name in names],
        "units": [{"name": name, "args": ["--partition", name]} for name in names],
        "predict_args": [["--partition", name, *interval] for name in names],
        "monitor_args": interval,
        "publish_args": interval,
    }
    assert all((paths.raw_dir / marker).is_file() for marker in plan["wait_for"])


def test_plan_predict_without_request_partitions_is_files_mode(
    run_cli: Callable, project: ProjectPaths
) -> None:
    result = run_cli("plan", "predict", "--start", "2026-11-29T21:00:00+00:00", "--end",
                     "2026-11-29T22:00:00+00:00", "--project-dir", str(project.root))
    assert result.code == 0, result.stderr
    plan = _last_json(result.stdout)
    assert plan["mode"] == "files"
    assert plan["wait_for"] == [CFG.files["test"]]
    assert plan["units"] == [{"name": "test", "args": ["--split", "test"]}]
    assert plan["predict_args"] == [[]] and plan["monitor_args"] == ["--split", "test"]
    assert plan["publish_args"] == []


def test_plan_train_units_are_the_complete_days_and_the_awaited_newest_one(
    run_cli: Callable, stream: tuple[ProjectPaths, StreamSummary], tmp_path: Path
) -> None:
    paths = _copy(stream[0], tmp_path / "project")
    for day in (date(2026, 11, 27), SHIFT_DAY):  # still being copied
        (paths.raw_partition(_labelled(day)) / partitions.SUCCESS).unlink()
    result = run_cli("plan", "train", "--start", "2026-11-29T00:00:00+00:00", "--end",
                     "2026-11-30T00:00:00+00:00", "--window-days", "4", "--project-dir", str(paths.root))
    assert result.code == 0, result.stderr
    plan = _last_json(result.stdout)
    assert plan["mode"] == "partitions" and plan["window_days"] == 4
    # The incomplete older day is left out; the newest is a unit, processed once its marker
    # (which the run waits for) is there.
    assert [unit["name"] for unit in plan["units"]] == [
        *(_labelled(date(2026, 11, d)) for d in (26, 28)), _labelled(SHIFT_DAY)
    ]
    assert plan["wait_for"] == [f"{_labelled(SHIFT_DAY)}/_SUCCESS"]
    assert plan["train_args"] == ["--window-end", "2026-11-30T00:00:00+00:00", "--window-days", "4"]
    assert "predict_args" not in plan


# --------------------------------------------------------------------------- one partition
def test_a_partition_is_made_scored_and_replaced_as_one_set(
    run_cli: Callable, trained: ProjectPaths, tmp_path: Path
) -> None:
    paths = _copy(trained, tmp_path / "project")
    name = _serve(run_cli, paths, QUIET_HOUR)
    prediction_set = paths.prediction_set(name)
    first = os.readlink(prediction_set)
    probabilities = pd.read_csv(prediction_set / "predictions.csv")
    assert len(probabilities) == _raw_rows(paths.raw_partition(name))
    sidecar = read_yaml(prediction_set / "predictions.yaml")
    assert sidecar["run_id"] == "run-1" and sidecar["interval"]["start"] == QUIET_HOUR.isoformat()

    _serve(run_cli, paths, QUIET_HOUR)
    assert prediction_set.is_symlink() and os.readlink(prediction_set) != first
    hidden = [p.name for p in prediction_set.parent.iterdir() if p.name.startswith(".hour=12.")]
    assert hidden == [os.readlink(prediction_set)]  # the old set is gone
    assert not (prediction_set.parent / first).exists()


def test_an_incomplete_partition_is_refused_and_nothing_is_written(
    run_cli: Callable, stream: tuple[ProjectPaths, StreamSummary], tmp_path: Path
) -> None:
    paths = _copy(stream[0], tmp_path / "project")
    name = partitions.request_name(QUIET_HOUR)
    (paths.raw_partition(name) / partitions.SUCCESS).unlink()
    result = run_cli("make-dataset", "--partition", name, "--project-dir", str(paths.root))
    assert result.code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rtb: error: ") and name in lines[0]
    assert not paths.interim(name).exists() and not paths.interim_dir.exists()
    both = run_cli("make-dataset", "--partition", name, "--split", "test", "--project-dir", str(paths.root))
    assert both.code == 1 and "--partition" in both.stderr


# --------------------------------------------------------------------------- training window
def test_training_on_a_window_records_its_partitions_and_holds_out_the_latest_day(
    run_cli: Callable, prepared: ProjectPaths, tmp_path: Path
) -> None:
    paths = _copy(prepared, tmp_path / "project")
    result = run_cli("train", "--window-end", "2026-11-28T00:00:00+00:00", "--window-days", "4", "--cv-folds",
                     "2", "--trigger-reason", "drift: campaignId", "--project-dir", str(paths.root))
    assert result.code == 0, result.stderr
    assert "1 of 4 days have no processed hand-over" in result.log
    champion = load_champion_entry(paths)
    report = read_yaml(paths.report(champion.version))
    window = report["window"]
    assert [p["name"] for p in window["partitions"]] == [_labelled(day) for day in TRAINED_DAYS]
    assert window["missing"] == [_labelled(date(2026, 11, 24))]
    for entry in window["partitions"]:
        files = partitions.partition_files(paths.raw_partition(entry["name"]))
        assert entry["files"] == {f.name: sha256_file(f) for f in files}
        assert entry["sha256"] == sha256_file(files[0])  # one file per generated partition
        assert entry["rows"] == _raw_rows(paths.raw_partition(entry["name"]))
    assert report["data"]["rows"] == sum(p["rows"] for p in window["partitions"])
    assert pd.Timestamp(report["data"]["holdout_starts"]) >= pd.Timestamp("2026-11-27", tz="UTC")
    assert report["data"]["holdout_rows"] == window["partitions"][-1]["rows"]
    assert report["trigger"] == {"reason": "drift: campaignId"}
    profile = read_yaml(paths.profile(champion.version))
    assert profile["score"] and "campaignId" in profile["categorical"]


def test_training_on_a_window_with_one_day_is_refused(
    run_cli: Callable, prepared: ProjectPaths, tmp_path: Path
) -> None:
    paths = _copy(prepared, tmp_path / "project")
    result = run_cli("train", "--window-end", "2026-11-26T00:00:00+00:00", "--window-days", "3",
                     "--project-dir", str(paths.root))
    assert result.code == 1
    assert result.stderr.count("\n") == 1 and "2026-11-23 to 2026-11-25" in result.stderr


# --------------------------------------------------------------------------- monitoring
def test_monitor_asks_for_a_retrain_on_the_shift_once_per_champion(
    run_cli: Callable, trained: ProjectPaths, tmp_path: Path
) -> None:
    paths = _copy(trained, tmp_path / "project")
    champion = load_champion_entry(paths).version
    quiet = _serve(run_cli, paths, QUIET_HOUR)
    decision = _monitor(run_cli, paths, QUIET_HOUR)
    assert decision == {"retrain": False, "reasons": [], "champion": champion}
    report = read_yaml(paths.drift_report(quiet))
    assert report["champion"] == champion and report["run_id"] == "run-1"
    assert "hour" not in report["drift"]["psi"] and "score_psi" in report["drift"]

    _serve(run_cli, paths, SHIFT_HOUR)
    decision = _monitor(run_cli, paths, SHIFT_HOUR)
    assert decision["retrain"] is True and decision["champion"] == champion
    assert any("campaignId" in reason for reason in decision["reasons"]), decision
    assert paths.retrain_request(champion).is_file()

    _serve(run_cli, paths, SHIFT_HOUR + HOUR)
    again = _monitor(run_cli, paths, SHIFT_HOUR + HOUR)
    assert again["retrain"] is False and again["reasons"], again  # still drifted, not asked twice


def test_realised_quality_of_a_day_whose_hours_were_served(
    run_cli: Callable, trained: ProjectPaths, tmp_path: Path
) -> None:
    paths = _copy(trained, tmp_path / "project")
    day = QUIET_HOUR.date()
    start = datetime(day.year, day.month, day.day, tzinfo=UTC)
    hours = partitions.hours_between(start, start + timedelta(days=1))
    for hour in hours[:-1]:
        name = partitions.request_name(hour)
        _make(paths, name)
        run_predicting_partition(paths, CFG, name, model_path=None)
    assert _monitor(run_cli, paths, hours[-2])["champion"]
    assert not paths.quality_report(day).exists()  # one hour not served yet
    _serve(run_cli, paths, hours[-1])
    _monitor(run_cli, paths, hours[-1])
    quality = read_yaml(paths.quality_report(day))
    labelled_rows = _raw_rows(paths.raw_partition(_labelled(day)))
    assert quality["matched_rows"] == quality["labelled_rows"] == labelled_rows
    assert 0 < quality["quality"]["positives"] < labelled_rows
    assert quality["quality"]["calibration_ratio"] > 0 and quality["summary"].startswith("quality: ")
    assert not paths.quality_report(SHIFT_DAY).exists()


# --------------------------------------------------------------------------- retention
def test_retention_removes_only_old_partitions_and_their_copies(
    run_cli: Callable, prepared: ProjectPaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _copy(prepared, tmp_path / "project")
    monkeypatch.setenv("RTB_TRAIN_WINDOW_DAYS", "2")
    keep_record = paths.reports_dir / "drift" / "requests" / "date=2026-11-25" / "hour=00.yaml"
    keep_record.parent.mkdir(parents=True)
    keep_record.write_text("kept: true\n")
    old = time.time() - 2 * 3600
    for root in (paths.raw_dir, paths.interim_dir, paths.processed_dir):
        for path in root.rglob("*"):
            os.utime(path, (old, old), follow_symlinks=False)
    recent = paths.raw_partition(partitions.request_name(datetime(2026, 11, 26, 7, tzinfo=UTC)))
    os.utime(recent / partitions.SUCCESS)  # touched just now: maybe still being copied
    project = ["--project-dir", str(paths.root)]

    refused = run_cli("retention", "--now", "2026-11-30T06:00:00+00:00", "--max-age-days", "2", *project)
    assert refused.code == 1 and refused.stderr.count("\n") == 1 and "training window" in refused.stderr

    result = run_cli("retention", "--now", "2026-11-30T06:00:00+00:00", "--max-age-days", "3", *project)
    assert result.code == 0, result.stderr
    for day in (date(2026, 11, 25), date(2026, 11, 26)):
        assert not paths.raw_partition(_labelled(day)).exists()
        assert not any(p.exists() for p in paths.partition_copies(_labelled(day)))
    assert not (paths.raw_dir / "requests" / "date=2026-11-25").exists()
    assert sorted(p.name for p in (paths.raw_dir / "requests" / "date=2026-11-26").iterdir()) == ["hour=07"]
    assert paths.raw_partition(_labelled(date(2026, 11, 27))).is_dir()
    assert all(p.exists() for p in paths.partition_copies(_labelled(date(2026, 11, 27))))
    assert len(list((paths.raw_dir / "requests").glob("date=2026-11-2[789]/hour=*"))) == 72
    assert keep_record.exists()

    again = run_cli("retention", "--now", "2026-11-30T06:00:00+00:00", "--max-age-days", "3", *project)
    assert again.code == 0 and "0 raw partition(s) and 0 interim/processed copies" in again.log


def test_the_gate_says_whether_the_champion_saw_the_holdout_day(
    run_cli: Callable, trained: ProjectPaths, tmp_path: Path
) -> None:
    paths = _copy(trained, tmp_path / "project")
    _make(paths, _labelled(QUIET_HOUR.date()))
    result = run_cli("train", "--window-end", "2026-11-29T00:00:00+00:00", "--window-days", "3",
                     "--cv-folds", "2", "--project-dir", str(paths.root))
    assert result.code == 0, result.stderr
    newest = max(paths.reports_dir.glob("report_*.yaml"), key=lambda p: p.name)
    decision = read_yaml(newest)["promotion"]
    assert decision["holdout_partition"] == _labelled(QUIET_HOUR.date())
    assert decision["champion_window_included_holdout"] is False
    assert "did not include labelled/date=2026-11-28" in decision["note"]
    assert "champion_holdout" in decision
