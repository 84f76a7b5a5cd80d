"""Stage 3: fit every candidate, validate on the latest data, calibrate, promote if better.

Validation is time-aware because RTB data drifts: each candidate is fitted on the earliest
80% of rows and scored on the latest 20% (the holdout). Its Platt calibration is fitted on
that holdout too, and the holdout metrics use cross-fitted calibration so they stay honest.
One `cross_validate` call for the selected candidate adds shuffled K-fold metrics (on a row sample when the
data is large: the folds only need enough rows for a stable estimate).
The candidate with the best calibrated holdout log loss becomes this run's model: it is
refitted on all rows, so the model that scores tomorrow has seen today (the latest 20% is the
data most like the next day's), and keeps the Platt mapping learned on the holdout, shifted
by the change in negative sampling rate. It replaces the champion only if its holdout log loss
(of the early fit: the honest figure) also beats the champion's on the same holdout.
"""

from __future__ import annotations

import ctypes
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.base import clone
from sklearn.model_selection import StratifiedKFold, cross_validate
from sklearn.pipeline import Pipeline

from rtb.config import ProjectPaths, claim_version
from rtb.data.preprocessing import read_processed
from rtb.dataset_config import DatasetConfig
from rtb.errors import RtbError
from rtb.io_utils import atomic_path, sha256_file, write_yaml
from rtb.models import registry
from rtb.models.calibration import cross_fitted_platt, fit_platt
from rtb.models.metrics import (
    base_rate_entropy,
    bootstrap_log_loss_uplift,
    cv_scoring,
    cv_summary,
    probability_metrics,
    reliability_table,
)
from rtb.models.pipeline import BASELINE, CANDIDATES, build_pipeline, feature_frame
from rtb.models.report_plots import write_report_plots
from rtb.models.training_report import git_sha, library_versions, plain_params, segment_calibration
from rtb.progress import Progress

log = logging.getLogger(__name__)

HOLDOUT_SHARE = 0.2
CV_MAX_ROWS = 300_000
MAX_FIT_NEGATIVES = 300_000  # per candidate; selection is as good as with 600k, in half the time
REFIT_MAX_NEGATIVES = 600_000  # the shipped model
MIN_CLASS_ROWS = 5  # the holdout calibration is cross-fitted over 5 stratified folds
FIT_THREADS = 2
SCORE_CHUNK_ROWS = 250_000
# Relative fitting cost at 3.7M rows; the longest start first so that none runs alone at the end.
FIT_COST_HINT = {"gbm_target_encoded": 3, BASELINE: 2, "logreg_target_encoded": 1}


@dataclass
class CandidateResult:
    """One candidate's fitted pipeline and everything the report says about it."""

    name: str
    pipeline: Pipeline
    holdout_probabilities: np.ndarray
    holdout: dict[str, float]
    holdout_uncalibrated: dict[str, float]
    calibration: dict[str, float]
    seconds: float
    fit_rows: int
    cv: dict[str, object] | None = None

    def summary(self) -> dict[str, object]:
        return {
            "holdout": self.holdout,
            "holdout_uncalibrated": self.holdout_uncalibrated,
            "calibration": self.calibration,
            "fit_rows": self.fit_rows,
            "seconds": round(self.seconds, 2),
        }


@dataclass
class TrainResult:
    """Everything `train` decided; the CLI wrapper persists it."""

    selected: CandidateResult
    candidates: list[CandidateResult]
    frame: pd.DataFrame
    holdout: np.ndarray
    model: Pipeline
    refit: dict[str, object]
    cv_running: Future | None = None

    def wait_for_cv(self) -> None:
        """Block until the selected model's cross-validation (a background thread) is done."""
        if self.cv_running is not None:
            self.selected.cv = self.cv_running.result()
            self.cv_running = None


def time_holdout_split(stamps: pd.Series, share: float = HOLDOUT_SHARE) -> np.ndarray:
    """Boolean mask of the latest `share` of rows by timestamp (ties kept together)."""
    cutoff = stamps.quantile(1.0 - share)
    holdout = (stamps > cutoff).to_numpy()
    if not holdout.any() or holdout.all():
        order = np.argsort(stamps.to_numpy(), kind="stable")
        holdout = np.zeros(len(stamps), dtype=bool)
        holdout[order[int(len(stamps) * (1.0 - share)) :]] = True
    return holdout


