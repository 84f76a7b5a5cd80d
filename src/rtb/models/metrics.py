"""Metrics that matter when a probability becomes a bid price.

Log loss alone is hard to read at a 1% base rate, so every report also carries normalized
entropy (log loss / entropy of the base rate: below 1.0 means better than bidding the average)
and the calibration ratio (mean predicted / observed: 1.0 means the spend forecast is right).

sklearn's metrics are imported by the functions that use them: this module is also imported
by the drift watch and, through it, by the reading of training rows, which must not wait the
second that importing sklearn takes (`rtb train` imports it while it reads).
"""

from __future__ import annotations

import numpy as np

EPS = 1e-15


def base_rate_entropy(y: np.ndarray) -> float:
    """Log loss of always predicting the observed base rate."""
    return rate_entropy(float(np.mean(y)))


def rate_entropy(rate: float) -> float:
    """Log loss of always predicting `rate` on labels whose base rate it is."""
    rate = float(np.clip(rate, EPS, 1 - EPS))
    return float(-(rate * np.log(rate) + (1 - rate) * np.log(1 - rate)))


def normalized_entropy(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import log_loss

    return float(log_loss(y, np.clip(p, EPS, 1 - EPS), labels=[0, 1]) / base_rate_entropy(y))


def calibration_ratio(y: np.ndarray, p: np.ndarray) -> float:
    observed = float(np.mean(y))
    return float(np.mean(p) / observed) if observed > 0 else float("nan")


def probability_metrics(y: np.ndarray, p: np.ndarray) -> dict[str, float]:
    """All headline metrics for one set of labels and predicted probabilities."""
    from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score

    y = np.asarray(y)
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1 - EPS)
    both = 0 < y.sum() < len(y)
    return {
        "roc_auc": float(roc_auc_score(y, p)) if both else float("nan"),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
        "brier": float(brier_score_loss(y, p)),
        "normalized_entropy": normalized_entropy(y, p),
        "calibration_ratio": calibration_ratio(y, p),
    }


def cv_scoring() -> dict[str, object]:
    """Scorers for ONE `cross_validate` call; losses are negated by sklearn, see `cv_summary`."""
    from sklearn.metrics import make_scorer

    proba = {"response_method": "predict_proba"}
    return {
        "roc_auc": "roc_auc",
        "log_loss": "neg_log_loss",
        "brier": "neg_brier_score",
        "normalized_entropy": make_scorer(normalized_entropy, greater_is_better=False, **proba),
        "calibration_ratio": make_scorer(calibration_ratio, **proba),
    }


LOSSES = ("log_loss", "brier", "normalized_entropy")


def cv_summary(cv_result: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Mean and std per metric, with sklearn's negated losses turned back into losses."""
    summary = {}
    for name in cv_scoring():
        scores = np.asarray(cv_result[f"test_{name}"], dtype=np.float64)
        if name in LOSSES:
            scores = -scores
        summary[name] = {"mean": float(scores.mean()), "std": float(scores.std())}
    return summary


def reliability_table(y: np.ndarray, p: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Equal-count bins of predicted probability: mean predicted vs observed rate per bin."""
    order = np.argsort(p, kind="stable")
    rows = []
    for chunk in np.array_split(order, bins):
        if len(chunk) == 0:
            continue
        rows.append(
            {
                "rows": int(len(chunk)),
                "mean_predicted": float(np.mean(p[chunk])),
                "observed_rate": float(np.mean(y[chunk])),
                "min_predicted": float(np.min(p[chunk])),
                "max_predicted": float(np.max(p[chunk])),
            }
        )
    return rows


def bootstrap_log_loss_uplift(
    y: np.ndarray, p_new: np.ndarray, p_old: np.ndarray, *, rounds: int = 200, seed: int = 0
) -> dict[str, float]:
    """Paired bootstrap of logloss(old) - logloss(new) over holdout rows (positive = better)."""
    y = np.asarray(y, dtype=np.float64)
    row_loss = lambda p: -(  # noqa: E731 - a one-line helper reads better inline
        y * np.log(np.clip(p, EPS, 1 - EPS)) + (1 - y) * np.log(np.clip(1 - p, EPS, 1 - EPS))
    )
    diff = row_loss(np.asarray(p_old)) - row_loss(np.asarray(p_new))
    rng = np.random.default_rng(seed)
    n = len(diff)
    means = np.array([diff[rng.integers(0, n, n, dtype=np.int32)].mean() for _ in range(rounds)])
    return {
        "uplift": float(diff.mean()),
        "ci95_low": float(np.quantile(means, 0.025)),
        "ci95_high": float(np.quantile(means, 0.975)),
        "relative": float(diff.mean() / max(row_loss(np.asarray(p_old)).mean(), EPS)),
    }
