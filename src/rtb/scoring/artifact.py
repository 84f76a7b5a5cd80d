"""The scoring tables as data: what `rtb.scoring.tables.tabulate` reads out of a fitted
pipeline, and all that the scorers (`rtb.scoring.batch`, `rtb.scoring.compiled`) need.

These classes import neither sklearn nor the pipeline's modules, so that tables written
beside a model at training (`models/scoring_tables_<version>.pkl`) are loaded and scored by
`rtb predict` without the second that importing sklearn (and scipy.stats) takes. A
LightGBM head still holds its booster, whose unpickling imports LightGBM.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from rtb.models.transforms import log1p_nonnegative
from rtb.scoring import lgbm_trees


@dataclass(frozen=True)
class KeyTable:
    """What the head reads for each key of one categorical group.

    `columns` are positions in `ScoringTables.categorical`; a row's key is the mixed-radix
    number of their codes (`rtb.models.level_codes.mixed_radix_key`). `values` has one row per
    seen key (sorted `keys`) plus a last row, the default for any other key.
    """

    columns: tuple[int, ...]
    radixes: tuple[int, ...]
    keys: np.ndarray
    values: np.ndarray

    @property
    def width(self) -> int:
        return int(self.values.shape[1])

    @property
    def size(self) -> int:
        """Number of possible keys (seen or not)."""
        return int(np.prod(self.radixes, dtype=np.float64))

    def by_key(self) -> np.ndarray:
        """`values` laid out by key, the default wherever no key was seen: (size, width)."""
        dense = np.repeat(self.values[-1:], self.size, axis=0)
        dense[self.keys] = self.values[:-1]
        return dense


@dataclass(frozen=True)
class NumericBlock:
    """The numeric columns' steps as constants: impute, log1p, standardise, in `dtype`.

    Inputs are float32, as processed frames hold them. `fills` None means no imputer (the
    GBM's passthrough); with an imputer, infinite inputs are an error, as in SimpleImputer.
    """

    columns: tuple[str, ...]
    dtype: np.dtype
    fills: np.ndarray | None
    log1p: bool
    mean: np.ndarray | None
    scale: np.ndarray | None

    def apply(self, matrix: np.ndarray) -> np.ndarray:
        """The block on a float32 matrix of its columns, rounding where sklearn rounds."""
        values = np.array(matrix, dtype=np.float32)
        if self.fills is not None:
            if np.isinf(values).any():
                raise ValueError("Input X contains infinity (SimpleImputer rejects it)")
            gaps = np.isnan(values)
            values[gaps] = np.broadcast_to(self.fills, values.shape)[gaps]
        if self.log1p:
            values = log1p_nonnegative(values)
        if self.mean is not None:  # in place: the same ufuncs, without a copy of the block
            values -= self.mean
        if self.scale is not None:
            values /= self.scale
        return values


@dataclass(frozen=True)
class LinearHead:
    """Logistic regression: intercept plus the numeric block's weights (categorical weights
    are in the tables). `float32`: products and partial sums round to float32 in column
    order, tables first, as scipy's CSR mat-vec does for the one-hot model."""

    intercept: float
    weights: np.ndarray
    float32: bool


@dataclass(frozen=True)
class TreeHead:
    """LightGBM on the tables' values followed by the numeric block's, in that order (`model`
    is the fitted LGBMClassifier)."""

    model: object
    ensemble: lgbm_trees.Ensemble


@dataclass(frozen=True)
class BlendHead:
    """`LinearTreeBlend`: a `TreeHead` on the tables' values and a `LinearHead` with tables of
    its own (`linear_groups`, each key's contribution to the linear log-odds, keyed as
    `ScoringTables.groups`) and its own numeric block on the same raw numeric columns; the
    two log-odds weighted `linear_weight` : 1 - `linear_weight`."""

    trees: TreeHead
    linear: LinearHead
    linear_groups: tuple[KeyTable, ...]
    linear_numeric: NumericBlock | None
    linear_weight: float


@dataclass(frozen=True)
class ScoringTables:
    """Everything a scorer needs to give the pipeline's probabilities without sklearn."""

    categorical: tuple[str, ...]
    vocabularies: tuple[pd.Index, ...]
    groups: tuple[KeyTable, ...]
    numeric: NumericBlock | None
    head: LinearHead | TreeHead | BlendHead
    slope: float
    intercept: float

    @property
    def kind(self) -> str:
        if isinstance(self.head, BlendHead):
            return "logistic_regression+lightgbm"
        return "lightgbm" if isinstance(self.head, TreeHead) else "logistic_regression"

    @property
    def columns(self) -> list[str]:
        """The processed-frame columns the scorers read."""
        return [*self.categorical, *(self.numeric.columns if self.numeric else ())]
