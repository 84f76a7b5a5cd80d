"""Platt calibration on a model's log-odds: the last step of every pipeline.

Two parameters fitted on the latest (held-out) rows turn a model's scores into probabilities
that match current install rates, and take out the shift negative downsampling puts into
the log-odds. `cross_fitted_platt` gives holdout probabilities in which no row's calibration
saw its own label, so the holdout metrics stay honest; `blend_weight` chooses how two
models' log-odds are mixed, by the same kind of fit. `mean_matching_shift` moves a model's
level to a given mean probability (how the refit takes over the early fit's level).
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit
from sklearn.model_selection import StratifiedKFold


def fit_platt(log_odds: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Slope and intercept of a 1-D logistic regression on the model's log-odds.

    Newton's method (`fit_logistic`, with sklearn's C=1e4 ridge on the slope, so the result
    is what `LogisticRegression(C=1e4)` converges to): a handful of vectorised passes instead
    of a general solver's dozens, which had made calibration a tenth of training time.
    """
    slopes, intercept = fit_logistic(np.asarray(log_odds, dtype=np.float64)[:, None], y)
    return float(slopes[0]), intercept


def fit_logistic(x: np.ndarray, y: np.ndarray, ridge: float = 1e-4) -> tuple[np.ndarray, float]:
    """Weights and intercept of a logistic regression on a few columns, by Newton's method
    with a ridge on the weights. Steps are capped so that a start far from the optimum cannot
    overshoot into overflow; the weights start at 1, the intercept at 0."""
    columns = [np.ascontiguousarray(c, dtype=np.float64) for c in np.asarray(x).T]
    target = np.asarray(y, dtype=np.float64)
    k = len(columns)
    params = np.append(np.ones(k), 0.0)
    penalty = np.append(np.full(k, ridge), 0.0)
    for _ in range(50):  # column by column: no (rows x k) temporaries
        z = np.full(len(target), params[k])
        for weight, column in zip(params[:k], columns, strict=True):
            z += weight * column
        p = expit(z)
        residual, curvature = p - target, p * (1.0 - p)
        weighted = [curvature * column for column in columns]
        gradient = np.array([residual @ c for c in columns] + [residual.sum()]) + penalty * params
        hessian = np.empty((k + 1, k + 1))
        for i in range(k):
            for j in range(i, k):
                hessian[i, j] = hessian[j, i] = weighted[i] @ columns[j]
            hessian[i, k] = hessian[k, i] = weighted[i].sum()
        hessian[k, k] = curvature.sum() + 1e-12
        hessian += np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        step *= min(1.0, 2.0 / max(np.abs(step).max(), 1e-300))
        params -= step
        if np.abs(step).max() < 1e-9:
            break
    return params[:k], float(params[k])


def blend_weight(pair: np.ndarray, y: np.ndarray) -> float:
    """The weight on the first of two models' log-odds (columns of `pair`) in their blend:
    the two weights of a logistic regression on both, as a share of their sum, kept within
    [0, 1] (outside it one model is a correction to the other, not a blend with it); 0.5
    when the two weights sum to nothing (neither model carries signal)."""
    weights, _ = fit_logistic(pair, y)
    total = float(weights.sum())
    return float(np.clip(weights[0] / total, 0.0, 1.0)) if total > 0 else 0.5


def blended(pair: np.ndarray, weight: float) -> np.ndarray:
    """The blend's log-odds: `weight` on the first column, the rest on the second."""
    return weight * pair[:, 0] + (1.0 - weight) * pair[:, 1]


def cross_fitted_platt(log_odds: np.ndarray, y: np.ndarray, seed: int) -> np.ndarray:
    """Calibrated holdout probabilities where no row's calibration saw its own label. A pair
    of columns (a blend's two models) has its blend weight chosen within each fold too."""
    out = np.empty(len(y))
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    for fit_rows, score_rows in folds.split(np.zeros((len(y), 1)), y):
        x = log_odds
        if x.ndim == 2:
            x = blended(x, blend_weight(x[fit_rows], y[fit_rows]))
        slope, intercept = fit_platt(x[fit_rows], y[fit_rows])
        out[score_rows] = expit(slope * x[score_rows] + intercept)
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
