"""The Platt step that calibrates every pipeline: its Newton solver must find what sklearn's
logistic regression finds, undo the shift that negative downsampling puts into log-odds, and
carry over to the model refitted on all rows, whose level is anchored to the early fit's on
rows scored without their own labels."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from conftest import small_raw_frame, write_raw
from scipy.special import expit
from sklearn.linear_model import LogisticRegression

from rtb.config import ProjectPaths
from rtb.data.make_dataset import run_make_dataset
from rtb.data.preprocessing import read_processed, run_preprocess
from rtb.dataset_config import load_dataset_config
from rtb.features import feature_frame
from rtb.models.calibration import cross_fitted_platt, fit_platt, mean_matching_shift
from rtb.models.encoders import SmoothedTargetEncoder, fit_vocabulary
from rtb.models.pipeline import build_pipeline, leave_one_out_log_odds
from rtb.models.training import TrainingLimits, level_anchor, refit_on_all_rows, select_model


@pytest.mark.parametrize(("rows", "slope", "intercept"), [(200_000, 0.8, 0.3), (3_000, 1.6, -1.0)])
def test_platt_matches_sklearn_logistic_regression(rows: int, slope: float, intercept: float) -> None:
    rng = np.random.default_rng(rows)
    x = rng.normal(-4.0, 1.5, rows)
    y = (rng.random(rows) < expit(slope * x + intercept)).astype(np.int8)
    reference = LogisticRegression(C=1e4, tol=1e-10, max_iter=10_000).fit(x.reshape(-1, 1), y)
    fitted = fit_platt(x, y)
    assert fitted == pytest.approx((reference.coef_[0, 0], reference.intercept_[0]), abs=2e-3)


def test_platt_takes_out_the_downsampling_shift() -> None:
    """A model fitted on 1 in 20 negatives over-predicts by ~20x; Platt on natural rows fixes it."""
    rng = np.random.default_rng(0)
    true_log_odds = rng.normal(-4.5, 1.0, 400_000)
    y = (rng.random(len(true_log_odds)) < expit(true_log_odds)).astype(np.int8)
    shifted = true_log_odds + np.log(20.0)
    assert expit(shifted).mean() / y.mean() > 10
    slope, intercept = fit_platt(shifted, y)
    assert slope == pytest.approx(1.0, abs=0.05)
    assert intercept == pytest.approx(-np.log(20.0), abs=0.1)
    calibrated = cross_fitted_platt(shifted, y, seed=0)
    assert calibrated.mean() / y.mean() == pytest.approx(1.0, abs=0.02)


def test_vocabulary_from_category_codes_equals_the_string_count() -> None:
    rng = np.random.default_rng(1)
    levels, shares = ["a", "b", "c", "__missing__", "rare"], [0.5, 0.3, 0.15, 0.0498, 0.0002]
    text = pd.Series(rng.choice(levels, 5000, p=shares))
    category = text.astype("category").cat.add_categories(["never-seen"])
    for minimum in (1, 5):
        by_codes = fit_vocabulary(category, minimum)
        by_text = fit_vocabulary(text.astype(object), minimum)
        assert sorted(by_codes) == sorted(by_text)
        counts = text.value_counts()
        assert list(counts.loc[list(by_codes)]) == sorted(counts.loc[list(by_codes)], reverse=True)
    assert "never-seen" not in fit_vocabulary(category, 1)


@pytest.mark.parametrize("name", ["logreg_target_encoded", "blend_target_encoded"])
def test_refit_on_all_rows_keeps_the_calibration(tmp_path, name: str) -> None:
    """The shipped model is refitted on every row with a different share of negatives kept;
    the Platt intercept must move by exactly that sampling shift (here ~1 in log-odds, a 2.6x
    error in predicted rates if it were forgotten)."""
    cfg = load_dataset_config("rtb")
    paths = ProjectPaths(tmp_path / "project")
    write_raw(small_raw_frame(6000, seed=11), paths.raw_dir / "training_data.csv.gz")
    run_make_dataset(paths, "train", cfg)
    run_preprocess(paths, "train", cfg)
    frame = read_processed(paths.processed_arrow("train"), cfg, require_target=True, with_id=False)
    limits = TrainingLimits(fit_max_negatives=800, refit_max_negatives=3000)

    result = select_model(frame, cfg, limits=limits, candidates=(name,))
    result = dataclasses.replace(result, selected=next(c for c in result.candidates if c.name == name))
    model, refit = refit_on_all_rows(result, seed=0, limits=limits)

    assert refit["of_rows"] == len(frame) and refit["rows"] > 2 * result.selected.fit_rows
    shift = np.log(refit["negatives_kept_share"] / refit["early_fit_negatives_kept_share"])
    assert shift > 0.8
    # The sampling shift, then what is left between the two models' levels (a few percent).
    anchor = refit["level_anchor"]
    assert anchor["rows"] > 0 and abs(anchor["shift"]) < 0.3
    assert refit["platt_intercept"] == pytest.approx(
        result.selected.calibration["intercept"] + result.selected.calibration["slope"] * shift
        + anchor["shift"]
    )
    # Negatives were already dropped while the rows were taken in (half of the early ones):
    # calibration is judged on every row of the file, as the shipped model will see them.
    assert len(result.frame) < 0.7 * len(frame) and result.rows.negative_share < 0.6
    y = frame["install"].to_numpy()
    p = model.predict_proba(feature_frame(frame, cfg))[:, 1]
    assert p.mean() / y.mean() == pytest.approx(1.0, abs=0.15)
    unshifted = model.set_params(model__intercept=result.selected.calibration["intercept"] + anchor["shift"])
    assert unshifted.predict_proba(feature_frame(frame, cfg))[:, 1].mean() / y.mean() < 0.6


def test_the_mean_matching_shift_hits_the_rate_with_and_without_weights() -> None:
    """The solver behind the refit's level anchor: the shifted mean is the rate asked for,
    and weights (the early rows' classes weighted back to their natural mix) change it."""
    rng = np.random.default_rng(3)
    log_odds = rng.normal(-4.0, 1.2, 50_000)
    weights = np.where(log_odds > -4.0, 5.0, 1.0)  # the likelier rows count more
    for w in (None, weights):
        shift = mean_matching_shift(log_odds, 0.031, w)
        assert np.average(expit(log_odds + shift), weights=w) == pytest.approx(0.031, rel=1e-9)
    assert mean_matching_shift(log_odds, 0.031, weights) != pytest.approx(
        mean_matching_shift(log_odds, 0.031), abs=0.1)


def _processed_train(root, rows: int, seed: int) -> pd.DataFrame:
    cfg = load_dataset_config("rtb")
    paths = ProjectPaths(root)
    write_raw(small_raw_frame(rows, seed=seed), paths.raw_dir / "training_data.csv.gz")
    run_make_dataset(paths, "train", cfg)
    run_preprocess(paths, "train", cfg)
    return read_processed(paths.processed_arrow("train"), cfg, require_target=True, with_id=False)


def test_the_refit_takes_over_the_early_fits_level(tmp_path) -> None:
    """On early rows both models were fitted on, each scored as a new row of its levels, the
    refit's mean probability is the early fit's: anchoring the shipped refit again moves
    nothing, while the refit without its anchor sat elsewhere."""
    cfg = load_dataset_config("rtb")
    frame = _processed_train(tmp_path / "project", 8000, seed=5)
    selection = select_model(frame, cfg, candidates=("logreg_target_encoded",))
    model, refit = refit_on_all_rows(selection, seed=0)
    both = np.flatnonzero(~selection.holdout)
    again = level_anchor(selection, model, both, seed=0, max_rows=len(both))
    assert again["shift"] == pytest.approx(0.0, abs=1e-6)
    assert again["early_fit_mean_probability"] == pytest.approx(
        refit["level_anchor"]["early_fit_mean_probability"])
    assert abs(refit["level_anchor"]["shift"]) > 1e-3


@pytest.mark.parametrize("name", ["logreg_onehot", "logreg_target_encoded", "gbm_target_encoded",
                                  "blend_target_encoded"])
def test_leave_one_out_scoring_leaves_out_only_the_rows_own_label(tmp_path, name: str) -> None:
    """Without target encodings (the one-hot baseline) leave-one-out scoring is plain scoring.
    With them, a training row is scored as the same row would be by a model whose encoder had
    not seen it: the encodings of every other row's level are unchanged."""
    cfg = load_dataset_config("rtb")
    frame = _processed_train(tmp_path / "project", 3000, seed=6)
    X, y = feature_frame(frame, cfg), frame["install"].to_numpy()
    pipeline = build_pipeline(name, cfg).fit(X, y).set_params(model__slope=0.9, model__intercept=-0.2)
    plain = _log_odds(pipeline.predict_proba(X)[:, 1])
    loo = leave_one_out_log_odds(pipeline, X, y.astype(float))
    if name == "logreg_onehot":
        np.testing.assert_allclose(loo, plain, atol=1e-9)
        return
    assert np.abs(loo - plain).max() > 1e-3
    # Same numbers as the pipeline scoring rows whose encodings were replaced by hand.
    features = pipeline.named_steps["features"]
    block = features.named_transformers_["target"]
    encoder = block if isinstance(block, SmoothedTargetEncoder) else block[0]
    encoder.transform = lambda part: encoder.transform_leave_one_out(part, y)  # this instance only
    by_hand = _log_odds(pipeline.predict_proba(X)[:, 1])
    np.testing.assert_allclose(loo, by_hand, atol=1e-6)


def _log_odds(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p))
