"""The whole chain on real data none of us generated: the public TalkingData click sample,
through its own dataset config (no id column, `attributed_time` dropped as a label leak)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import TALKINGDATA_SAMPLE

from rtb.models.metrics import probability_metrics

TEST_DAY = "2017-11-09"


@pytest.fixture(scope="module")
def talkingdata_labels(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """Split the sample by click_time: Nov 6-8 for training, Nov 9 (labels withheld) for test."""
    if not TALKINGDATA_SAMPLE.exists():
        pytest.fail(f"{TALKINGDATA_SAMPLE} is missing: the TalkingData sample ships with the tests")
    frame = pd.read_csv(TALKINGDATA_SAMPLE)
    root = tmp_path_factory.mktemp("talkingdata") / "project"
    raw = root / "data" / "raw"
    raw.mkdir(parents=True)
    train = frame[frame["click_time"] < TEST_DAY]
    test = frame[frame["click_time"] >= TEST_DAY]
    train.to_csv(raw / "training_data.csv.gz", index=False)
    test.drop(columns=["is_attributed", "attributed_time"]).to_csv(
        raw / "test_data.csv.gz", index=False
    )
    return root, test["is_attributed"].to_numpy()


def test_chain_runs_on_talkingdata_and_beats_the_base_rate(talkingdata_labels, run_cli) -> None:
    root, labels = talkingdata_labels
    common = ("--project-dir", str(root), "--dataset-config", "talkingdata")
    for args in (
        ("make-dataset", "--split", "train"),
        ("preprocess", "--split", "train"),
        ("train",),
        ("make-dataset", "--split", "test"),
        ("preprocess", "--split", "test"),
        ("predict",),
    ):
        result = run_cli(*args, *common)
        assert result.code == 0, (args, result.stderr)

    assert "dropping column(s) ['attributed_time']" in "".join(
        run_cli("make-dataset", "--split", "train", *common).log
    )
    report = yaml.safe_load(next((root / "reports").glob("report_*.yaml")).read_text())
    assert "attributed_time" not in report["data"]["features"]
    assert report["holdout"]["normalized_entropy"] < 1.0
    probabilities = np.load(next((root / "data" / "predictions").glob("predictions_*.npy")))
    assert probabilities.shape == labels.shape
    metrics = probability_metrics(labels, probabilities)
    assert metrics["normalized_entropy"] < 0.6  # constant base rate = 1.0, one-hot LR ~0.55-0.58
    assert metrics["roc_auc"] > 0.9
