"""Stage 3, the CLI side of training: read the hand-over, train, persist, promote if better.

The jobs live in their own modules: fitting and selection in `rtb.models.training`, the
report in `rtb.models.training_report`, the gate in `rtb.models.promotion`. This module does
the I/O and decides what runs beside what: the model code is imported while the rows are
read, and what only feeds the report (cross-validation, drift profile, the holdout's plots)
runs while the selected model is refitted, pickled and tabulated.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import joblib
import pandas as pd

from rtb import partitions, settings
from rtb.config import ProjectPaths, claimed_version
from rtb.data.make_dataset import META_SOURCE_FILES, META_SOURCE_SHA
from rtb.data.preprocessing import hand_over_info
from rtb.dataset_config import DatasetConfig
from rtb.errors import RtbError
from rtb.io_utils import atomic_path, sha256_file, write_yaml
from rtb.models import registry
from rtb.models.limits import DEFAULT_LIMITS, TrainingLimits
from rtb.models.training_rows import read_training_rows
from rtb.monitoring.profile import build_profile, new_level_shares, profile_training_window
from rtb.overlap import in_parallel

if TYPE_CHECKING:
    from rtb.models.training import Selection

# What fits, judges, reports and draws: sklearn, LightGBM and matplotlib take about a second
# to import, so `run_training` imports these while it reads the rows, and the functions below
# name what they use of them where they use it.
MODEL_CODE = (
    "lightgbm",
    "rtb.models.training",
    "rtb.models.promotion",
    "rtb.models.training_report",
    "rtb.models.report_plots",
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingWindow:
    """The labelled days one partitioned training run reads: the `days` UTC days before
    `end`'s UTC date (Airflow's data-interval end of the train run)."""

    end: datetime
    days: int

    @property
    def dates(self) -> list[date]:
        return partitions.window_days(self.end, self.days)

    def describe(self) -> str:
        dates = self.dates
        return f"training window {dates[0]} to {dates[-1]} ({self.days} days before {self.end.isoformat()})"


@dataclass
class WindowData:
    """A training window's hand-overs and the record of exactly which partitions they are."""

    sources: list[Path]  # the processed hand-overs, in day order
    section: dict[str, object]  # the report's `window` section
    holdout_day: date
    holdout_partition: str
    inputs: dict[str, str]  # processed hand-over -> its sha256


def find_window(paths: ProjectPaths, window: TrainingWindow) -> WindowData:
    """The processed hand-overs of the window's days that exist; the latest present day is
    the holdout. Fewer than two days leave nothing to hold out: an error."""
    names = {day: partitions.labelled_name(day) for day in window.dates}
    present = [day for day, name in names.items() if paths.processed_arrow(name).exists()]
    missing = [names[day] for day in window.dates if day not in present]
    if missing:
        log.warning("%s: %d of %d days have no processed hand-over and are left out: %s",
                    window.describe(), len(missing), window.days, ", ".join(missing))
    if len(present) < 2:
        raise RtbError(
            f"{window.describe()}: {len(present)} day(s) with a processed hand-over under "
            f"{paths.processed_dir / partitions.LABELLED}; need at least 2 (the latest is the holdout)"
        )
    sources = [paths.processed_arrow(names[day]) for day in present]
    described = [_window_partition(names[day], path) for day, path in zip(present, sources, strict=True)]
    section = {
        "end": window.end.isoformat(),
        "days": window.days,
        "first_day": window.dates[0].isoformat(),
        "last_day": window.dates[-1].isoformat(),
        "holdout": names[present[-1]],
        "partitions": described,
        "missing": missing,
    }
    inputs = {names[day]: sha256_file(path) for day, path in zip(present, sources, strict=True)}
    return WindowData(sources, section, present[-1], names[present[-1]], inputs)


def _window_partition(name: str, hand_over: Path) -> dict[str, object]:
    """One partition of the window as the report lists it: the raw files behind it and rows."""
    meta, rows = hand_over_info(hand_over)
    if META_SOURCE_SHA.decode() not in meta or META_SOURCE_FILES.decode() not in meta:
        raise RtbError(f"{hand_over}: lacks the raw input's sha256 in its metadata (written by an "
                       f"older rtb); run `rtb make-dataset --partition {name}` and `rtb preprocess "
                       f"--partition {name}` again")
    return {
        "name": name,
        "sha256": meta[META_SOURCE_SHA.decode()],
        "files": json.loads(meta[META_SOURCE_FILES.decode()]),
        "rows": rows,
    }


