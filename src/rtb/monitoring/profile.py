"""A reference profile of a training window: what "normal" requests and scores looked like.

Drift is always drift *from something*. The champion model learnt from one window of
requests; a profile of that window is what every later scored interval is compared with. It
holds, per feature, a handful of bins and the share of the window's rows in each, which is all
the population stability index needs, and it is small enough to live next to the model as a
YAML file (hence `to_dict` / `from_dict` with plain Python types only).

Binning, and why:

- Numeric features: cut points at reference quantiles, so that every bin holds about the same
  share of the window and each bin is equally able to show a shift. Cut points are actual data
  values (`inverted_cdf` quantiles), bins are right-closed, repeated cut points from heavy ties
  (counts that are mostly 0) collapse into one, and a cut point at the maximum is dropped, so
  every reference bin is non-empty. The outer bins are open-ended: values outside the
  reference range fall in the first or last bin. NaN (a gap) is a bin of its own, after the
  finite bins, because a change in how often a value is missing is drift too.
- Categoricals: the top-k levels by share plus one "other" bucket holding every other level,
  including levels the window never saw. A few thousand campaigns would give PSI terms too
  small and noisy to mean anything one by one; the head of the distribution is where the
  traffic and the spend are.
- The score: quantile bins of the logit of the served probability. Quantile bins are rank
  based, so which reference rows share a bin is the same on the probability or the logit
  scale; logits are stored because that is the scale the model works on (an intercept shift,
  the usual miscalibration, moves every edge by the same amount) and the edges stay readable
  at a 1% base rate where probabilities would be 0.0031, 0.0047, ... Equal-width bins on the
  probability scale would put nearly every request in the first bin.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from rtb.dataset_config import DatasetConfig
from rtb.errors import RtbError
from rtb.features import MISSING

DEFAULT_BINS = 10
DEFAULT_TOP_K = 20
SCORE_SCALE = "logit"
SCORE_CLIP = 1e-7  # keeps logit(0) and logit(1) finite; far below any price that matters
PROFILE_FORMAT = 1


@dataclass(frozen=True)
class NumericBins:
    """Right-closed bins `(-inf, c0], (c0, c1], ..., (c_last, inf)` plus a NaN bin.

    `cuts` are the cut points; `shares` has `len(cuts) + 2` entries: the finite bins in
    order, then the NaN bin.
    """

    cuts: list[float]
    shares: list[float]

    def __post_init__(self) -> None:
        if len(self.shares) != len(self.cuts) + 2 or np.any(np.diff(self.cuts) <= 0):
            raise RtbError(f"drift profile: {len(self.cuts)} cut points must increase strictly "
                           f"and come with {len(self.cuts) + 2} shares, got {len(self.shares)}")

    def counts(self, values: np.ndarray) -> np.ndarray:
        """Rows per bin (finite bins, then NaN): one vectorised comparison per cut point."""
        return numeric_bin_counts(values, self.cuts)

    def to_dict(self) -> dict[str, Any]:
        return {"cuts": list(self.cuts), "shares": list(self.shares)}

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> NumericBins:
        return cls([float(c) for c in payload["cuts"]], [float(s) for s in payload["shares"]])


@dataclass(frozen=True)
class CategoricalLevels:
    """The top-k levels and their shares; `shares` has one more entry, the "other" bucket."""

    levels: list[str]
    shares: list[float]

    def __post_init__(self) -> None:
        if len(self.shares) != len(self.levels) + 1 or len(set(self.levels)) != len(self.levels):
            raise RtbError(f"drift profile: {len(self.levels)} distinct levels must come with "
                           f"{len(self.levels) + 1} shares, got {len(self.shares)}")

    def counts(self, values: pd.Series) -> np.ndarray:
        """Rows per top-k level, then in "other" (every remaining or never-seen level)."""
        levels, counts = level_counts(values)
        bucket = pd.Index(self.levels).get_indexer(levels)
        bucket[bucket < 0] = len(self.levels)
        return np.bincount(bucket, weights=counts, minlength=len(self.levels) + 1)

    def to_dict(self) -> dict[str, Any]:
        return {"levels": list(self.levels), "shares": list(self.shares)}

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> CategoricalLevels:
        return cls([str(v) for v in payload["levels"]], [float(s) for s in payload["shares"]])


@dataclass(frozen=True)
class ReferenceProfile:
    """Bins and shares of a training window: per numeric feature, per categorical, the score.

    `score` is None when the profile was built without the model's scores.
    """

    rows: int
    numeric: dict[str, NumericBins] = field(default_factory=dict)
    categorical: dict[str, CategoricalLevels] = field(default_factory=dict)
    score: NumericBins | None = None
    bins: int = DEFAULT_BINS
    top_k: int = DEFAULT_TOP_K
    # Per categorical, the share of the window's latest rows whose level its earlier rows did
    # not have: how often new levels arrive in normal traffic (see `new_level_shares`).
    new_levels: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain str/int/float/list/dict only, so `yaml.safe_dump` and JSON both take it."""
        payload: dict[str, Any] = {
            "format": PROFILE_FORMAT,
            "rows": int(self.rows),
            "bins": int(self.bins),
            "top_k": int(self.top_k),
            "numeric": {name: bins.to_dict() for name, bins in self.numeric.items()},
            "categorical": {name: levels.to_dict() for name, levels in self.categorical.items()},
        }
        if self.score is not None:
            payload["score"] = {"scale": SCORE_SCALE, **self.score.to_dict()}
        if self.new_levels:
            payload["new_levels"] = {name: float(v) for name, v in self.new_levels.items()}
        return payload

    @classmethod
    def from_dict(cls, payload: Mapping[str, Any]) -> ReferenceProfile:
        """The inverse of `to_dict`; a profile of another format fails here, not later."""
        version = payload.get("format")
        if version != PROFILE_FORMAT:
            raise RtbError(f"drift profile: format {version!r}, expected {PROFILE_FORMAT}")
        score = payload.get("score")
        if score is not None and score.get("scale") != SCORE_SCALE:
            raise RtbError(f"drift profile: score scale {score.get('scale')!r}, expected {SCORE_SCALE}")
        return cls(
            rows=int(payload["rows"]),
            numeric={str(k): NumericBins.from_dict(v) for k, v in payload["numeric"].items()},
            categorical={
                str(k): CategoricalLevels.from_dict(v) for k, v in payload["categorical"].items()
            },
            score=None if score is None else NumericBins.from_dict(score),
            bins=int(payload["bins"]),
            top_k=int(payload["top_k"]),
            new_levels={str(k): float(v) for k, v in (payload.get("new_levels") or {}).items()},
        )