def _check_trainable(y: np.ndarray, holdout: np.ndarray, source: str, target: str) -> None:
    for label, rows in (("earliest 80%", ~holdout), ("latest 20% (holdout)", holdout)):
        positives = int(y[rows].sum())
        if positives < MIN_CLASS_ROWS or positives > rows.sum() - MIN_CLASS_ROWS:
            raise RtbError(
                f"{source}: column {target!r} has {positives} positives in the {label} of "
                f"{int(rows.sum())} rows; need at least {MIN_CLASS_ROWS} of each class in both "
                "parts to train and calibrate"
            )


def fit_candidate(
    name: str,
    cfg: DatasetConfig,
    X: pd.DataFrame,
    y: np.ndarray,
    holdout: np.ndarray,
    *,
    seed: int,
) -> CandidateResult:
    """Fit on the early rows (negatives downsampled), calibrate and score on the holdout."""
    started = time.perf_counter()
    pipeline = build_pipeline(name, cfg, seed)
    fit_rows = negative_downsample(y, ~holdout, MAX_FIT_NEGATIVES, seed)
    pipeline.fit(X.iloc[fit_rows], y[fit_rows])
    X_hold, y_hold = X[holdout], y[holdout]
    log_odds = holdout_log_odds(pipeline, X_hold)
    slope, intercept = fit_platt(log_odds, y_hold)
    pipeline.set_params(model__slope=slope, model__intercept=intercept)
    calibrated = cross_fitted_platt(log_odds, y_hold, seed)
    result = CandidateResult(
        name=name,
        pipeline=pipeline,
        holdout_probabilities=calibrated,
        holdout=probability_metrics(y_hold, calibrated),
        holdout_uncalibrated=probability_metrics(y_hold, expit(log_odds)),
        calibration={"method": "platt_on_log_odds", "slope": slope, "intercept": intercept},
        seconds=time.perf_counter() - started,
        fit_rows=int(len(fit_rows)),
    )
    log.info(
        "%s: holdout log_loss %.5f, NE %.4f, AUC %.4f, calibration %.3f (fitted on %d rows); %.1f s",
        name,
        result.holdout["log_loss"],
        result.holdout["normalized_entropy"],
        result.holdout["roc_auc"],
        result.holdout["calibration_ratio"],
        len(fit_rows),
        result.seconds,
    )
    return result


def holdout_log_odds(pipeline: Pipeline, X: pd.DataFrame) -> np.ndarray:
    """The uncalibrated log-odds of every row, in chunks: the encoded float64 matrix of a
    740k-row holdout is ~180 MB per candidate, and candidates fit two at a time."""
    chunks = [
        pipeline[-1].raw_log_odds(pipeline[:-1].transform(X.iloc[start : start + SCORE_CHUNK_ROWS]))
        for start in range(0, len(X), SCORE_CHUNK_ROWS)
    ]
    return np.concatenate(chunks) if chunks else np.empty(0)


def cross_validated(
    result: CandidateResult, X: pd.DataFrame, y: np.ndarray, *, cv_folds: int, seed: int
) -> dict[str, object]:
    """ONE `cross_validate` call, all metrics: shuffled K-fold on a row sample, for the
    selected candidate without its holdout calibration (each fold refits on natural rows, so
    the Platt step tuned to the time holdout and to negative sampling does not apply)."""
    started = time.perf_counter()
    rows = _cv_sample(len(y), seed)
    uncalibrated = clone(result.pipeline).set_params(model__slope=1.0, model__intercept=0.0)
    scores = cross_validate(
        uncalibrated,
        X.iloc[rows],
        y[rows],
        cv=StratifiedKFold(cv_folds, shuffle=True, random_state=seed),
        scoring=cv_scoring(),
        error_score="raise",
    )
    summary = cv_summary(scores) | {
        "rows": int(len(rows)),
        "folds": cv_folds,
        "model": result.name,
        "note": "shuffled folds flatter a model on drifting data; promotion uses the time holdout",
    }
    log.info(
        "%s: %d-fold CV on %d rows: log_loss %.5f +- %.5f, AUC %.4f; %.1f s",
        result.name,
        cv_folds,
        len(rows),
        summary["log_loss"]["mean"],
        summary["log_loss"]["std"],
        summary["roc_auc"]["mean"],
        time.perf_counter() - started,
    )
    return summary


