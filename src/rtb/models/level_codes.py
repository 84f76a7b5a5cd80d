"""Level codes of categorical columns: a level's position in a fitted vocabulary, and one
key per row for a group of columns. numpy and pandas only, so that the target encoder that
fits them and the table scorers that read them (without sklearn) share one definition."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from rtb.features import MISSING

DENSE_MAX_KEYS = 10_000_000  # float32 x 2 = 80 MB at most per group


def as_text(values: pd.Series) -> pd.Series:
    """Values as strings with gaps as `__missing__`, whatever dtype the caller used."""
    if isinstance(values.dtype, pd.CategoricalDtype):
        return values
    return values.astype("string").fillna(MISSING)


def lookup_codes(values: pd.Series, vocabulary: pd.Index) -> np.ndarray:
    """Index of each value in `vocabulary`, -1 when unseen; O(levels) work for Categoricals."""
    values = as_text(values)
    if isinstance(values.dtype, pd.CategoricalDtype):
        level_codes = vocabulary.get_indexer(values.cat.categories.astype(str))
        codes = values.cat.codes.to_numpy()
        missing_code = vocabulary.get_indexer([MISSING])[0]
        return np.where(codes >= 0, level_codes[codes], missing_code).astype(np.int64)
    return vocabulary.get_indexer(values.to_numpy(dtype=object)).astype(np.int64)


def fit_vocabulary(values: pd.Series, min_frequency: int) -> pd.Index:
    """Levels seen at least `min_frequency` times, most frequent first.

    Categoricals are counted from their integer codes (a bincount), not by turning millions of
    rows back into strings.
    """
    values = as_text(values)
    if isinstance(values.dtype, pd.CategoricalDtype):
        codes = values.cat.codes.to_numpy()
        counts = pd.Series(
            np.bincount(codes[codes >= 0], minlength=len(values.cat.categories)),
            index=values.cat.categories.astype(str),
        )
        gaps = int((codes < 0).sum())
        if gaps:
            counts[MISSING] = counts.get(MISSING, 0) + gaps
        counts = counts.sort_values(ascending=False, kind="stable")
    else:
        counts = values.astype(str).value_counts(sort=True)
    kept = counts[(counts >= min_frequency) & (counts > 0)].index
    return pd.Index(kept.astype(str), dtype=object)


def mixed_radix_key(codes: Sequence[np.ndarray], radixes: Sequence[int]) -> np.ndarray:
    """One int64 key per row from the level codes of several columns (first column most
    significant); -1 (unseen) maps to the radix's last slot, which no fitted level uses."""
    key = np.zeros(len(codes[0]), dtype=np.int64)
    for code, radix in zip(codes, radixes, strict=True):
        key = key * radix + np.where(code >= 0, code, radix - 1)
    return key
