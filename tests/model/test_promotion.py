"""The promotion gate: a model becomes the default only if it beats the champion on rows
neither was fitted on; an identical model is a tie that says so; a rejected model stays on disk
and in its report, never used silently."""

from __future__ import annotations

import importlib.util
import logging
import shutil
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pytest
import yaml
from conftest import REPO_ROOT, rewrite_hand_over, small_raw_frame, write_raw

from rtb import partitions
from rtb.config import ProjectPaths
from rtb.data.generate import generate_stream
from rtb.data.make_dataset import run_make_dataset, run_make_dataset_partition
from rtb.data.preprocessing import read_processed, run_preprocess
from rtb.dataset_config import load_dataset_config
from rtb.features import feature_frame
from rtb.models import registry
from rtb.models.make_training import TrainingWindow, run_training
from rtb.models.metrics import probability_metrics
from rtb.models.promotion import PROMOTION_MARK
from rtb.models.registry import load_champion_entry
from rtb.models.training_rows import time_holdout_split

CFG = load_dataset_config("rtb")
BASELINE_ONLY = ("logreg_onehot",)  # a weak recipe: on this data the target encodings win


@pytest.fixture
def paths(tmp_path) -> ProjectPaths:
    paths = ProjectPaths(tmp_path / "project")
    write_raw(small_raw_frame(1500, seed=3), paths.raw_dir / "training_data.csv.gz")
    run_make_dataset(paths, "train", CFG)
    run_preprocess(paths, "train", CFG)
    return paths


def _scramble_labels(paths: ProjectPaths) -> None:
    """Same rows, labels shuffled: whatever is learned from them is noise."""
    def scramble(frame: pd.DataFrame) -> pd.DataFrame:
        frame["install"] = np.random.default_rng(0).permutation(frame["install"].to_numpy())
        return frame

    rewrite_hand_over(paths, "train", scramble)


def _train(paths: ProjectPaths, **kwargs: object) -> dict:
    return yaml.safe_load(run_training(paths, CFG, cv_folds=3, seed=0, **kwargs).read_text())


def _as_is_holdout_log_loss(paths: ProjectPaths, report: dict) -> float:
    """What the old gate compared with: the shipped model of `report` scored on the latest 20%
    of the training file, rows it was refitted on."""
    model_path = paths.models_dir / report["artifacts"]["model"]
    model = registry.load_verified(registry.entry_from_report(paths, model_path))
    frame = read_processed(paths.processed_arrow("train"), CFG, require_target=True, with_id=False)
    holdout = time_holdout_split(frame[CFG.timestamp], 0.2)
    p = model.predict_proba(feature_frame(frame, CFG)[holdout])[:, 1]
    return probability_metrics(frame[CFG.target].to_numpy()[holdout], p)["log_loss"]