def negative_downsample(y: np.ndarray, rows: np.ndarray, max_negatives: int, seed: int) -> np.ndarray:
    """Row indices (in time order) of every positive and at most `max_negatives` negatives.

    With 1% positives most of the fitting time goes into negatives that teach little; keeping
    a random share of them is standard practice for ad logs (He et al. 2014, "Practical
    lessons from predicting clicks on ads at Facebook"). It only shifts the model's log-odds
    by log(share), which the Platt step, fitted on the untouched holdout, takes back out.
    """
    candidates = np.flatnonzero(rows)
    negatives = candidates[y[candidates] == 0]
    if len(negatives) <= max_negatives:
        return candidates
    rng = np.random.default_rng(seed)
    kept = rng.choice(negatives, size=max_negatives, replace=False)
    return np.sort(np.concatenate([candidates[y[candidates] == 1], kept]))


def _cv_sample(n_rows: int, seed: int) -> np.ndarray:
    if n_rows <= CV_MAX_ROWS:
        return np.arange(n_rows)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_rows, size=CV_MAX_ROWS, replace=False))


def in_time_order(frame: pd.DataFrame, cfg: DatasetConfig) -> pd.DataFrame:
    """Rows sorted by timestamp (stable): target encodings of a row may only use earlier rows.

    A frame already in order is returned as is, saving a copy of the whole training set.
    """
    if frame[cfg.timestamp].is_monotonic_increasing:
        return frame
    return frame.sort_values(cfg.timestamp, kind="stable", ignore_index=True)


def train(
    frame: pd.DataFrame,
    cfg: DatasetConfig,
    *,
    cv_folds: int = 3,
    seed: int = 0,
    candidates: tuple[str, ...] = tuple(CANDIDATES),
    source: str = "train_df.csv",
) -> TrainResult:
    """Pure core: processed frame -> every candidate fitted and scored, the best selected."""
    unknown = [name for name in candidates if name not in CANDIDATES]
    if BASELINE not in candidates:
        candidates = (BASELINE, *candidates)
    if unknown:
        raise RtbError(f"unknown candidate model(s) {unknown}; known: {list(CANDIDATES)}")
    frame = in_time_order(frame, cfg)
    y = frame[cfg.target].to_numpy().astype(np.int8)
    holdout = time_holdout_split(frame[cfg.timestamp])
    _check_trainable(y, holdout, source, cfg.target)
    X = feature_frame(frame, cfg)
    log.info(
        "training on %d rows (%d early, %d holdout after %s), base rate %.4f",
        len(y),
        int((~holdout).sum()),
        int(holdout.sum()),
        frame[cfg.timestamp][holdout].min(),
        y.mean(),
    )
    progress = Progress(log, "train", len(candidates) + 1)
    # Two candidates at a time: the linear ones spend their time in numpy/scipy kernels that
    # release the GIL and use one core each, so a second thread nearly halves the wall time.
    with ThreadPoolExecutor(max_workers=FIT_THREADS, thread_name_prefix="fit") as pool:
        futures = {
            pool.submit(fit_candidate, name, cfg, X, y, holdout, seed=seed): name
            for name in sorted(candidates, key=lambda name: -FIT_COST_HINT.get(name, 0))
        }
        for future in as_completed(futures):
            future.result()
            progress.advance(f"candidate {futures[future]}")
    by_name = {futures[future]: future.result() for future in futures}
    results = [by_name[name] for name in candidates]
    release_freed_memory()
    selected = min(results, key=lambda r: r.holdout["log_loss"])
    log.info("selected %s (holdout log_loss %.5f)", selected.name, selected.holdout["log_loss"])
    # The cross-validation only feeds the report, so it runs in the background during the
    # refit and while the caller persists the model and draws the plots; `wait_for_cv` collects it.
    cv_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cv")
    cv_running = cv_thread.submit(cross_validated, selected, X, y, cv_folds=cv_folds, seed=seed)
    cv_running.add_done_callback(lambda _: progress.advance("cross-validation"))
    cv_thread.shutdown(wait=False)
    model, refit = refit_on_all_rows(selected, cfg, X, y, holdout, seed=seed)
    return TrainResult(
        selected=selected,
        candidates=results,
        frame=frame,
        holdout=holdout,
        model=model,
        refit=refit,
        cv_running=cv_running,
    )