# --------------------------------------------------------------------------- building
def build_profile(
    frame: pd.DataFrame,
    *,
    numeric: Sequence[str],
    categorical: Sequence[str],
    scores: np.ndarray | pd.Series | None = None,
    bins: int = DEFAULT_BINS,
    top_k: int = DEFAULT_TOP_K,
) -> ReferenceProfile:
    """Profile the named columns of a processed frame (and the model's scores on it)."""
    if bins < 1 or top_k < 1:
        raise RtbError(f"drift profile: bins and top_k must be >= 1, got {bins} and {top_k}")
    rows = len(frame)
    if rows == 0:
        raise RtbError("drift profile: the reference frame has no rows")
    check_columns(frame, [*numeric, *categorical], "reference frame")
    numeric_bins = {}
    for name in numeric:
        values = numeric_values(frame[name])
        numeric_bins[name] = _numeric_profile(values, bins)
    levels = {name: _categorical_profile(frame[name], top_k) for name in categorical}
    score = None
    if scores is not None:
        score_logits = logit(check_scores(scores, rows, "reference scores"))
        score = _numeric_profile(score_logits, bins)
    return ReferenceProfile(rows, numeric_bins, levels, score, bins, top_k)


def profile_training_window(
    frame: pd.DataFrame,
    cfg: DatasetConfig,
    *,
    scores: np.ndarray | pd.Series | None = None,
    bins: int = DEFAULT_BINS,
    top_k: int = DEFAULT_TOP_K,
    exclude: Sequence[str] = (),
) -> ReferenceProfile:
    """`build_profile` over the model's features as the dataset config names them.

    `exclude` drops features whose distribution is not comparable with the intervals that
    will be checked: `hour` is uniform-ish over a day but a single value within one hour, so
    intervals shorter than a day should be profiled without it.
    """
    unknown = sorted(set(exclude) - set(cfg.feature_columns))
    if unknown:
        raise RtbError(f"drift profile: cannot exclude {unknown}: not features of {cfg.name}")
    return build_profile(
        frame,
        numeric=[c for c in cfg.feature_numerical if c not in exclude],
        categorical=[c for c in cfg.categorical if c not in exclude],
        scores=scores,
        bins=bins,
        top_k=top_k,
    )


def new_level_shares(later: pd.DataFrame, known: Mapping[str, pd.Index]) -> dict[str, float]:
    """Per categorical of `known`, the share of the `later` rows whose level is not in it
    (the levels the earlier rows had, see `seen_levels`).

    Long-tail ids bring new levels all the time (launches, new devices), so an unseen share is
    drift only when it exceeds this normal rate; measured on a training window's latest rows
    against its earlier ones, it is the rate a model trained on the window should expect.
    """
    from rtb.monitoring.drift import unseen_share

    return {name: unseen_share(later[name], levels) for name, levels in known.items()}


def seen_levels(values: pd.Series) -> pd.Index:
    """The levels that occur in `values` (text, gaps as `__missing__`), from category codes:
    no copy of the column, no strings per row."""
    levels, counts = level_counts(values)
    return levels[counts > 0]


def _numeric_profile(values: np.ndarray, bins: int) -> NumericBins:
    finite = values[~np.isnan(values)]
    if finite.size == 0:
        cuts: list[float] = []
    else:
        inner = np.quantile(finite, np.arange(1, bins) / bins, method="inverted_cdf")
        top = finite.max()
        cuts = [float(c) for c in np.unique(inner) if c < top]
    counts = numeric_bin_counts(values, cuts)
    return NumericBins(cuts, _shares(counts))


