"""Level variants multi_world.py evaluates beside the shipped model, not part of the pipeline:
the next day's base rate from a trend over every labelled day of the window (instead of the
holdout's label rate that Platt scaling ties the level to), and the shift that moves a model's
mean probability on some rows to a chosen rate (the anchoring variants). None of them won
across the worlds (see bench/README.md, "Model quality across worlds"), so the package does
not use them."""

from __future__ import annotations

import numpy as np
from scipy.special import expit


def mean_matching_shift(log_odds: np.ndarray, rate: float,
                        weights: np.ndarray | None = None) -> float:
    """The shift of the log-odds after which the rows' (weighted) mean probability is `rate`
    (bisection: the mean is monotone in the shift)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.average(expit(log_odds + mid), weights=weights) < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def tracked_base_rate_log_odds(day_positives: np.ndarray, day_rows: np.ndarray,
                               at_day: float) -> float:
    """The base rate's log-odds expected on day `at_day` (an index on the same scale as the
    days given, e.g. the next day), from a weighted linear trend of the days' log-odds whose
    slope is kept only as far as the days' positives make it significant.

    Platt scaling ties the level of every next-day prediction to the holdout's label
    rate: with a few hundred positives that rate is off by 5-10% by chance, and when the base
    rate drifts it is a day or more behind. The trend uses every labelled day (several times
    the holdout's positives) and extrapolates to the day being scored; its slope is shrunk by
    the positive-part James-Stein factor max(0, 1 - var(slope) / slope^2), so a stationary
    window falls back to its overall rate and a real drift is followed.
    """
    positives = np.asarray(day_positives, dtype=np.float64)
    rows = np.asarray(day_rows, dtype=np.float64)
    keep = (positives > 0) & (positives < rows)
    days = np.arange(len(rows), dtype=np.float64)[keep]
    positives, rows = positives[keep], rows[keep]
    rate = positives / rows
    level = np.log(rate / (1 - rate))
    weight = 1.0 / (1.0 / positives + 1.0 / (rows - positives))  # inverse sampling variance
    if len(days) < 3:
        total = positives.sum() / rows.sum()
        return float(np.log(total / (1 - total)))
    centre = float(np.average(days, weights=weight))
    sxx = float(np.sum(weight * (days - centre) ** 2))
    mean_level = float(np.average(level, weights=weight))
    slope = float(np.sum(weight * (days - centre) * (level - mean_level)) / sxx)
    slope_variance = 1.0 / sxx
    slope *= max(0.0, 1.0 - slope_variance / slope**2) if slope else 0.0
    return mean_level + slope * (at_day - centre)