def _rest_client_outcome_marker() -> tuple[object, str]:
    """airflow/rest_client.py (loaded from its file: run.sh feeds it to the api-server's
    python) and the marker it looks for in the training task's log."""
    path = REPO_ROOT / "airflow" / "rest_client.py"
    spec = importlib.util.spec_from_file_location("rest_client", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.OUTCOME_LINES["train_pipeline"][1]


def test_retraining_on_the_same_data_is_a_tie_that_keeps_the_champion(paths, caplog) -> None:
    first = _train(paths)
    pointer_before = paths.champion_pointer.read_bytes()
    with caplog.at_level(logging.INFO, logger="rtb"):
        second = _train(paths)

    assert second["artifacts"]["model_sha256"] == first["artifacts"]["model_sha256"]
    decision = second["promotion"]
    assert decision["promoted"] is False and decision["tie"] is True
    assert decision["reason"].startswith("tie: ")
    assert f"champion {first['version']} kept" in decision["reason"]
    assert "byte-identical" in decision["reason"]
    assert decision["comparison"] == "champion_recipe_refitted"
    assert decision["champion"]["version"] == first["version"]
    assert decision["champion_holdout"] == second["holdout"]
    assert decision["uplift_vs_champion"]["uplift"] == 0.0
    assert paths.champion_pointer.read_bytes() == pointer_before
    # The line `sh run.sh train` prints is the one training logged.
    client, marker = _rest_client_outcome_marker()
    assert marker == PROMOTION_MARK
    line = client.outcome_line(caplog.text.splitlines(), marker)
    assert line is not None and line.startswith(f"{PROMOTION_MARK}NOT promoted")
    assert decision["reason"] in line


def test_better_recipe_on_overlapping_data_is_promoted(paths) -> None:
    weak = _train(paths, candidates=BASELINE_ONLY)  # refitted on every row, the holdout too

    report = _train(paths)

    decision = report["promotion"]
    assert report["model"] != "logreg_onehot"
    assert decision["promoted"] is True and decision["tie"] is False
    assert decision["comparison"] == "champion_recipe_refitted"
    assert decision["champion_recipe"]["candidate"] == "logreg_onehot"
    assert decision["champion_holdout"] == report["candidates"]["logreg_onehot"]["holdout"]
    assert decision["reason"].endswith(": better")
    assert decision["uplift_vs_champion"]["uplift"] > 0
    # Scored as it is, on rows it was refitted on, the weak champion would have won.
    assert _as_is_holdout_log_loss(paths, weak) < report["holdout"]["log_loss"]
    champion = load_champion_entry(paths)
    assert champion.version == report["version"] != weak["version"]
    assert yaml.safe_load(paths.champion_pointer.read_text())["previous"]["version"] == weak["version"]


def test_worse_recipe_is_kept_but_not_promoted(paths) -> None:
    first = _train(paths)
    champion_before = load_champion_entry(paths)
    pointer_before = paths.champion_pointer.read_bytes()

    second = _train(paths, candidates=BASELINE_ONLY)

    decision = second["promotion"]
    assert first["model"] not in second["candidates"]  # so the champion's recipe is refitted
    assert decision["promoted"] is False and decision["tie"] is False
    assert decision["reason"].endswith(": not better")
    assert decision["champion_recipe"]["candidate"] is None
    assert decision["champion_recipe"]["fitted"].startswith("refitted on 1200 rows")
    # The refit is the same procedure as the champion's own early fit in its run.
    assert decision["champion_holdout"]["log_loss"] == pytest.approx(first["holdout"]["log_loss"], rel=1e-9)
    assert decision["uplift_vs_champion"]["uplift"] < 0
    assert paths.champion_pointer.read_bytes() == pointer_before
    assert load_champion_entry(paths) == champion_before
    rejected = paths.models_dir / second["artifacts"]["model"]
    assert rejected.exists() and rejected != champion_before.path


def test_same_recipe_fitted_on_changed_data_is_a_tie_that_promotes(paths) -> None:
    """A tie only keeps the champion when nothing would change: here the training file was
    corrected (its labels), the recipe is the same, so the fit on the data as they are wins."""
    _scramble_labels(paths)
    noisy = _train(paths, candidates=BASELINE_ONLY)
    run_preprocess(paths, "train", CFG)  # the real labels again

    report = _train(paths, candidates=BASELINE_ONLY)

    decision = report["promotion"]
    assert decision["tie"] is True and decision["promoted"] is True
    assert decision["reason"].startswith("tie: ") and "promoted: " in decision["reason"]
    assert report["artifacts"]["input_sha256"] != noisy["artifacts"]["input_sha256"]
    assert load_champion_entry(paths).version == report["version"]


def test_report_compares_selected_model_with_the_baseline(paths) -> None:
    report = _train(paths)
    comparison = report["comparison"]
    assert comparison["baseline"] == "logreg_onehot"
    assert "logreg_onehot" in report["candidates"]
    selected = report["candidates"][report["model"]]["holdout"]["log_loss"]
    assert selected == min(c["holdout"]["log_loss"] for c in report["candidates"].values())
    ci = comparison["uplift_vs_baseline"]
    assert ci["ci95_low"] <= ci["uplift"] <= ci["ci95_high"]
    assert report["promotion"] == {"promoted": True, "tie": False, "comparison": None,
                                   "reason": "no champion yet"}


# --------------------------------------------------------------------------- over time
END = datetime(2026, 11, 30, tzinfo=UTC)
DAYS = [date(2026, 11, 26), date(2026, 11, 27), date(2026, 11, 28), date(2026, 11, 29)]
FIRST_WINDOW = TrainingWindow(END - timedelta(days=1), 3)  # 26th-28th, holdout the 28th
NEXT_WINDOW = TrainingWindow(END, 3)  # 27th-29th, holdout the 29th: a day the champion never saw


@pytest.fixture(scope="module")
def stream_template(tmp_path_factory: pytest.TempPathFactory) -> ProjectPaths:
    """Four labelled days of the synthetic stream, made and preprocessed."""
    paths = ProjectPaths(tmp_path_factory.mktemp("stream") / "project")
    generate_stream(paths.raw_dir, end=END, days=4, rows_per_day=12_000, shift_day=DAYS[0], seed=5)
    for day in DAYS:
        run_make_dataset_partition(paths, partitions.labelled_name(day), CFG)
        run_preprocess(paths, partitions.labelled_name(day), CFG)
    return paths


@pytest.fixture
def stream(stream_template: ProjectPaths, tmp_path) -> ProjectPaths:
    shutil.copytree(stream_template.root, tmp_path / "project")
    return ProjectPaths(tmp_path / "project")


def _scramble_days(paths: ProjectPaths, days: list[date]) -> None:
    """Shuffle the labels of those days' hand-overs, keeping their metadata (the raw input's
    sha256, which the report's window lists)."""
    for day in days:
        path = paths.processed_arrow(partitions.labelled_name(day))
        table = feather.read_table(path)
        column = table.schema.get_field_index(CFG.target)
        labels = np.random.default_rng(1).permutation(table.column(column).to_numpy())
        table = table.set_column(column, table.field(column), pa.array(labels, table.field(column).type))
        feather.write_feather(table, path, compression="uncompressed")


def _restore_labels(paths: ProjectPaths) -> None:
    for day in DAYS:
        run_preprocess(paths, partitions.labelled_name(day), CFG)


def test_a_champion_that_never_saw_the_new_day_is_judged_as_it_is(stream) -> None:
    """On a day neither model learnt from, a challenger fitted on noisy days loses to the
    champion as it is."""
    champion = _train(stream, window=FIRST_WINDOW)
    _scramble_days(stream, DAYS[1:3])  # the new window's early days: noise; its holdout: real

    decision = _train(stream, window=NEXT_WINDOW)["promotion"]

    assert decision["comparison"] == "champion_as_is"
    assert decision["champion_window_included_holdout"] is False
    assert decision["champion"]["version"] == champion["version"] and "champion_recipe" not in decision
    assert decision["promoted"] is False and decision["reason"].endswith(": not better")
    assert f"champion {champion['version']} as it is" in decision["reason"]
    assert decision["uplift_vs_champion"]["ci95_high"] < 0


def test_a_new_day_promotes_a_model_that_beats_the_champion_as_it_is(stream) -> None:
    _scramble_days(stream, DAYS[:3])
    noisy = _train(stream, window=FIRST_WINDOW, candidates=BASELINE_ONLY)
    _restore_labels(stream)

    decision = _train(stream, window=NEXT_WINDOW)["promotion"]

    assert decision["comparison"] == "champion_as_is" and decision["champion"]["version"] == noisy["version"]
    assert decision["promoted"] is True and decision["reason"].endswith(": better")
    assert decision["uplift_vs_champion"]["ci95_low"] > 0
