"""`rtb monitor`, the I/O side of the drift watch: which partitions to compare, against which
profile, where the reports go, and whether to ask for a retrain.

For every request partition of an interval that has its prediction set, the processed
hand-over and the served probabilities are compared with the champion's reference profile
(`reports/profile_<version>.yaml`, written by `rtb train`) and unseen levels are counted
against the champion model's own vocabularies; the report lands in
`reports/drift/<partition>.yaml`. Labelled days whose every hour was served get their
realised quality once, `reports/quality/date=D.yaml`. A crossed drift report or a stale day
asks for a retrain, but only once per champion (`reports/drift/retrain_requested_<version>
.yaml`): every hour of a drifted day would otherwise start a training of its own.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rtb import partitions, settings
from rtb.config import ProjectPaths
from rtb.data.make_dataset import read_partition
from rtb.data.preprocessing import read_processed
from rtb.dataset_config import DatasetConfig
from rtb.errors import RtbError
from rtb.io_utils import EXISTS, read_yaml, write_yaml
from rtb.models import registry
from rtb.monitoring.drift import DriftThresholds, QualityLimits, drift_report, realised_quality
from rtb.monitoring.profile import ReferenceProfile
from rtb.prediction_sets import PredictionSet, latest_test_set, partition_set

log = logging.getLogger(__name__)

DAY = timedelta(days=1)


@dataclass(frozen=True)
class MonitorLimits:
    """The drift thresholds and quality band a monitor run judges by."""

    drift: DriftThresholds
    quality: QualityLimits

    @classmethod
    def from_env(cls) -> MonitorLimits:
        """$RTB_DRIFT_PSI, $RTB_DRIFT_UNSEEN_SHARE, $RTB_DRIFT_MIN_ROWS,
        $RTB_QUALITY_CALIBRATION_LOW/HIGH."""
        low, high = settings.DEFAULT_QUALITY_CALIBRATION
        return cls(
            DriftThresholds(
                psi=settings.env_float(settings.DRIFT_PSI_ENV, settings.DEFAULT_DRIFT_PSI),
                unseen_share=settings.env_float(
                    settings.DRIFT_UNSEEN_SHARE_ENV, settings.DEFAULT_DRIFT_UNSEEN_SHARE
                ),
                min_rows=settings.env_int(settings.DRIFT_MIN_ROWS_ENV, settings.DEFAULT_DRIFT_MIN_ROWS),
            ),
            QualityLimits(
                calibration_low=settings.env_float(settings.QUALITY_CALIBRATION_LOW_ENV, low),
                calibration_high=settings.env_float(settings.QUALITY_CALIBRATION_HIGH_ENV, high),
            ),
        )


@dataclass
class Reference:
    """What drift is measured against: the champion, its profile (None if it has none) and
    the levels its model can encode per categorical column."""

    champion: registry.ModelEntry
    profile: ReferenceProfile | None
    known_levels: dict[str, pd.Index]


def load_reference(paths: ProjectPaths) -> Reference:
    """The verified champion with its profile and vocabularies."""
    from rtb.scoring.errors import NotTabulable
    from rtb.scoring.tables import tabulate

    champion = registry.load_champion_entry(paths)
    profile_path = paths.profile(champion.version)
    profile = None
    if profile_path.exists():
        profile = ReferenceProfile.from_dict(read_yaml(profile_path))
    else:
        log.warning("champion %s has no reference profile %s (trained before profiles were "
                    "written): no drift is measured and drift triggers no retrain",
                    champion.version, profile_path)
    known: dict[str, pd.Index] = {}
    if profile is not None:
        try:
            tables = tabulate(registry.load_verified(champion))
            known = dict(zip(tables.categorical, tables.vocabularies, strict=True))
        except NotTabulable as exc:
            log.warning("champion %s: vocabularies not readable (%s); unseen shares are not measured",
                        champion.version, exc)
    return Reference(champion, profile, known)


def without(profile: ReferenceProfile, features: tuple[str, ...]) -> ReferenceProfile:
    """The profile minus some features (e.g. `hour`, a single value within one hour)."""
    return dataclasses.replace(
        profile,
        numeric={k: v for k, v in profile.numeric.items() if k not in features},
        categorical={k: v for k, v in profile.categorical.items() if k not in features},
    )


def partition_drift(
    paths: ProjectPaths, cfg: DatasetConfig, name: str, reference: Reference, profile: ReferenceProfile,
    limits: MonitorLimits, served: Path | None,
) -> dict[str, Any]:
    """The drift report dict of one processed hand-over (with the probabilities served on it,
    `served`, if given)."""
    frame = read_processed(paths.processed_arrow(name), cfg, require_target=False, with_id=False)
    scores = None
    if served is not None and profile.score is not None:
        scores = np.load(served)
        if len(scores) != len(frame):
            raise RtbError(f"{served}: {len(scores)} probabilities for the {len(frame)} "
                           f"rows of {paths.processed_arrow(name)}; run `rtb predict` again")
    known = {k: v for k, v in reference.known_levels.items() if k in frame.columns}
    return drift_report(frame, profile, scores=scores, known_levels=known, thresholds=limits.drift).to_dict()


def run_monitor(
    paths: ProjectPaths,
    cfg: DatasetConfig,
    *,
    interval: tuple[datetime, datetime] | None,
    run_id: str | None,
    limits: MonitorLimits,
) -> dict[str, Any]:
    """CLI stage: drift reports of an interval's served partitions (or, without an interval,
    of the processed test split), realised quality of newly labelled days, and the retrain
    decision `{"retrain", "reasons", "champion"}`."""
    started = time.perf_counter()
    reference = load_reference(paths)
    version = reference.champion.version
    reasons: list[str] = []
    if interval is None:
        names = ["test"]
        exclude: tuple[str, ...] = ()
    else:
        start, end = interval
        names = [partitions.request_name(h) for h in partitions.hours_between(start, end)]
        exclude = (cfg.hour_feature,) if end - start < DAY else ()
    header = {
        "interval": None if interval is None else {"start": interval[0].isoformat(),
                                                   "end": interval[1].isoformat()},
        "run_id": run_id,
        "champion": version,
    }
    if reference.profile is not None:
        profile = without(reference.profile, exclude)
        checked = 0
        for name in names:
            found = latest_test_set(paths, version) if interval is None else partition_set(paths, name)
            if found is not None:
                served = found.probabilities
            elif interval is None:
                served = None  # drift of the features alone
            else:
                continue
            report = partition_drift(paths, cfg, name, reference, profile, limits, served)
            write_yaml(paths.drift_report(name), {**header, "partition": name, "excluded": list(exclude),
                                                  "scores": served is not None, "drift": report},
                       overwrite=True)
            log.info("%s: %s", name, report["summary"])
            reasons += [f"{name}: {reason}" for reason in report["reasons"]]
            checked += 1
        log.info("drift: %d of %d partition(s) of the interval have a prediction set and were "
                 "checked against profile_%s; %d crossed", checked, len(names), version,
                 len({r.split(': ')[0] for r in reasons}))
    if interval is not None:
        reasons += check_quality(paths, cfg, limits.quality, run_id)
    decision = retrain_decision(paths, version, reasons, run_id)
    log.info("monitor: retrain %s (%d reason(s)) for champion %s; %.1f s", decision["retrain"],
             len(reasons), version, time.perf_counter() - started)
    return decision


def retrain_decision(
    paths: ProjectPaths, version: str, reasons: list[str], run_id: str | None
) -> dict[str, Any]:
    """Retrain when there is a reason, unless one was already requested for this champion.

    The request record is created with link semantics (never overwritten), so of two monitor
    runs racing on the same champion exactly one asks."""
    decision: dict[str, Any] = {"retrain": False, "reasons": reasons, "champion": version}
    if not reasons:
        return decision
    record = paths.retrain_request(version)
    try:
        write_yaml(record, {"champion": version, "run_id": run_id, "reasons": reasons,
                            "requested_at": datetime.now().astimezone().isoformat()})
    except RtbError as exc:
        if EXISTS not in str(exc):
            raise
        previous = read_yaml(record)
        log.info("retrain already requested for champion %s by run %s (%s); not asking again",
                 version, previous.get("run_id"), "; ".join(previous.get("reasons") or [])[:300])
        decision["already_requested"] = True
        return decision
    decision["retrain"] = True
    log.info("retrain requested for champion %s: %s", version, "; ".join(reasons)[:500])
    return decision


# --------------------------------------------------------------------------- realised quality
def check_quality(
    paths: ProjectPaths, cfg: DatasetConfig, limits: QualityLimits, run_id: str | None
) -> list[str]:
    """Realised quality of every labelled day that is complete, fully served and not yet
    reported; the stale days' reasons."""
    reasons: list[str] = []
    for day in labelled_days(paths):
        out = paths.quality_report(day)
        if out.exists() or not partitions.is_complete(paths.raw_partition(partitions.labelled_name(day))):
            continue
        hours = partitions.hours_between(*_day_bounds(day))
        sets = [partition_set(paths, partitions.request_name(h)) for h in hours]
        if any(s is None for s in sets):
            continue
        payload = day_quality(paths, cfg, day, sets, limits)
        payload["run_id"] = run_id
        write_yaml(out, payload, overwrite=True)
        log.info("%s: %s", partitions.labelled_name(day), payload["summary"])
        reasons += [f"{partitions.labelled_name(day)}: {r}" for r in payload["quality"]["reasons"]]
    return reasons


