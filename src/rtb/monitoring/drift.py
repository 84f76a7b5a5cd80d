"""Drift of scored requests from the champion's training window, and realised quality per day.

In real-time bidding a probability becomes a bid price, so a model that was calibrated on
last week's traffic overpays or underbids as soon as the traffic moves (new campaigns, new
source games, a changed SDK). Two kinds of evidence arrive at different times:

- at scoring time, the requests and the scores themselves: `drift_report` compares them with
  a `ReferenceProfile` of the training window (population stability index per feature and of
  the score distribution, and the share of requests whose categorical level the model has no
  encoding for);
- when install labels arrive, days later: `realised_quality` gives the calibration ratio
  and normalized entropy of what was actually served, and flags the model stale when either
  leaves its band.

Both produce a one-line summary for a task log and a plain dict for a YAML report. The
metrics are those of `rtb.models.metrics`, so a day's figures read like a training report's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from rtb.errors import RtbError
from rtb.models.metrics import calibration_ratio, normalized_entropy
from rtb.monitoring.profile import (
    ReferenceProfile,
    check_columns,
    check_scores,
    level_counts,
    logit,
    numeric_values,
)

# A share floor of 0.01%: below anything a bid decision could rest on, and it bounds what one
# bin that is empty on one side adds (about a * ln(a / 1e-4), e.g. 0.64 for a = 10%) instead of
# making the index infinite; a bin empty on both sides adds exactly 0.
PSI_FLOOR = 1e-4
# PSI >= 0.2 is the usual rule of thumb for a "significant shift" (below 0.1 is noise at
# the sample sizes of a day of requests).
DEFAULT_PSI_THRESHOLD = 0.2
# Requests whose level the model never saw get only the fallback encoding; at 5% of traffic
# that fallback prices a noticeable share of the spend.
DEFAULT_UNSEEN_THRESHOLD = 0.1
DEFAULT_MIN_ROWS = 500
DEFAULT_CALIBRATION_BAND = (0.9, 1.1)
DEFAULT_NE_LIMIT = 1.0  # NE >= 1.0: no better than bidding the base rate to everyone


def population_stability_index(
    expected_shares: Iterable[float] | np.ndarray,
    actual_shares: Iterable[float] | np.ndarray,
    floor: float = PSI_FLOOR,
) -> float:
    """PSI = sum((a - e) * ln(a / e)) over bins, both shares floored at `floor` first.

    Without the floor a bin that is empty on either side makes the index infinite (or NaN
    when empty on both), although a level that appears with 0.1% of traffic is no reason for
    alarm. Shares are not renormalised after flooring: the floor changes shares by at most
    `floor` each, far below the thresholds that are read off the index.
    """
    expected = np.asarray(expected_shares, dtype=np.float64)
    actual = np.asarray(actual_shares, dtype=np.float64)
    if expected.ndim != 1 or expected.shape != actual.shape or expected.size == 0:
        raise RtbError(f"PSI: share vectors of shapes {expected.shape} and {actual.shape}, "
                       "expected two equal non-empty 1-D vectors")
    if not floor > 0:
        raise RtbError(f"PSI: floor must be > 0, got {floor}")
    expected = np.maximum(expected, floor)
    actual = np.maximum(actual, floor)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def unseen_share(values: pd.Series, known_levels: Iterable[str] | pd.Index) -> float:
    """Share of rows whose level (as text, gaps as `__missing__`) is not in `known_levels`.

    `known_levels` is what the model can encode (its encoder's vocabulary), not the profile's
    top-k: a level outside the top-k is "other" for PSI but perfectly known to the model.
    """
    levels, counts = level_counts(values)
    known = known_levels if isinstance(known_levels, pd.Index) else pd.Index(list(known_levels))
    if known.dtype != object:
        known = known.astype(str)
    unseen = known.get_indexer(levels) < 0
    total = counts.sum()
    return float(counts[unseen].sum() / total) if total else 0.0


# --------------------------------------------------------------------------- drift
@dataclass(frozen=True)
class DriftThresholds:
    """When a drift report counts as crossed: PSI (features and score) at or above `psi`, or an
    unseen share exceeding the reference's own rate of new levels by `unseen_share` or more."""

    psi: float = DEFAULT_PSI_THRESHOLD
    unseen_share: float = DEFAULT_UNSEEN_THRESHOLD
    # Below this many rows the statistics are sampling noise (a PSI over ~20 buckets moves by
    # about buckets/rows on its own): reported, never a reason.
    min_rows: int = DEFAULT_MIN_ROWS


@dataclass(frozen=True)
class DriftReport:
    """PSI per feature and of the score, unseen shares, and what crossed its threshold."""

    rows: int
    numeric_psi: dict[str, float]
    categorical_psi: dict[str, float]
    score_psi: float | None
    unseen_share: dict[str, float]
    thresholds: DriftThresholds = field(default_factory=DriftThresholds)

    @property
    def feature_psi(self) -> dict[str, float]:
        return {**self.numeric_psi, **self.categorical_psi}

    @property
    def features_over_psi(self) -> list[str]:
        """Features at or above the PSI threshold, largest PSI first."""
        psi = self.feature_psi
        over = [name for name, value in psi.items() if value >= self.thresholds.psi]
        return sorted(over, key=lambda name: -psi[name])

    # The reference's own rate of new levels per categorical (`ReferenceProfile.new_levels`);
    # an unseen share crosses when it exceeds that rate by the threshold.
    expected_unseen: dict[str, float] = field(default_factory=dict)

    def unseen_excess(self, name: str) -> float:
        return self.unseen_share[name] - self.expected_unseen.get(name, 0.0)

    @property
    def features_over_unseen(self) -> list[str]:
        limit = self.thresholds.unseen_share
        over = [name for name in self.unseen_share if self.unseen_excess(name) >= limit]
        return sorted(over, key=lambda name: -self.unseen_excess(name))

    @property
    def reasons(self) -> list[str]:
        """One line per crossing, e.g. "campaignId PSI 0.31 >= 0.2"; none on too few rows."""
        psi, t = self.feature_psi, self.thresholds
        if self.rows < t.min_rows:
            return []
        reasons = [f"{name} PSI {psi[name]:.3f} >= {t.psi:g}" for name in self.features_over_psi]
        if self.score_psi is not None and self.score_psi >= t.psi:
            reasons.append(f"score PSI {self.score_psi:.3f} >= {t.psi:g}")
        reasons += [
            f"unseen {name} {self.unseen_share[name]:.1%}, {self.unseen_excess(name):.1%} over the "
            f"window's own {self.expected_unseen.get(name, 0.0):.1%} of new levels (>= {t.unseen_share:.1%})"
            for name in self.features_over_unseen
        ]
        return reasons

    @property
    def crossed(self) -> bool:
        return bool(self.reasons)

    def summary(self) -> str:
        """One line for a task log, e.g. "drift: max PSI 0.31 (campaignId), score PSI 0.05,
        unseen campaignId 7.2%; 2 features over PSI 0.2 -> crossed"."""
        parts = []
        psi = self.feature_psi
        if psi:
            worst = max(psi, key=lambda name: psi[name])
            parts.append(f"max PSI {psi[worst]:.2f} ({worst})")
        if self.score_psi is not None:
            parts.append(f"score PSI {self.score_psi:.2f}")
        if self.unseen_share:
            name = max(self.unseen_share, key=lambda n: self.unseen_share[n])
            parts.append(f"unseen {name} {self.unseen_share[name]:.1%}")
        n_psi, n_unseen = len(self.features_over_psi), len(self.features_over_unseen)
        tail = f"{n_psi} feature{'s' if n_psi != 1 else ''} over PSI {self.thresholds.psi:g}"
        if self.unseen_share:
            tail += f", {n_unseen} over unseen {self.thresholds.unseen_share:.1%}"
        verdict = "crossed" if self.crossed else "ok"
        if self.rows < self.thresholds.min_rows:
            verdict = f"too few rows to judge (< {self.thresholds.min_rows:,})"
        return f"drift over {self.rows:,} rows: {', '.join(parts) or 'no features'}; {tail} -> {verdict}"

    def to_dict(self) -> dict[str, Any]:
        """Plain types for a YAML report."""
        payload: dict[str, Any] = {
            "rows": int(self.rows),
            "crossed": self.crossed,
            "reasons": self.reasons,
            "summary": self.summary(),
            "thresholds": {k: (int(v) if k == "min_rows" else float(v))
                           for k, v in asdict(self.thresholds).items()},
            "psi": {name: float(v) for name, v in self.feature_psi.items()},
            "unseen_share": {name: float(v) for name, v in self.unseen_share.items()},
            "expected_unseen_share": {name: float(v) for name, v in self.expected_unseen.items()},
        }
        if self.score_psi is not None:
            payload["score_psi"] = float(self.score_psi)
        return payload


def drift_report(
    frame: pd.DataFrame,
    profile: ReferenceProfile,
    *,
    scores: np.ndarray | pd.Series | None = None,
    known_levels: Mapping[str, Iterable[str] | pd.Index] | None = None,
    thresholds: DriftThresholds | None = None,
    floor: float = PSI_FLOOR,
) -> DriftReport:
    """Drift of a processed frame (and the scores served on it) from a reference profile.

    Every profiled feature must be in `frame`. The score PSI needs both `scores` and a profile
    built with scores; `known_levels` maps categoricals to the levels the model can encode.
    Cost: vectorised passes per column (a bincount of the codes for a categorical, one
    comparison per cut point for a numeric), then work per level or bin, never per row.
    """
    rows = len(frame)
    if rows == 0:
        raise RtbError("drift: the frame to compare has no rows")
    known_levels = dict(known_levels or {})
    check_columns(frame, [*profile.numeric, *profile.categorical, *known_levels], "frame")
    numeric_psi = {
        name: population_stability_index(
            bins.shares, _shares(bins.counts(numeric_values(frame[name]))), floor
        )
        for name, bins in profile.numeric.items()
    }
    categorical_psi = {
        name: population_stability_index(levels.shares, _shares(levels.counts(frame[name])), floor)
        for name, levels in profile.categorical.items()
    }
    score_psi = None
    if scores is not None:
        if profile.score is None:
            raise RtbError("drift: scores given, but the profile was built without scores")
        score_logits = logit(check_scores(scores, rows, "scores"))
        score_psi = population_stability_index(
            profile.score.shares, _shares(profile.score.counts(score_logits)), floor
        )
    unseen = {name: unseen_share(frame[name], known) for name, known in known_levels.items()}
    expected = {name: profile.new_levels[name] for name in unseen if name in profile.new_levels}
    return DriftReport(
        rows, numeric_psi, categorical_psi, score_psi, unseen, thresholds or DriftThresholds(), expected
    )


def _shares(counts: np.ndarray) -> np.ndarray:
    return counts / counts.sum()


# --------------------------------------------------------------------------- realised quality
@dataclass(frozen=True)
class QualityLimits:
    """The band a served model's realised calibration must stay in, and the NE it must beat."""

    calibration_low: float = DEFAULT_CALIBRATION_BAND[0]
    calibration_high: float = DEFAULT_CALIBRATION_BAND[1]
    ne_limit: float = DEFAULT_NE_LIMIT


@dataclass(frozen=True)
class RealisedQuality:
    """What the served probabilities were worth once the labels of their requests arrived."""

    rows: int
    positives: int
    calibration_ratio: float
    normalized_entropy: float
    limits: QualityLimits = field(default_factory=QualityLimits)

    @property
    def reasons(self) -> list[str]:
        """Why the model is stale; an undefined metric (labels all 0 or all 1) counts too:
        mean predicted over zero observed installs is an unbounded overprediction."""
        lim, reasons = self.limits, []
        ratio, ne = self.calibration_ratio, self.normalized_entropy
        if np.isnan(ratio):
            reasons.append(f"calibration undefined: no positives in {self.rows:,} rows")
        elif not lim.calibration_low <= ratio <= lim.calibration_high:
            reasons.append(
                f"calibration {ratio:.3f} outside [{lim.calibration_low:g}, {lim.calibration_high:g}]"
            )
        if np.isnan(ne):
            reasons.append(f"NE undefined: labels all {int(self.positives > 0)}")
        elif ne >= lim.ne_limit:
            reasons.append(f"NE {ne:.3f} >= {lim.ne_limit:g}")
        return reasons

    @property
    def stale(self) -> bool:
        return bool(self.reasons)

    def summary(self) -> str:
        """One line, e.g. "quality: 1,200 rows, 14 positives, calibration 1.04, NE 0.93 -> ok"."""
        verdict = "stale (" + "; ".join(self.reasons) + ")" if self.stale else "ok"
        return (
            f"quality: {self.rows:,} rows, {self.positives:,} positives, "
            f"calibration {self.calibration_ratio:.3f}, NE {self.normalized_entropy:.3f} -> {verdict}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": int(self.rows),
            "positives": int(self.positives),
            "calibration_ratio": float(self.calibration_ratio),
            "normalized_entropy": float(self.normalized_entropy),
            "stale": self.stale,
            "reasons": self.reasons,
            "limits": {k: float(v) for k, v in asdict(self.limits).items()},
        }


def realised_quality(
    y: np.ndarray | pd.Series,
    p: np.ndarray | pd.Series,
    *,
    limits: QualityLimits | None = None,
) -> RealisedQuality:
    """Rows, positives, calibration ratio and NE of served probabilities `p` on labels `y`.

    NE is reported as NaN when the labels are all one class: its denominator, the entropy of
    the base rate, is then zero.
    """
    labels = np.asarray(y)
    probs = np.asarray(p, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != probs.shape or labels.size == 0:
        raise RtbError(f"quality: labels of shape {labels.shape} and probabilities of shape "
                       f"{probs.shape}, expected two equal non-empty 1-D arrays")
    if not np.isin(labels, (0, 1)).all():
        raise RtbError("quality: labels must be 0 or 1")
    if not np.all((probs >= 0) & (probs <= 1)):
        raise RtbError("quality: probabilities must be in [0, 1] without NaN")
    labels = labels.astype(np.int8, copy=False)
    rows, positives = int(labels.size), int(labels.sum())
    ne = normalized_entropy(labels, probs) if 0 < positives < rows else float("nan")
    return RealisedQuality(
        rows, positives, calibration_ratio(labels, probs), ne, limits or QualityLimits()
    )


def quality_by_day(
    timestamps: pd.Series | pd.DatetimeIndex | np.ndarray,
    y: np.ndarray | pd.Series,
    p: np.ndarray | pd.Series,
    *,
    limits: QualityLimits | None = None,
) -> dict[str, RealisedQuality]:
    """`realised_quality` per UTC calendar day of the request timestamps, keyed "YYYY-MM-DD".

    One stable sort groups the rows; the Python loop runs once per day, not per row.
    """
    stamps = pd.DatetimeIndex(timestamps)
    if stamps.tz is not None:
        stamps = stamps.tz_convert("UTC").tz_localize(None)
    labels, probs = np.asarray(y), np.asarray(p)
    if not len(stamps) == len(labels) == len(probs):
        raise RtbError(f"quality: {len(stamps)} timestamps, {len(labels)} labels and "
                       f"{len(probs)} probabilities")
    if stamps.hasnans:
        raise RtbError("quality: timestamps must not be missing")
    days = stamps.to_numpy().astype("datetime64[D]")
    order = np.argsort(days, kind="stable")
    unique, starts = np.unique(days[order], return_index=True)
    bounds = [*starts[1:], len(order)]
    return {
        str(day): realised_quality(labels[order[lo:hi]], probs[order[lo:hi]], limits=limits)
        for day, lo, hi in zip(unique, starts, bounds, strict=True)
    }
