"""Numeric transforms the candidate pipelines apply, in numpy alone, so that the scoring
tables (`rtb.scoring.artifact`) apply exactly the same function without importing sklearn."""

from __future__ import annotations

import numpy as np


def log1p_nonnegative(values: np.ndarray) -> np.ndarray:
    """Heavy-tailed counts compress on a log scale; negative values are data errors -> 0."""
    return np.log1p(np.clip(np.asarray(values, dtype=np.float64), 0.0, None))