def reference_profile(selection: Selection, cfg: DatasetConfig, version: str) -> dict[str, object]:
    """The drift reference of a trained model: every feature over a uniform sample of the
    rows of its window (all of them when the window is small), and the score distribution
    from the selected candidate's calibrated holdout probabilities.

    Those are out-of-sample scores on the latest rows, which is what serving looks like (the
    shipped refit would score its own training rows in-sample, more spread than it ever is
    on new requests). The rate of new levels compares the holdout with every early row,
    kept or not."""
    rows = selection.rows
    uniform = rows.uniform
    profile = profile_training_window(rows.frame if uniform.all() else rows.frame[uniform], cfg)
    scores = build_profile(
        pd.DataFrame(index=pd.RangeIndex(int(selection.holdout.sum()))), numeric=[], categorical=[],
        scores=selection.selected.holdout_probabilities,
    ).score
    new_levels = new_level_shares(rows.frame[rows.holdout], rows.early_levels)
    return {
        "version": version,
        "model": selection.selected.name,
        "features_from": f"{profile.rows} rows, a uniform {rows.negative_share:.4f} share of the "
                         f"window's {rows.plan.rows}",
        "scores_from": f"{selection.selected.name} fitted on the {selection.parts[0]}, calibrated "
                       f"(cross-fitted Platt), on the {selection.parts[1]}",
        **dataclasses.replace(profile, score=scores, new_levels=new_levels).to_dict(),
    }


def _default_candidates() -> tuple[str, ...]:
    """The default candidates plus the optional ones $RTB_EXTRA_CANDIDATES names."""
    from rtb.models.pipeline import CANDIDATES, DEFAULT_CANDIDATES, OPTIONAL_CANDIDATES

    extra = settings.extra_candidates()
    unknown = [name for name in extra if name not in CANDIDATES]
    if unknown:
        raise RtbError(f"${settings.EXTRA_CANDIDATES_ENV}: unknown candidate(s) {unknown}; "
                       f"optional ones: {list(OPTIONAL_CANDIDATES)}")
    return DEFAULT_CANDIDATES + tuple(name for name in extra if name not in DEFAULT_CANDIDATES)


def run_training(
    paths: ProjectPaths,
    cfg: DatasetConfig,
    *,
    cv_folds: int,
    seed: int,
    limits: TrainingLimits = DEFAULT_LIMITS,
    window: TrainingWindow | None = None,
    trigger_reason: str | None = None,
    candidates: tuple[str, ...] | None = None,
) -> Path:
    """CLI stage: processed hand-over (or a window of daily ones) -> versioned pickle, plots,
    report and drift profile; champion pointer if promoted. A failure takes back the new files
    this run wrote, never older ones. `candidates` narrows the selection (default: the default
    candidates and those $RTB_EXTRA_CANDIDATES adds; the baseline always takes part)."""
    started = time.perf_counter()
    if trigger_reason:
        log.info("training triggered: %s", trigger_reason)
    holdout_starts = holdout_partition = data = None
    if window is None:
        source = paths.processed_arrow("train")
        rows, input_sha, _ = in_parallel(  # hashing the input and importing overlap reading it
            lambda: read_training_rows([source], cfg, limits, seed=seed),
            lambda: sha256_file(source) if source.exists() else None,
            _import_model_code,
        )
        label: object = source.name
    else:
        data = find_window(paths, window)
        source = paths.processed_dir / partitions.LABELLED
        holdout_starts = pd.Timestamp(data.holdout_day.isoformat(), tz="UTC")
        holdout_partition = data.holdout_partition
        log.info("%s: %d of %d days, holdout %s", window.describe(), len(data.section["partitions"]),
                 window.days, holdout_partition)
        rows, _ = in_parallel(
            lambda: read_training_rows(data.sources, cfg, limits, seed=seed, starts=holdout_starts),
            _import_model_code,
        )
        input_sha, label = data.inputs, list(data.inputs)
    log.info("read %d rows from %s, kept %d, in %.1f s", rows.plan.rows, source, len(rows.frame),
             time.perf_counter() - started)
    from rtb.models.promotion import compare_with_champion, promotion_line
    from rtb.models.report_plots import write_report_plots
    from rtb.models.training import select_model
    from rtb.models.training_report import build_report

    selection = select_model(rows, cfg, seed=seed, limits=limits, source=str(source),
                             holdout_starts=holdout_starts,
                             candidates=_default_candidates() if candidates is None else candidates)
    del rows

    def taken(version: str) -> bool:
        return paths.model(version).exists() or paths.report(version).exists()

    with claimed_version(paths.models_dir, taken) as version:
        written: list[Path] = []
        try:
            # What only feeds the report (cross-validation, drift profile, the holdout's plots,
            # the bootstrap against the baseline) runs while the model is refitted and pickled;
            # the importance plot needs the refitted model and is drawn after (matplotlib draws
            # one figure at a time).
            (cv, profile), (model, refit, entry, comparison) = in_parallel(
                lambda: _report_side(paths, cfg, selection, version, cv_folds, seed, limits, written),
                lambda: _refit_and_persist(paths, cfg, selection, version, seed, limits, written),
            )
            written += write_report_plots(paths, version, selection.y_holdout,
                                          selection.selected.holdout_probabilities, model,
                                          kinds=("importance",))
            profile_path = paths.profile(version)
            write_yaml(profile_path, profile)
            written.append(profile_path)
            with registry.promotion_lock(paths):
                champion, decision = compare_with_champion(
                    paths, cfg, selection, seed, challenger=entry, inputs=input_sha,
                    holdout_partition=holdout_partition, limits=limits,
                )
                tables = refit["scoring_tables"]
                artifacts = {
                    "model": entry.path.name,
                    "model_sha256": entry.sha256,
                    "scoring_tables": tables["file"],
                    "scoring_tables_sha256": tables.get("sha256"),
                    "input": label,
                    "input_sha256": input_sha,
                    "profile": profile_path.name,
                }
                report = build_report(
                    version, cfg, selection, model=model, cv=cv, comparison=comparison, refit=refit,
                    decision=decision, limits=limits, seconds=time.perf_counter() - started,
                    artifacts=artifacts,
                )
                if data is not None:
                    report["window"] = data.section
                if trigger_reason:
                    report["trigger"] = {"reason": trigger_reason}
                report_path = paths.report(version)
                write_yaml(report_path, report)
                written.clear()  # model and report now stand as a pair, promoted or not
                if decision["promoted"]:
                    registry.promote(paths, entry, champion)
        except BaseException:
            # A model version without its report is unusable: take back what this run wrote.
            for path in written:
                path.unlink(missing_ok=True)
            raise
    log.info("wrote %s and %s; %.1f s in all", entry.path.name, report_path.name,
             time.perf_counter() - started)
    log.info("%s", promotion_line(entry, champion, decision))
    return report_path


