"""The evaluation worlds of bench/worlds.py and the multi-world benchmark built on them: every
world must be a valid raw RTB log with true probabilities at its planted base rate, and the
benchmark's figures must put the true probabilities at 100% and the base rate at 0%."""

from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import REPO_ROOT

from rtb.config import ProjectPaths
from rtb.data.make_dataset import run_make_dataset
from rtb.data.preprocessing import read_processed, run_preprocess
from rtb.dataset_config import load_dataset_config
from rtb.models.pipeline import CANDIDATES

sys.path.insert(0, str(REPO_ROOT / "bench"))
import multi_world  # noqa: E402
from worlds import WORLDS, draw_world, write_raw  # noqa: E402

CFG = load_dataset_config("rtb")


@pytest.mark.parametrize("name", list(WORLDS))
def test_world_passes_make_dataset_and_preprocess(name: str, tmp_path) -> None:
    data = draw_world(WORLDS[name], 6_000, 1_500, seed=3)
    paths = ProjectPaths(tmp_path)
    write_raw(data, paths.raw_dir)
    for split, rows in (("train", 6_000), ("test", 1_500 * WORLDS[name].test_days)):
        run_make_dataset(paths, split, CFG)
        run_preprocess(paths, split, CFG)
        frame = read_processed(paths.processed_arrow(split), CFG, require_target=split == "train")
        assert len(frame) == rows
        assert (CFG.target in frame.columns) == (split == "train")
        assert frame["fromLastStart"].dropna().ge(0).all()
    assert frame["timestamp"].min() > pd.Timestamp(data.train["timestamp"].max(), tz="UTC")


@pytest.mark.parametrize("name", list(WORLDS))
def test_true_probabilities_hit_the_planted_base_rate(name: str) -> None:
    spec = WORLDS[name]
    data = draw_world(spec, 200_000, 20_000, seed=5)
    for p in (data.p_train, data.p_test):
        assert np.all((p > 0) & (p < 1))
    assert data.p_train.mean() == pytest.approx(spec.base_rate, rel=1e-6)
    # Labels are drawn from the true p: their rate is within 5 binomial standard errors.
    error = np.sqrt(spec.base_rate * (1 - spec.base_rate) / len(data.p_train))
    assert abs(data.train["install"].mean() - spec.base_rate) < 5 * error
    assert sorted(np.unique(data.test_day)) == list(range(1, spec.test_days + 1))


def test_worlds_are_deterministic_and_differ_by_seed() -> None:
    spec = WORLDS["interacting"]
    first, again, other = (draw_world(spec, 3_000, 500, seed=s) for s in (1, 1, 2))
    pd.testing.assert_frame_equal(first.train, again.train)
    np.testing.assert_array_equal(first.p_test, again.p_test)
    assert not np.array_equal(first.p_train, other.p_train)


def test_drifting_world_drifts_and_brings_unseen_ids() -> None:
    spec = WORLDS["drifting"]
    data = draw_world(spec, 100_000, 20_000, seed=1)
    # The base rate climbs by `base_drift` log-odds a day, so the test days sit above training.
    assert data.p_test.mean() > 1.1 * spec.base_rate
    unseen = ~data.test["campaignId"].isin(set(data.train["campaignId"]))
    assert unseen.mean() >= 0.8 * spec.unseen_share


def test_day_quality_puts_true_p_at_one_and_base_rate_at_zero() -> None:
    rng = np.random.default_rng(0)
    p_true = rng.beta(0.5, 40, 50_000)
    y = (rng.random(len(p_true)) < p_true).astype(float)
    truth = multi_world.day_quality(y, p_true, p_true)
    constant = multi_world.day_quality(y, np.full_like(p_true, y.mean()), p_true)
    assert truth["share_of_gain"] == pytest.approx(1.0)
    assert truth["share_of_gain_expected"] == pytest.approx(1.0)
    assert constant["share_of_gain"] == pytest.approx(0.0, abs=1e-12)
    assert constant["normalized_entropy"] == pytest.approx(1.0)
    halfway = multi_world.day_quality(y, 0.5 * p_true + 0.5 * p_true.mean(), p_true)
    assert 0.0 < halfway["share_of_gain_expected"] < 1.0


def test_tiny_multi_world_run_reports_consistent_figures(tmp_path) -> None:
    out = tmp_path / "result.json"
    assert multi_world.main(["--sizes", "20000", "--worlds", "additive", "--test-rows-per-day",
                             "10000", "--no-talkingdata", "--out", str(out),
                             "--work", str(tmp_path / "work")]) == 0
    results = json.loads(out.read_text())
    (run,) = results["runs"]
    predictors = run["predictors"]
    assert run["selected"] in predictors and run["train_rows"] == 20_000
    assert predictors["true p"]["share_of_gain"] == pytest.approx(1.0)
    assert predictors["true p"]["calibration_per_day"] == pytest.approx([1.0, 1.0])
    assert predictors["constant base rate"]["share_of_gain"] == pytest.approx(0.0, abs=1e-12)
    assert predictors["constant base rate"]["normalized_entropy"] == pytest.approx(1.0)
    for name in CANDIDATES:
        figures = predictors[name]
        assert figures["share_of_gain"] < 1.0 and figures["train_seconds"] > 0
        assert len(figures["calibration_per_day"]) == WORLDS["additive"].test_days
        for variant in multi_world.VARIANTS:
            assert 0.0 < figures[variant]["calibration_vs_true_p"] < 10.0
    markdown = out.with_suffix(".md").read_text()
    assert f"pipeline selected `{run['selected']}`" in markdown
    assert "| additive | 20,000 |" in markdown
