"""Batch scoring of processed frames through the scoring tables, for `rtb predict`.

`pipeline.predict_proba` on millions of rows materialises every encoded column, scales it,
stacks the blocks and multiplies by the coefficients. With the tables of
`rtb.scoring.tables` a row costs one gather per group (a dense per-key array where the key
space allows, a hash index otherwise) plus the small numeric block:

- logistic regressions add the gathered contributions to the log-odds (one-hot: one at a
  time in float32, the way scipy's sparse mat-vec rounds);
- the GBM gathers its encoded features into the matrix the booster would have seen and lets
  the model compute its raw score, so only the encoder's work is replaced;
- the blend does both from the same keys, its linear side from tables of its own.

`batch_scorer` hands the scorer out only after it reproduced `predict_proba` on a sample.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import pandas as pd

from rtb.models.level_codes import DENSE_MAX_KEYS, lookup_codes, mixed_radix_key
from rtb.models.transforms import sigmoid
from rtb.scoring import agreement
from rtb.scoring.artifact import BlendHead, KeyTable, LinearHead, ScoringTables, TreeHead
from rtb.scoring.errors import NotTabulable

log = logging.getLogger(__name__)


def _lookup(group: KeyTable) -> Callable[[np.ndarray], list[np.ndarray]]:
    """Keys -> one array per value column; built up front so that threads only read it.

    Columns are kept in float32 when that holds them exactly (the GBM's encodings, the
    one-hot model's products): half the memory traffic of a gather, the same numbers.
    """
    exact32 = np.array_equal(group.values.astype(np.float32), group.values, equal_nan=True)
    dtype = np.float32 if exact32 else np.float64
    if group.size <= DENSE_MAX_KEYS:  # an array gather, no hashing
        dense = [np.ascontiguousarray(c, dtype=dtype) for c in group.by_key().T]
        return lambda keys: [column[keys] for column in dense]
    values = [np.ascontiguousarray(c, dtype=dtype) for c in group.values.T]
    index = pd.Index(group.keys)
    index.get_indexer(group.keys[:1])  # builds the hash table now, not in a scoring thread

    def gather(keys: np.ndarray) -> list[np.ndarray]:
        slot = index.get_indexer(keys)  # -1 (unseen) picks the default, the last row
        return [column[slot] for column in values]

    return gather


class TableScorer:
    """Probability of install for a processed frame from the scoring tables."""

    def __init__(self, tables: ScoringTables) -> None:
        self.tables = tables
        self._lookups = [_lookup(group) for group in tables.groups]
        head = tables.head
        self._linear_lookups = ([_lookup(group) for group in head.linear_groups]
                                if isinstance(head, BlendHead) else self._lookups)
        for vocabulary in tables.vocabularies:
            vocabulary.get_indexer(vocabulary[:1])  # the same: hash tables before the threads

    def _keys(self, frame: pd.DataFrame) -> list[np.ndarray]:
        """Each row's key in every group."""
        tables = self.tables
        codes = [
            lookup_codes(frame[name], vocabulary)
            for name, vocabulary in zip(tables.categorical, tables.vocabularies, strict=True)
        ]
        return [mixed_radix_key([codes[c] for c in group.columns], group.radixes)
                for group in tables.groups]

    @staticmethod
    def _gathered(keys: list[np.ndarray], lookups: list) -> list[np.ndarray]:
        """Each row's values, one array per table column, in the model's column order."""
        return [column for key, lookup in zip(keys, lookups, strict=True) for column in lookup(key)]

    def _numeric_input(self, frame: pd.DataFrame) -> np.ndarray | None:
        block = self.tables.numeric
        return None if block is None else frame[list(block.columns)].to_numpy(dtype=np.float32)

    def raw_log_odds(self, frame: pd.DataFrame) -> np.ndarray:
        """Uncalibrated log-odds (what the Platt step is applied to)."""
        head, tables = self.tables.head, self.tables
        keys = self._keys(frame)
        raw_numeric = self._numeric_input(frame)
        numeric = None if raw_numeric is None else tables.numeric.apply(raw_numeric)
        if isinstance(head, TreeHead):
            return _trees(head, self._gathered(keys, self._lookups), numeric, len(frame))
        if isinstance(head, BlendHead):
            trees = _trees(head.trees, self._gathered(keys, self._lookups), numeric, len(frame))
            linear_numeric = (None if head.linear_numeric is None
                              else head.linear_numeric.apply(raw_numeric))
            linear = _linear(head.linear, self._gathered(keys, self._linear_lookups),
                             linear_numeric, len(frame))
            return head.linear_weight * linear + (1.0 - head.linear_weight) * trees
        return _linear(head, self._gathered(keys, self._lookups), numeric, len(frame))

    def predict_positive(self, frame: pd.DataFrame) -> np.ndarray:
        """Probability of install per row, as the pipeline's `predict_proba(frame)[:, 1]`."""
        return sigmoid(self.tables.slope * self.raw_log_odds(frame) + self.tables.intercept)


def _trees(head: TreeHead, gathered: list[np.ndarray], numeric: np.ndarray | None,
           rows: int) -> np.ndarray:
    """The booster's raw score on the matrix the pipeline would hand it."""
    width = len(gathered) + (numeric.shape[1] if numeric is not None else 0)
    X = np.empty((rows, width), dtype=np.float32)
    for position, column in enumerate(gathered):
        X[:, position] = column
    if numeric is not None:
        X[:, len(gathered):] = numeric
    return np.asarray(head.model.decision_function(X), dtype=np.float64)


def _linear(head: LinearHead, gathered: list[np.ndarray], numeric: np.ndarray | None,
            rows: int) -> np.ndarray:
    """Intercept plus the gathered contributions plus the numeric block's weighted columns
    (one-hot: one at a time in float32, the way scipy's sparse mat-vec rounds)."""
    if head.float32:
        z = np.zeros(rows, dtype=np.float32)
        for column in gathered:
            z += column
        if numeric is not None:
            for column, weight in zip(numeric.T, head.weights.astype(np.float32), strict=True):
                z += column * weight
        z += np.float32(head.intercept)
        return z.astype(np.float64)
    z = np.full(rows, head.intercept)
    for column in gathered:
        z += column
    if numeric is not None and len(head.weights):
        z += numeric @ head.weights
    return z


def batch_scorer(pipeline: object, sample: pd.DataFrame) -> TableScorer | None:
    """The table scorer if `pipeline` tabulates and agrees with `predict_proba` on `sample`;
    None means: score with the pipeline. Raises KeyError naming the columns the model reads
    that `sample` lacks (the caller reports them), whether the model tabulates or not."""
    names = getattr(pipeline, "feature_names_in_", None)
    missing = [str(name) for name in (names if names is not None else ()) if name not in sample]
    if missing:
        raise KeyError(missing)
    from rtb.scoring.tables import tabulate  # reads sklearn objects, so imports sklearn

    try:
        tables = tabulate(pipeline)
    except NotTabulable as exc:
        log.info("batch scoring with predict_proba: %s", exc)
        return None
    expected = pipeline.predict_proba(sample)[:, 1]  # type: ignore[attr-defined]
    try:
        scorer = TableScorer(tables)
        got = scorer.predict_positive(sample)
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        log.info("batch scoring with predict_proba: tables failed on the sample (%s)", exc)
        return None
    if not agreement.agrees(got, expected):
        log.warning("batch scoring with predict_proba: tables differ from it by %.3g",
                    agreement.disagreement(got, expected))
        return None
    return scorer
