"""The Platt step that calibrates every pipeline: its Newton solver must find what sklearn's
logistic regression finds, and undo the shift that negative downsampling puts into log-odds."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit
from sklearn.linear_model import LogisticRegression

from rtb.models.encoders import fit_vocabulary
from rtb.models.make_training import cross_fitted_platt, fit_platt


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
