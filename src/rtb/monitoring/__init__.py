"""Drift watch: how far scored requests are from the champion's training window, and what the
served probabilities were worth once labels arrived (`rtb.monitoring.drift`), measured
against a reference profile of the training window (`rtb.monitoring.profile`)."""

from rtb.monitoring.drift import (
    DriftReport,
    DriftThresholds,
    QualityLimits,
    RealisedQuality,
    drift_report,
    population_stability_index,
    quality_by_day,
    realised_quality,
    unseen_share,
)
from rtb.monitoring.profile import (
    CategoricalLevels,
    NumericBins,
    ReferenceProfile,
    build_profile,
    profile_training_window,
)

__all__ = [
    "CategoricalLevels",
    "DriftReport",
    "DriftThresholds",
    "NumericBins",
    "QualityLimits",
    "RealisedQuality",
    "ReferenceProfile",
    "build_profile",
    "drift_report",
    "population_stability_index",
    "profile_training_window",
    "quality_by_day",
    "realised_quality",
    "unseen_share",
]