def release_freed_memory() -> None:
    """Hand memory that fitted-and-dropped matrices left in the C heap back to the OS.

    glibc keeps freed blocks of a few MB in the process heap; after three candidate fits that
    is a few hundred MB of resident memory nobody uses, on top of which the refit and the
    cross-validation would allocate. A no-op where glibc's `malloc_trim` does not exist.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def refit_on_all_rows(
    selected: CandidateResult,
    cfg: DatasetConfig,
    X: pd.DataFrame,
    y: np.ndarray,
    holdout: np.ndarray,
    *,
    seed: int,
) -> tuple[Pipeline, dict[str, object]]:
    """The selected pipeline fitted again on every row (negatives downsampled), calibrated.

    The Platt step keeps the slope learned on the holdout; its intercept moves by
    slope * log(kept share of negatives now / then), which is exactly how negative
    downsampling shifts a model's log-odds, so no second holdout is needed.
    """
    started = time.perf_counter()
    everything = np.ones(len(y), dtype=bool)
    rows = negative_downsample(y, everything, REFIT_MAX_NEGATIVES, seed)
    kept_then = _negative_share(y, ~holdout, MAX_FIT_NEGATIVES)
    kept_now = _negative_share(y, everything, REFIT_MAX_NEGATIVES)
    slope, intercept = selected.calibration["slope"], selected.calibration["intercept"]
    shift = float(np.log(kept_now / kept_then))
    model = build_pipeline(selected.name, cfg, seed)
    model.fit(X.iloc[rows], y[rows])
    model.set_params(model__slope=slope, model__intercept=intercept + slope * shift)
    refit = {
        "rows": int(len(rows)),
        "of_rows": int(len(y)),
        "negatives_kept_share": kept_now,
        "early_fit_negatives_kept_share": kept_then,
        "platt_slope": slope,
        "platt_intercept": intercept + slope * shift,
        "seconds": round(time.perf_counter() - started, 2),
        "note": "holdout metrics are of the same pipeline fitted on the earliest 80% of rows",
    }
    log.info(
        "%s: refitted on all %d rows (%d after downsampling negatives to %.3f); Platt intercept "
        "shifted by %.3f; %.1f s",
        selected.name, len(y), len(rows), kept_now, slope * shift, refit["seconds"],
    )
    return model, refit


def _negative_share(y: np.ndarray, rows: np.ndarray, max_negatives: int) -> float:
    negatives = int((y[rows] == 0).sum())
    return min(1.0, max_negatives / negatives) if negatives else 1.0


def _compare_with_champion(
    paths: ProjectPaths,
    cfg: DatasetConfig,
    frame: pd.DataFrame,
    holdout: np.ndarray,
    selected: CandidateResult,
    seed: int,
) -> tuple[registry.ModelEntry | None, dict[str, object]]:
    """Score the current champion on this run's holdout; promote only if we beat it."""
    champion = registry.current_champion(paths.models_dir)
    if champion is None:
        return None, {"promoted": True, "reason": "no champion yet"}
    model = registry.load_verified(champion)
    y_hold = frame[cfg.target].to_numpy()[holdout]
    try:
        p_champion = model.predict_proba(feature_frame(frame, cfg)[holdout])[:, 1]
    except (KeyError, ValueError) as exc:
        reason = f"champion {champion.path.name} cannot score this data ({exc}); replacing it"
        return champion, {"promoted": True, "reason": reason}
    champion_metrics = probability_metrics(y_hold, p_champion)
    p_new = selected.holdout_probabilities
    uplift = bootstrap_log_loss_uplift(y_hold, p_new, p_champion, seed=seed)
    better = selected.holdout["log_loss"] < champion_metrics["log_loss"]
    reason = (
        f"holdout log_loss {selected.holdout['log_loss']:.5f} vs champion "
        f"{champion_metrics['log_loss']:.5f}: {'better' if better else 'not better'}"
    )
    decision = {
        "promoted": bool(better),
        "reason": reason,
        "champion_holdout": champion_metrics,
        "uplift_vs_champion": uplift,
        "note": "the champion may have seen these holdout rows, which favours keeping it",
    }
    return champion, decision