def labelled_days(paths: ProjectPaths) -> list[date]:
    """The days that have a labelled partition folder, oldest first."""
    folder = paths.raw_dir / partitions.LABELLED
    if not folder.is_dir():
        return []
    days = []
    for entry in folder.iterdir():
        try:
            days.append(partitions.parse_partition(entry).day)
        except RtbError:
            continue
    return sorted(days)


def _day_bounds(day: date) -> tuple[datetime, datetime]:
    start = partitions.parse_hour(f"{day.isoformat()}T00:00")
    return start, start + DAY


def day_quality(
    paths: ProjectPaths, cfg: DatasetConfig, day: date, sets: list[PredictionSet], limits: QualityLimits
) -> dict[str, Any]:
    """Join the day's labels with what was served on its hours (by id) and judge it."""
    if not cfg.id:
        raise RtbError(f"{cfg.name}: realised quality joins labels to predictions by id; it has no id")
    labels = read_partition(paths.raw_partition(partitions.labelled_name(day)), cfg)
    ids = np.asarray(labels.column(cfg.id), dtype=object)
    truth = pd.Series(np.asarray(labels.column(cfg.target)), index=ids)
    frame = pd.concat([found.read_scored().to_pandas() for found in sets], ignore_index=True)
    models = sorted({found.model_version for found in sets})
    joined = truth.reindex(frame["id"].to_numpy())
    matched = joined.notna().to_numpy()
    if not matched.any():
        raise RtbError(f"{paths.raw_partition(partitions.labelled_name(day))}: none of its ids were "
                       "among the day's served predictions (expected the same requests)")
    quality = realised_quality(joined.to_numpy()[matched].astype(np.int8),
                               frame["probability"].to_numpy()[matched], limits=limits)
    return {
        "day": day.isoformat(),
        "labelled": partitions.labelled_name(day),
        "served_rows": int(len(frame)),
        "labelled_rows": int(len(truth)),
        "matched_rows": int(matched.sum()),
        "models": models,
        "summary": quality.summary(),
        "quality": quality.to_dict(),
    }
