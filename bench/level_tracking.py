"""A variant multi_world.py evaluates beside the shipped model, not part of the pipeline: the
next day's base rate from a trend over every labelled day of the window, instead of the
holdout's label rate that Platt scaling ties the level to. It did not win across the worlds
(see bench/README.md, "Model quality across worlds"), so the package does not use it."""

from __future__ import annotations

import numpy as np


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