def _import_model_code() -> None:
    for name in MODEL_CODE:
        importlib.import_module(name)


def _report_side(
    paths: ProjectPaths,
    cfg: DatasetConfig,
    selection: Selection,
    version: str,
    cv_folds: int,
    seed: int,
    limits: TrainingLimits,
    written: list[Path],
) -> tuple[dict[str, object], dict[str, object]]:
    """The cross-validation, the drift profile and the holdout's plots (appended to
    `written`): what the report needs of the selection, not of the refit."""
    from rtb.models.report_plots import HOLDOUT_KINDS, write_report_plots
    from rtb.models.training import cross_validated

    cv = cross_validated(selection, cv_folds=cv_folds, seed=seed, limits=limits)
    profile = reference_profile(selection, cfg, version)
    written += write_report_plots(
        paths,
        version,
        selection.y_holdout,
        selection.selected.holdout_probabilities,
        None,
        {r.name: r.holdout_probabilities for r in selection.candidates},
        kinds=HOLDOUT_KINDS,
    )
    return cv, profile


def _refit_and_persist(
    paths: ProjectPaths,
    cfg: DatasetConfig,
    selection: Selection,
    version: str,
    seed: int,
    limits: TrainingLimits,
    written: list[Path],
) -> tuple[object, dict[str, object], registry.ModelEntry, dict[str, object]]:
    """Refit the selected model on all rows and pickle it (appending the file to `written`,
    for the caller's rollback); then the bootstrap against the baseline, which this side has
    time for while the other cross-validates."""
    from rtb.models.training import refit_on_all_rows
    from rtb.models.training_report import baseline_comparison

    model, refit = refit_on_all_rows(selection, seed=seed, limits=limits)
    model_path = paths.model(version)
    with atomic_path(model_path) as tmp:
        joblib.dump(model, tmp, compress=3)
    written.append(model_path)
    entry = registry.ModelEntry(
        model_path, version, sha256_file(model_path), selection.selected.holdout["log_loss"]
    )
    refit["scoring_tables"] = _write_scoring_tables(paths, cfg, selection, model, version, written)
    return model, refit, entry, baseline_comparison(selection, seed)


def _write_scoring_tables(
    paths: ProjectPaths, cfg: DatasetConfig, selection: Selection, model: object, version: str,
    written: list[Path],
) -> dict[str, object]:
    """The refitted model's scoring tables, written beside it once they reproduce its
    `predict_proba` on the holdout's latest rows and on the service's probe rows (unseen and
    missing levels, gaps, extreme numbers): `rtb predict` then scores through them without
    unpickling the pipeline. What was done, for the report (`file`, `sha256`, or `reason`)."""
    from rtb.features import rows_frame
    from rtb.scoring import agreement
    from rtb.scoring.batch import batch_scorer
    from rtb.serving.scorer import probe_rows

    holdout = selection.X[selection.holdout].iloc[-agreement.CHECK_ROWS:]
    probes = rows_frame(probe_rows(model, cfg), cfg)
    scorer = batch_scorer(model, holdout)
    if scorer is None:
        return {"file": None, "reason": "the model does not tabulate or its tables disagree"}
    expected = model.predict_proba(probes)[:, 1]
    if not agreement.agrees(scorer.predict_positive(probes), expected):
        return {"file": None, "reason": "the tables disagree with predict_proba on probe rows"}
    path = paths.scoring_tables(version)
    with atomic_path(path) as tmp:
        joblib.dump(scorer.tables, tmp, compress=3)
    written.append(path)
    rows = len(holdout) + len(probes)
    log.info("wrote %s (equal to predict_proba within %.0e on %d holdout and probe rows)",
             path.name, agreement.AGREEMENT, rows)
    return {"file": path.name, "sha256": sha256_file(path), "checked_rows": rows}
