"""Numeric transforms the candidate pipelines apply, in numpy alone, so that the scoring
tables (`rtb.scoring.artifact`) apply exactly the same function without importing sklearn
(or scipy.special, which alone takes 0.7 s to import)."""

from __future__ import annotations

import numpy as np


def log1p_nonnegative(values: np.ndarray) -> np.ndarray:
    """Heavy-tailed counts compress on a log scale; negative values are data errors -> 0."""
    return np.log1p(np.clip(np.asarray(values, dtype=np.float64), 0.0, None))


def sigmoid(z: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-z)), as scipy's expit computes it; exp overflows to inf for very negative
    z, which gives the correct 0."""
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))
