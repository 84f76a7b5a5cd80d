"""The one test a scorer outside sklearn must pass before it replaces `predict_proba`.

Batch scoring checks the first rows of its input (or training checked the tables it wrote
beside the model on holdout and probe rows), the service checks probe rows; all call
`disagreement` so that "equal to the pipeline" means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

AGREEMENT = 1e-9
CHECK_ROWS = 20_000  # rows of real data a batch scorer is checked on


def disagreement(got: Sequence[float] | np.ndarray, expected: Sequence[float] | np.ndarray) -> float:
    """Largest absolute difference of two probability vectors (inf if their shapes differ);
    NaN on either side counts as infinitely far, so a broken scorer can never agree."""
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if got.shape != expected.shape:
        return float("inf")
    if got.size == 0:
        return 0.0
    difference = np.abs(got - expected)
    return float(np.inf) if np.isnan(difference).any() else float(difference.max())


def agrees(got: Sequence[float] | np.ndarray, expected: Sequence[float] | np.ndarray) -> bool:
    """Whether `got` may stand in for `expected` (within `AGREEMENT`, read at call time)."""
    return disagreement(got, expected) <= AGREEMENT