def _categorical_profile(values: pd.Series, top_k: int) -> CategoricalLevels:
    levels, counts = level_counts(values)
    # Most frequent first; ties broken by the level's text so the profile is reproducible.
    order = np.lexsort((levels.to_numpy(dtype=str), -counts))
    order = order[counts[order] > 0][:top_k]
    top_counts = counts[order]
    other = counts.sum() - top_counts.sum()
    shares = _shares(np.append(top_counts, other))
    return CategoricalLevels([str(v) for v in levels[order]], shares)


# --------------------------------------------------------------------------- vectorised helpers
def numeric_values(column: pd.Series) -> np.ndarray:
    """A numeric column as a float array with NaN gaps (float32 stays float32: no copy)."""
    dtype = column.dtype
    if isinstance(dtype, np.dtype) and dtype.kind == "f":
        return column.to_numpy()
    if isinstance(dtype, np.dtype) and dtype.kind in "biu":
        return column.to_numpy().astype(np.float64)
    if not isinstance(dtype, np.dtype) and pd.api.types.is_numeric_dtype(dtype):  # nullable
        return column.to_numpy(dtype=np.float64, na_value=np.nan)
    raise RtbError(f"drift: column {column.name!r} is not numeric (dtype {dtype})")


def numeric_bin_counts(values: np.ndarray, cuts: Sequence[float]) -> np.ndarray:
    """Rows per right-closed bin (finite bins in order), then the NaN bin.

    With a handful of cut points, counting `values > cut` per cut point and differencing is
    about twenty times faster than a `searchsorted` per row, and needs no index array. A
    float32 column is compared in float32 when every cut point is a float32 value (true for
    a profile of float32 data), so it is never widened to float64.
    """
    values = np.asarray(values)
    if values.dtype.kind != "f":
        values = values.astype(np.float64)
    edges = np.asarray(cuts, dtype=np.float64)
    if values.dtype != np.float64 and not np.array_equal(edges.astype(values.dtype), edges):
        values = values.astype(np.float64)
    edges = edges.astype(values.dtype)
    gaps = int(np.count_nonzero(np.isnan(values)))
    # rows above each cut point (NaN is above none); non-increasing along the cut points
    above = [int(np.count_nonzero(values > edge)) for edge in edges]
    finite = values.size - gaps
    counts = -np.diff([finite, *above, 0])
    return np.append(counts, gaps).astype(np.int64)


def level_counts(values: pd.Series) -> tuple[pd.Index, np.ndarray]:
    """Distinct levels (as text, gaps as `__missing__`) and their row counts.

    For a pandas Categorical this is a bincount of the codes plus work per level, never per
    row in Python; other dtypes are factorized first.
    """
    if isinstance(values.dtype, pd.CategoricalDtype):
        codes = values.cat.codes.to_numpy()
        categories = values.cat.categories.astype(str)
    else:
        codes, categories = pd.factorize(values, use_na_sentinel=True)
        categories = pd.Index(categories).astype(str)
    codes = codes.astype(np.int64, copy=False)
    gaps = codes < 0
    counts = np.bincount(codes[~gaps] if gaps.any() else codes, minlength=len(categories))
    levels = pd.Index(categories, dtype=object)
    n_gaps = int(gaps.sum())
    if n_gaps:  # a NaN in a categorical is the level `__missing__`, as in rtb.features
        position = levels.get_indexer([MISSING])[0]
        if position < 0:
            levels = levels.append(pd.Index([MISSING], dtype=object))
            counts = np.append(counts, 0)
            position = len(levels) - 1
        counts[position] += n_gaps
    if not levels.is_unique:  # e.g. 1 and "1" in an object column: both read as "1"
        grouped = pd.Series(counts, index=levels).groupby(level=0, sort=False).sum()
        levels, counts = pd.Index(grouped.index, dtype=object), grouped.to_numpy()
    return levels, counts.astype(np.int64)


def logit(p: np.ndarray) -> np.ndarray:
    """log(p / (1 - p)) with p clipped to [SCORE_CLIP, 1 - SCORE_CLIP] (no infinities)."""
    p = np.clip(np.asarray(p, dtype=np.float64), SCORE_CLIP, 1 - SCORE_CLIP)
    return np.log(p) - np.log1p(-p)


def check_scores(scores: np.ndarray | pd.Series, rows: int, what: str) -> np.ndarray:
    """Scores as float64, one per row, all probabilities (no NaN: a served price has none)."""
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or len(values) != rows:
        raise RtbError(f"drift: {what} have shape {values.shape}, expected ({rows},)")
    if not np.all((values >= 0) & (values <= 1)):  # also rejects NaN
        raise RtbError(f"drift: {what} must be probabilities in [0, 1] without NaN")
    return values


def check_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise RtbError(f"drift: {what} lacks column(s) {missing}")


def _shares(counts: np.ndarray) -> list[float]:
    total = float(np.sum(counts))
    return [float(c) / total for c in counts]
