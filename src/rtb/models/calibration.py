"""Platt calibration on a model's log-odds: the last step of every pipeline.

Two parameters fitted on the latest (held-out) rows turn a model's scores into probabilities
that match current install rates, and take out the shift negative downsampling puts into
the log-odds. `cross_fitted_platt` gives holdout probabilities in which no row's calibration
saw its own label, so the holdout metrics stay honest. `mean_matching_shift` moves a model's
level to a given mean probability (how the refit takes over the early fit's level).
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit
from sklearn.model_selection import StratifiedKFold


def fit_platt(log_odds: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Slope and intercept of a 1-D logistic regression on the model's log-odds.

    Newton's method on the two parameters (with sklearn's C=1e4 ridge on the slope, so the
    result is what `LogisticRegression(C=1e4)` converges to): a handful of vectorised passes
    instead of a general solver's dozens, which had made calibration a tenth of training time.
    Steps are capped so that a start far from the optimum cannot overshoot into overflow.
    """
    x = np.asarray(log_odds, dtype=np.float64)
    target = np.asarray(y, dtype=np.float64)
    ridge, params = 1e-4, np.array([1.0, 0.0])
    for _ in range(50):
        p = expit(params[0] * x + params[1])
        residual, weight = p - target, p * (1.0 - p)
        wx = weight * x
        gradient = np.array([residual @ x + ridge * params[0], residual.sum()])
        hessian = np.array([[wx @ x + ridge, wx.sum()], [wx.sum(), weight.sum() + 1e-12]])
        step = np.linalg.solve(hessian, gradient)
        step *= min(1.0, 2.0 / max(np.abs(step).max(), 1e-300))
        params -= step
        if np.abs(step).max() < 1e-9:
            break
    return float(params[0]), float(params[1])


def cross_fitted_platt(log_odds: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Calibrated holdout probabilities where no row's calibration saw its own label."""
    out = np.empty(len(y))
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    for fit_rows, score_rows in folds.split(log_odds.reshape(-1, 1), y):
        slope, intercept = fit_platt(log_odds[fit_rows], y[fit_rows])
        out[score_rows] = expit(slope * log_odds[score_rows] + intercept)
    return out


def mean_matching_shift(log_odds: np.ndarray, rate: float, weights: np.ndarray | None = None) -> float:
    """The shift of the log-odds after which the rows' (weighted) mean probability is `rate`.

    Bisection, since the mean is monotone in the shift: sixty halvings of [-30, 30] leave an
    interval far below float precision, whatever the start, with no step to cap.
    """
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.average(expit(log_odds + mid), weights=weights) < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2
