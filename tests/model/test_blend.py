"""`blend_target_encoded`: the average of the target-encoded logistic regression's and the
GBM's log-odds. Selection makes it from the two candidates' own fits, so it must be exactly
the blend a fit of its own would give, and its holdout figures must come from the members'
holdout scores as any candidate's come from its own."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import small_raw_frame, write_raw
from scipy.special import expit

from rtb.config import ProjectPaths
from rtb.data.make_dataset import run_make_dataset
from rtb.data.preprocessing import read_processed, run_preprocess
from rtb.dataset_config import load_dataset_config
from rtb.features import feature_frame
from rtb.models.calibration import blend_weight, blended
from rtb.models.pipeline import BLEND, BLEND_MEMBERS, blend_of, build_pipeline
from rtb.models.training import (
    SELECTION_RULE,
    CandidateResult,
    blend_only_beyond_noise,
    refit_on_all_rows,
    select_model,
)

CFG = load_dataset_config("rtb")


@pytest.fixture(scope="module")
def frame(tmp_path_factory):
    paths = ProjectPaths(tmp_path_factory.mktemp("blend") / "project")
    write_raw(small_raw_frame(8000, seed=17), paths.raw_dir / "training_data.csv.gz")
    run_make_dataset(paths, "train", CFG)
    run_preprocess(paths, "train", CFG)
    return read_processed(paths.processed_arrow("train"), CFG, require_target=True, with_id=False)


def _raw_log_odds(pipeline, X) -> np.ndarray:
    return pipeline[-1].raw_log_odds(pipeline[:-1].transform(X))


def test_the_blend_of_two_fitted_members_is_the_blend_fitted_on_their_rows(frame) -> None:
    X, y = feature_frame(frame, CFG), frame[CFG.target].to_numpy()
    linear, trees = (build_pipeline(name, CFG).fit(X, y) for name in BLEND_MEMBERS)
    made = blend_of(linear, trees)
    fitted = build_pipeline(BLEND, CFG).fit(X, y)
    scored = X.iloc[::3]
    # Its two sides are the members' log-odds, averaged half and half.
    blend = made[-1].estimator_
    encoded = made[:-1].transform(scored)
    np.testing.assert_allclose(blend.linear_log_odds(encoded), _raw_log_odds(linear, scored),
                               rtol=0, atol=1e-9)
    np.testing.assert_allclose(blend.tree_log_odds(encoded), _raw_log_odds(trees, scored),
                               rtol=0, atol=1e-12)
    expected = 0.5 * _raw_log_odds(linear, scored) + 0.5 * _raw_log_odds(trees, scored)
    np.testing.assert_allclose(_raw_log_odds(made, scored), expected, rtol=0, atol=1e-9)
    # A blend fitted on the same rows is the same model (to the solver's last digits: its
    # logistic regression reads the same numbers through another stacking of the blocks).
    np.testing.assert_allclose(_raw_log_odds(fitted, scored), expected, rtol=0, atol=1e-6)
    assert np.std(expected) > 0.1  # members that said the same for every row would prove nothing


def test_selection_scores_the_blend_from_its_members_holdout_log_odds(frame) -> None:
    selection = select_model(frame, CFG, candidates=(*BLEND_MEMBERS, BLEND))
    by_name = {result.name: result for result in selection.candidates}
    blend, linear, trees = by_name[BLEND], *(by_name[name] for name in BLEND_MEMBERS)
    np.testing.assert_array_equal(blend.fitted_rows, linear.fitted_rows)
    weight = blend.pipeline[-1].estimator_.linear_weight
    pair = np.column_stack([linear.holdout_log_odds, trees.holdout_log_odds])
    assert weight == blend_weight(pair, selection.y_holdout)
    np.testing.assert_allclose(blend.holdout_log_odds, blended(pair, weight), rtol=0, atol=1e-12)
    # Its pipeline scores the holdout as its Platt step was fitted to: the fit is the members'.
    calibration = blend.calibration
    held = selection.X[selection.holdout]
    np.testing.assert_allclose(
        blend.pipeline.predict_proba(held)[:, 1],
        expit(calibration["slope"] * blend.holdout_log_odds + calibration["intercept"]),
        rtol=0, atol=1e-9)
    # Its holdout figures are cross-fitted like every candidate's, not the in-sample Platt's.
    in_sample = expit(calibration["slope"] * blend.holdout_log_odds + calibration["intercept"])
    assert not np.allclose(blend.holdout_probabilities, in_sample)
    assert blend.holdout["log_loss"] > 0


def test_the_refit_keeps_the_weight_selection_chose(frame) -> None:
    selection = select_model(frame, CFG, candidates=(BLEND,))
    chosen = next(result for result in selection.candidates if result.name == BLEND)
    model, _ = refit_on_all_rows(dataclasses.replace(selection, selected=chosen), seed=0)
    weight = chosen.pipeline[-1].estimator_.linear_weight
    assert 0.0 < weight < 1.0 and weight != 0.5
    assert model[-1].estimator_.linear_weight == weight
    assert model[-1].estimator_.trees_ is not chosen.pipeline[-1].estimator_.trees_  # refitted


def test_the_blend_weight_finds_the_mix_that_made_the_labels() -> None:
    """Labels drawn from 0.7 x one score + 0.3 x another: the weight is 0.7; a useless
    second score gets (almost) none, and a weight never leaves [0, 1]."""
    rng = np.random.default_rng(8)
    a, b = rng.normal(-4.0, 1.0, (2, 400_000))
    y = (rng.random(len(a)) < expit(0.7 * a + 0.3 * b)).astype(np.int8)
    assert blend_weight(np.column_stack([a, b]), y) == pytest.approx(0.7, abs=0.03)
    noise = rng.normal(-4.0, 1.0, len(a))
    only_a = (rng.random(len(a)) < expit(a)).astype(np.int8)
    assert blend_weight(np.column_stack([a, noise]), only_a) == pytest.approx(1.0, abs=0.03)
    corrected = (rng.random(len(a)) < expit(1.5 * a - 0.5 * b)).astype(np.int8)
    assert blend_weight(np.column_stack([a, b]), corrected) == 1.0  # 1.5 / (1.5 - 0.5), clipped


def test_asking_for_the_blend_alone_fits_its_members_but_reports_only_it(frame) -> None:
    selection = select_model(frame, CFG, candidates=(BLEND,))
    assert [result.name for result in selection.candidates] == ["logreg_onehot", BLEND]
    assert selection.selected.name in ("logreg_onehot", BLEND)


def _scored(name: str, p: np.ndarray, y: np.ndarray) -> CandidateResult:
    loss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return CandidateResult(name, None, p, {"log_loss": loss}, {}, {}, 0.0, np.arange(3),
                           np.zeros(len(y)))


def test_the_blend_replaces_its_better_member_only_beyond_noise() -> None:
    """The blend costs both members' time, so a holdout uplift within the bootstrap's noise
    keeps the member; a clear one selects the blend; without its members asked for, it stays."""
    rng = np.random.default_rng(9)
    truth = expit(rng.normal(-3.5, 1.0, 200_000))
    y = (rng.random(len(truth)) < truth).astype(float)
    vague = expit(np.log(truth / (1 - truth)) * 0.6 - 1.4)  # a member that knows less
    for member_p, kept in ((vague, BLEND), (expit(np.log(truth / (1 - truth)) + 1e-4), "gbm_target_encoded")):
        blend, member = _scored(BLEND, truth, y), _scored("gbm_target_encoded", member_p, y)
        results = [_scored("logreg_target_encoded", np.full(len(y), y.mean()), y), member, blend]
        chosen, rule = blend_only_beyond_noise(blend, results, y, seed=0)
        assert chosen.name == kept
        assert rule.startswith(SELECTION_RULE) and "interval over gbm_target_encoded" in rule
    alone = blend_only_beyond_noise(blend, [_scored("logreg_onehot", vague, y), blend], y, seed=0)
    assert alone == (blend, SELECTION_RULE)