def _report(
    version: str,
    cfg: DatasetConfig,
    result: TrainResult,
    decision: dict[str, object],
    seed: int,
    started: float,
    artifacts: dict[str, object],
) -> dict[str, object]:
    """The report YAML's content: every number a reviewer needs to trust or reject the model."""
    selected, frame, holdout = result.selected, result.frame, result.holdout
    y_hold = frame[cfg.target].to_numpy()[holdout]
    baseline = next(r for r in result.candidates if r.name == BASELINE)
    return {
        "version": version,
        "dataset": cfg.name,
        "model": selected.name,
        "selected": {
            "name": selected.name,
            "holdout_log_loss": selected.holdout["log_loss"],
            "rule": "lowest calibrated log loss on the time holdout",
        },
        "cv": selected.cv,
        "holdout": selected.holdout,
        "candidates": {r.name: r.summary() for r in result.candidates},
        "comparison": {
            "baseline": BASELINE,
            "baseline_holdout_log_loss": baseline.holdout["log_loss"],
            "uplift_vs_baseline": bootstrap_log_loss_uplift(
                y_hold,
                selected.holdout_probabilities,
                baseline.holdout_probabilities,
                seed=seed,
            ),
        },
        "promotion": decision,
        "calibration": {
            **selected.calibration,
            "fitted_on": "time holdout (latest 20% of rows)",
            "overall_ratio": selected.holdout["calibration_ratio"],
            "by_segment": segment_calibration(
                frame[holdout], y_hold, selected.holdout_probabilities, cfg
            ),
            "reliability": reliability_table(y_hold, selected.holdout_probabilities),
        },
        "data": {
            "rows": len(frame),
            "train_rows": int((~holdout).sum()),
            "holdout_rows": int(holdout.sum()),
            "fit_max_negatives": MAX_FIT_NEGATIVES,
            "refit_max_negatives": REFIT_MAX_NEGATIVES,
            "base_rate": float(frame[cfg.target].mean()),
            "base_rate_entropy": base_rate_entropy(frame[cfg.target].to_numpy()),
            "holdout_starts": str(frame[cfg.timestamp][holdout].min()),
            "features": cfg.feature_columns,
        },
        "refit": result.refit,
        "params": plain_params(result.model),
        "training_seconds": round(time.perf_counter() - started, 2),
        "environment": {"libraries": library_versions(), "git_sha": git_sha()},
        "artifacts": artifacts,
    }


def run_training(paths: ProjectPaths, cfg: DatasetConfig, *, cv_folds: int, seed: int) -> Path:
    """CLI stage: processed CSV -> versioned pickle + report; champion pointer if promoted."""
    started = time.perf_counter()
    source = paths.processed("train")
    hasher = ThreadPoolExecutor(max_workers=1)  # hashing the ~600 MB input overlaps the work
    hashing = hasher.submit(sha256_file, source) if source.exists() else None
    hasher.shutdown(wait=False)
    frame = read_processed(source, cfg, require_target=True, with_id=False)
    log.info("read %d rows from %s in %.1f s", len(frame), source, time.perf_counter() - started)
    frame = in_time_order(frame, cfg)  # rebinding lets the unsorted copy go before fitting
    result = train(frame, cfg, cv_folds=cv_folds, seed=seed, source=str(source))
    selected, frame, holdout = result.selected, result.frame, result.holdout
    y_hold = frame[cfg.target].to_numpy()[holdout]

    version = claim_version(lambda v: paths.model(v).exists() or paths.report(v).exists())
    model_path = paths.model(version)
    written: list[Path] = []
    try:
        with atomic_path(model_path) as tmp:
            joblib.dump(result.model, tmp, compress=3)
        written.append(model_path)
        model_sha = sha256_file(model_path)
        entry = registry.ModelEntry(model_path, version, model_sha, selected.holdout["log_loss"])
        written += write_report_plots(
            paths.reports_dir,
            version,
            y_hold,
            selected.holdout_probabilities,
            result.model,
            {r.name: r.holdout_probabilities for r in result.candidates},
        )
        result.wait_for_cv()
        with registry.promotion_lock(paths.models_dir):
            champion, decision = _compare_with_champion(paths, cfg, frame, holdout, selected, seed)
            artifacts = {
                "model": model_path.name,
                "model_sha256": model_sha,
                "input": source.name,
                "input_sha256": hashing.result() if hashing else None,
            }
            report = _report(version, cfg, result, decision, seed, started, artifacts)
            report_path = paths.report(version)
            write_yaml(report_path, report)
            written.clear()  # model and report now stand as a pair, promoted or not
            if decision["promoted"]:
                registry.promote(paths.models_dir, entry, champion)
    except BaseException:
        # A model version without its report is unusable: take back what this run wrote (new
        # versioned files only, never anything that existed before).
        for path in written:
            path.unlink(missing_ok=True)
        raise
    log.info(
        "wrote %s and %s; %s (%s); %.1f s in all",
        model_path.name,
        report_path.name,
        "PROMOTED to champion" if decision["promoted"] else "kept on disk, NOT promoted",
        decision["reason"],
        time.perf_counter() - started,
    )
    return report_path
