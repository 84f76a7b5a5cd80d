"""Stage 3, the CLI side of training: read the hand-over, train, persist, promote if better.

The jobs live in their own modules: fitting and selection in `rtb.models.training`, the
report in `rtb.models.training_report`, the gate in `rtb.models.promotion`. This module does
the I/O and decides what runs beside what: the selected model's cross-validation only feeds
the report, so it runs while the model is refitted, pickled and drawn.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import joblib

from rtb.config import ProjectPaths, claim_version
from rtb.data.preprocessing import read_processed
from rtb.dataset_config import DatasetConfig
from rtb.io_utils import atomic_path, sha256_file, write_yaml
from rtb.models import registry
from rtb.models.promotion import compare_with_champion
from rtb.models.report_plots import write_report_plots
from rtb.models.training import (
    DEFAULT_LIMITS,
    Selection,
    TrainingLimits,
    cross_validated,
    in_time_order,
    refit_on_all_rows,
    select_model,
)
from rtb.models.training_report import build_report
from rtb.overlap import in_parallel

log = logging.getLogger(__name__)


def run_training(
    paths: ProjectPaths,
    cfg: DatasetConfig,
    *,
    cv_folds: int,
    seed: int,
    limits: TrainingLimits = DEFAULT_LIMITS,
) -> Path:
    """CLI stage: processed hand-over -> versioned pickle, plots and report; champion pointer
    if promoted. A failure takes back the new files this run wrote, never older ones."""
    started = time.perf_counter()
    source = paths.processed_arrow("train")
    frame, input_sha = in_parallel(  # hashing the input overlaps reading it
        lambda: read_processed(source, cfg, require_target=True, with_id=False),
        lambda: sha256_file(source) if source.exists() else None,
    )
    log.info("read %d rows from %s in %.1f s", len(frame), source, time.perf_counter() - started)
    frame = in_time_order(frame, cfg)  # rebinding lets the unsorted copy go before fitting
    selection = select_model(frame, cfg, seed=seed, limits=limits, source=str(source))
    del frame

    version = claim_version(lambda v: paths.model(v).exists() or paths.report(v).exists())
    written: list[Path] = []
    try:
        cv, (model, refit, entry) = in_parallel(
            lambda: cross_validated(selection, cv_folds=cv_folds, seed=seed, limits=limits),
            lambda: _refit_and_persist(paths, cfg, selection, version, seed, limits, written),
        )
        with registry.promotion_lock(paths):
            champion, decision = compare_with_champion(paths, cfg, selection, seed)
            artifacts = {
                "model": entry.path.name,
                "model_sha256": entry.sha256,
                "input": source.name,
                "input_sha256": input_sha,
            }
            report = build_report(
                version, cfg, selection, model=model, cv=cv, refit=refit, decision=decision,
                limits=limits, seed=seed, seconds=time.perf_counter() - started,
                artifacts=artifacts,
            )
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
    log.info(
        "wrote %s and %s; %s (%s); %.1f s in all",
        entry.path.name,
        report_path.name,
        "PROMOTED to champion" if decision["promoted"] else "kept on disk, NOT promoted",
        decision["reason"],
        time.perf_counter() - started,
    )
    return report_path


def _refit_and_persist(
    paths: ProjectPaths,
    cfg: DatasetConfig,
    selection: Selection,
    version: str,
    seed: int,
    limits: TrainingLimits,
    written: list[Path],
) -> tuple[object, dict[str, object], registry.ModelEntry]:
    """Refit the selected model on all rows, pickle it and draw its plots (appending every
    file written to `written`, for the caller's rollback)."""
    model, refit = refit_on_all_rows(selection, cfg, seed=seed, limits=limits)
    model_path = paths.model(version)
    with atomic_path(model_path) as tmp:
        joblib.dump(model, tmp, compress=3)
    written.append(model_path)
    entry = registry.ModelEntry(
        model_path, version, sha256_file(model_path), selection.selected.holdout["log_loss"]
    )
    written += write_report_plots(
        paths,
        version,
        selection.y_holdout,
        selection.selected.holdout_probabilities,
        model,
        {r.name: r.holdout_probabilities for r in selection.candidates},
    )
    return model, refit, entry
