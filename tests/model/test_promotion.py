"""The promotion gate: a model becomes the default only if it beats the champion on the
latest data; a rejected model stays on disk and in its report, never used silently."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import rewrite_hand_over, small_raw_frame, write_raw

from rtb.config import ProjectPaths
from rtb.data.make_dataset import run_make_dataset
from rtb.data.preprocessing import run_preprocess
from rtb.dataset_config import load_dataset_config
from rtb.models.make_training import run_training
from rtb.models.registry import load_champion_entry

CFG = load_dataset_config("rtb")


@pytest.fixture
def paths(tmp_path) -> ProjectPaths:
    paths = ProjectPaths(tmp_path / "project")
    write_raw(small_raw_frame(1500, seed=3), paths.raw_dir / "training_data.csv.gz")
    run_make_dataset(paths, "train", CFG)
    run_preprocess(paths, "train", CFG)
    return paths


def _scramble_labels(paths: ProjectPaths, *, early_only: bool = False) -> None:
    """Same rows, labels shuffled: whatever is learned from them is noise. With `early_only`
    the latest 20% (the holdout) keeps its real labels, so a model fitted on the noisy early
    rows is judged on real data."""
    def scramble(frame: pd.DataFrame) -> pd.DataFrame:
        rows = np.arange(len(frame))
        if early_only:
            order = np.argsort(pd.to_datetime(frame["timestamp"]).to_numpy(), kind="stable")
            rows = order[: int(len(frame) * 0.8)]
        labels = frame["install"].to_numpy().copy()
        labels[rows] = np.random.default_rng(0).permutation(labels[rows])
        frame["install"] = labels
        return frame

    rewrite_hand_over(paths, "train", scramble)


def _report(paths: ProjectPaths, report_path) -> dict:
    return yaml.safe_load(report_path.read_text())


def test_worse_model_is_kept_but_not_promoted(paths) -> None:
    first = _report(paths, run_training(paths, CFG, cv_folds=3, seed=0))
    champion_before = load_champion_entry(paths)
    pointer_before = paths.champion_pointer.read_bytes()
    _scramble_labels(paths, early_only=True)

    second = _report(paths, run_training(paths, CFG, cv_folds=3, seed=0))

    assert first["promotion"]["promoted"] is True
    assert second["promotion"]["promoted"] is False
    assert "not better" in second["promotion"]["reason"]
    assert paths.champion_pointer.read_bytes() == pointer_before
    assert load_champion_entry(paths) == champion_before
    rejected = paths.models_dir / second["artifacts"]["model"]
    assert rejected.exists() and rejected != champion_before.path
    uplift = second["promotion"]["uplift_vs_champion"]
    assert uplift["uplift"] < 0 and uplift["ci95_low"] <= uplift["uplift"] <= uplift["ci95_high"]


def test_better_model_replaces_the_champion_and_remembers_it(paths) -> None:
    _scramble_labels(paths)
    run_training(paths, CFG, cv_folds=3, seed=0)
    weak = load_champion_entry(paths)
    run_preprocess(paths, "train", CFG)  # the real labels again

    report = _report(paths, run_training(paths, CFG, cv_folds=3, seed=0))

    assert report["promotion"]["promoted"] is True
    assert report["promotion"]["uplift_vs_champion"]["uplift"] > 0
    champion = load_champion_entry(paths)
    assert champion.version == report["version"] != weak.version
    pointer = yaml.safe_load(paths.champion_pointer.read_text())
    assert pointer["previous"]["version"] == weak.version


def test_report_compares_selected_model_with_the_baseline(paths) -> None:
    report = _report(paths, run_training(paths, CFG, cv_folds=3, seed=0))
    comparison = report["comparison"]
    assert comparison["baseline"] == "logreg_onehot"
    assert "logreg_onehot" in report["candidates"]
    selected = report["candidates"][report["model"]]["holdout"]["log_loss"]
    assert selected == min(c["holdout"]["log_loss"] for c in report["candidates"].values())
    ci = comparison["uplift_vs_baseline"]
    assert ci["ci95_low"] <= ci["uplift"] <= ci["ci95_high"]
