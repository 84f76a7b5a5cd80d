"""Fitting and selection: every candidate on the earliest rows, judged on the latest ones.

Validation is time-aware because RTB data drifts: each candidate is fitted on the earliest
rows (negatives downsampled) and scored on the latest `holdout_share` of them (the holdout).
Its Platt calibration is fitted on that holdout too, and the holdout metrics use
cross-fitted calibration so they stay honest. The blend candidate is made of two others'
fits (`blended_candidate`), so it costs no fit of its own. The candidate with the best
calibrated holdout log loss is selected; `refit_on_all_rows` then fits it again on every row
(the latest rows are the most like tomorrow's), keeping the holdout's Platt slope, its
intercept shifted by the change in negative sampling and anchored to the early fit's level
(`level_anchor`); `cross_validated` adds one shuffled K-fold `cross_validate` call for the
report. The rows come from `rtb.models.training_rows`, which applies the negative
downsampling while reading, so a long window costs the memory of its sample. All functions
here take data and return results; the CLI stage decides what runs beside what.
"""

from __future__ import annotations

import ctypes
import logging
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.base import clone
from sklearn.model_selection import StratifiedKFold, cross_validate
from sklearn.pipeline import Pipeline

from rtb.dataset_config import DatasetConfig
from rtb.errors import RtbError
from rtb.features import feature_frame
from rtb.models.calibration import (
    blend_weight,
    blended,
    cross_fitted_platt,
    fit_platt,
    mean_matching_shift,
)
from rtb.models.limits import DEFAULT_LIMITS, TrainingLimits
from rtb.models.metrics import (
    bootstrap_log_loss_uplift,
    cv_scoring,
    cv_summary,
    probability_metrics,
)
from rtb.models.pipeline import (
    BASELINE,
    BLEND,
    BLEND_MEMBERS,
    CANDIDATES,
    blend_of,
    build_pipeline,
    leave_one_out_log_odds,
)
from rtb.models.training_rows import TrainingRows, rows_from_frame
from rtb.progress import Progress

log = logging.getLogger(__name__)

# Relative fitting cost of the candidates; the longest start first so that none runs alone
# at the end.
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
    fitted_rows: np.ndarray  # positions, among the kept rows, of the rows it was fitted on
    holdout_log_odds: np.ndarray  # uncalibrated, what its Platt step was fitted on

    @property
    def fit_rows(self) -> int:
        return len(self.fitted_rows)

    def summary(self) -> dict[str, object]:
        return {
            "holdout": self.holdout,
            "holdout_uncalibrated": self.holdout_uncalibrated,
            "calibration": self.calibration,
            "fit_rows": self.fit_rows,
            "seconds": round(self.seconds, 2),
        }


SELECTION_RULE = "lowest calibrated log loss on the time holdout"


@dataclass
class Selection:
    """The candidates fitted on the early rows and the one selected, with the rows they saw
    (the kept rows of `rows`, see `rtb.models.training_rows`)."""

    selected: CandidateResult
    candidates: list[CandidateResult]
    rows: TrainingRows
    X: pd.DataFrame
    y: np.ndarray
    rule: str = SELECTION_RULE

    @property
    def frame(self) -> pd.DataFrame:
        """The kept rows, in time order."""
        return self.rows.frame

    @property
    def holdout(self) -> np.ndarray:
        """Boolean mask of the kept rows in the holdout (all of the holdout's rows)."""
        return self.rows.holdout

    @property
    def parts(self) -> tuple[str, str]:
        """How the early rows and the holdout are named."""
        return self.rows.plan.parts

    @property
    def y_holdout(self) -> np.ndarray:
        return self.y[self.holdout]

    @property
    def baseline(self) -> CandidateResult:
        return next(r for r in self.candidates if r.name == BASELINE)


def fit_candidate(
    name: str,
    cfg: DatasetConfig,
    X: pd.DataFrame,
    y: np.ndarray,
    holdout: np.ndarray,
    *,
    seed: int,
    limits: TrainingLimits,
) -> CandidateResult:
    """Fit on the early rows (negatives downsampled), calibrate and score on the holdout."""
    return fit_and_calibrate(name, build_pipeline(name, cfg, seed), X, y, holdout, seed=seed,
                             limits=limits)


def fit_and_calibrate(
    name: str,
    pipeline: Pipeline,
    X: pd.DataFrame,
    y: np.ndarray,
    holdout: np.ndarray,
    *,
    seed: int,
    limits: TrainingLimits,
) -> CandidateResult:
    """An unfitted pipeline fitted on the early rows (negatives downsampled), its Platt step
    fitted on the holdout and its holdout metrics cross-fitted: the one procedure behind every
    candidate's figures, and behind the champion's recipe when the promotion gate refits it on
    this run's rows to compare like with like."""
    started = time.perf_counter()
    fit_rows = negative_downsample(y, ~holdout, limits.fit_max_negatives, seed)
    pipeline.fit(X.iloc[fit_rows], y[fit_rows])
    log_odds = holdout_log_odds(pipeline, X[holdout], limits.score_chunk_rows)
    return calibrated_result(name, pipeline, log_odds, y[holdout], fit_rows, started, seed=seed)


def calibrated_result(
    name: str,
    pipeline: Pipeline,
    log_odds: np.ndarray,
    y_hold: np.ndarray,
    fit_rows: np.ndarray,
    started: float,
    *,
    seed: int,
    cross_fitted_on: np.ndarray | None = None,
) -> CandidateResult:
    """A fitted pipeline's Platt step fitted on its holdout log-odds, and its holdout figures
    with that step cross-fitted (so they stay honest); `cross_fitted_on` is what the
    cross-fitting redoes per fold when more than the Platt step was fitted on the holdout."""
    slope, intercept = fit_platt(log_odds, y_hold)
    pipeline.set_params(model__slope=slope, model__intercept=intercept)
    calibrated = cross_fitted_platt(log_odds if cross_fitted_on is None else cross_fitted_on,
                                    y_hold, seed)
    result = CandidateResult(
        name=name,
        pipeline=pipeline,
        holdout_probabilities=calibrated,
        holdout=probability_metrics(y_hold, calibrated),
        holdout_uncalibrated=probability_metrics(y_hold, expit(log_odds)),
        calibration={"method": "platt_on_log_odds", "slope": slope, "intercept": intercept},
        seconds=time.perf_counter() - started,
        fitted_rows=fit_rows,
        holdout_log_odds=log_odds,
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


def blended_candidate(linear: CandidateResult, trees: CandidateResult, y_hold: np.ndarray, *,
                      seed: int) -> CandidateResult:
    """`blend_target_encoded` from its two members as fitted for selection: no fit of its
    own; the weight of their log-odds and its Platt step fitted on the holdout (both redone
    in each fold of the cross-fitted holdout figures)."""
    if not np.array_equal(linear.fitted_rows, trees.fitted_rows):
        raise RtbError(f"{linear.name} and {trees.name} were fitted on different rows; "
                       "their blend needs the same")
    started = time.perf_counter()
    pair = np.column_stack([linear.holdout_log_odds, trees.holdout_log_odds])
    weight = blend_weight(pair, y_hold)
    log.info("%s: weight %.3f on %s, %.3f on %s", BLEND, weight, linear.name, 1 - weight,
             trees.name)
    pipeline = blend_of(linear.pipeline, trees.pipeline, linear_weight=weight)
    return calibrated_result(BLEND, pipeline, blended(pair, weight), y_hold, linear.fitted_rows,
                             started, seed=seed, cross_fitted_on=pair)


def holdout_log_odds(pipeline: Pipeline, X: pd.DataFrame, chunk_rows: int) -> np.ndarray:
    """The uncalibrated log-odds of every row, in chunks: the encoded float64 matrix of a
    large holdout would otherwise be held per candidate, and candidates fit two at a time."""
    chunks = [
        pipeline[-1].raw_log_odds(pipeline[:-1].transform(X.iloc[start : start + chunk_rows]))
        for start in range(0, len(X), chunk_rows)
    ]
    return np.concatenate(chunks) if chunks else np.empty(0)


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


def select_model(
    data: pd.DataFrame | TrainingRows,
    cfg: DatasetConfig,
    *,
    seed: int = 0,
    limits: TrainingLimits = DEFAULT_LIMITS,
    candidates: tuple[str, ...] = tuple(CANDIDATES),
    source: str = "train_df",
    holdout_starts: pd.Timestamp | None = None,
) -> Selection:
    """Training rows (or a processed frame, sampled here as `read_training_rows` samples a
    file) -> every candidate fitted on the early rows, scored on the holdout, and the one
    with the lowest calibrated holdout log loss selected.

    The holdout is the latest `limits.holdout_share` of rows, or with `holdout_starts` the
    rows from that moment on."""
    unknown = [name for name in candidates if name not in CANDIDATES]
    if BASELINE not in candidates:
        candidates = (BASELINE, *candidates)
    if unknown:
        raise RtbError(f"unknown candidate model(s) {unknown}; known: {list(CANDIDATES)}")
    rows = data if isinstance(data, TrainingRows) else rows_from_frame(
        data, cfg, limits, seed=seed, starts=holdout_starts, source=source)
    del data
    frame, holdout = rows.frame, rows.holdout
    y = frame[cfg.target].to_numpy().astype(np.int8)
    X = feature_frame(frame, cfg)
    log.info("training on %s; %d rows kept (%d early, %d holdout)", rows.plan.describe(),
             len(y), int((~holdout).sum()), int(holdout.sum()))
    # The blend is made of two candidates' fits, so those are fitted whether asked for or not.
    fitted = [name for name in candidates if name != BLEND]
    if BLEND in candidates:
        fitted += [name for name in BLEND_MEMBERS if name not in fitted]
    progress = Progress(log, "train", len(fitted))
    # Two candidates at a time: the linear ones spend their time in numpy/scipy kernels that
    # release the GIL and use one core each, so a second thread nearly halves the wall time.
    with ThreadPoolExecutor(max_workers=limits.fit_threads, thread_name_prefix="fit") as pool:
        futures = {
            pool.submit(fit_candidate, name, cfg, X, y, holdout, seed=seed, limits=limits): name
            for name in sorted(fitted, key=lambda name: -FIT_COST_HINT.get(name, 0))
        }
        for future in as_completed(futures):
            future.result()
            progress.advance(f"candidate {futures[future]}")
    by_name = {futures[future]: future.result() for future in futures}
    if BLEND in candidates:
        by_name[BLEND] = blended_candidate(*(by_name[name] for name in BLEND_MEMBERS),
                                           y[holdout], seed=seed)
    results = [by_name[name] for name in candidates]
    release_freed_memory()
    selected = min(results, key=lambda r: r.holdout["log_loss"])
    selected, rule = blend_only_beyond_noise(selected, results, y[holdout], seed=seed)
    log.info("selected %s (holdout log_loss %.5f)", selected.name, selected.holdout["log_loss"])
    return Selection(selected, results, rows, X, y, rule)


def blend_only_beyond_noise(selected: CandidateResult, results: list[CandidateResult],
                             y_hold: np.ndarray, *, seed: int) -> tuple[CandidateResult, str]:
    """The blend costs both its members' time in every refit and every prediction, so it
    replaces the better of them only when its holdout uplift over that member is beyond noise
    (the paired bootstrap's 95% interval above 0, as the report's comparisons are judged).
    Where its members are not among the candidates asked for, it stands as selected."""
    members = [r for r in results if r.name in BLEND_MEMBERS]
    if selected.name != BLEND or not members:
        return selected, SELECTION_RULE
    member = min(members, key=lambda r: r.holdout["log_loss"])
    uplift = bootstrap_log_loss_uplift(y_hold, selected.holdout_probabilities,
                                       member.holdout_probabilities, seed=seed)
    beyond_noise = uplift["ci95_low"] > 0
    log.info("%s over %s: holdout log-loss uplift %.3g (%.3f%%), 95%% interval [%.3g, %.3g]: %s",
             BLEND, member.name, uplift["uplift"], 100 * uplift["relative"], uplift["ci95_low"],
             uplift["ci95_high"], "blend kept" if beyond_noise else f"within noise, {member.name} kept")
    rule = (f"{SELECTION_RULE}; {BLEND} only where its uplift over its better member is beyond "
            f"noise (paired bootstrap 95% interval over {member.name}: "
            f"[{uplift['ci95_low']:.3g}, {uplift['ci95_high']:.3g}])")
    return (selected if beyond_noise else member), rule


def release_freed_memory() -> None:
    """Hand memory that fitted-and-dropped matrices left in the C heap back to the OS.

    glibc keeps freed blocks of a few MB in the process heap; after the candidate fits that
    is memory nobody uses, on top of which the refit and the cross-validation would
    allocate. A no-op where glibc's `malloc_trim` does not exist.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cross_validated(
    selection: Selection, *, cv_folds: int, seed: int, limits: TrainingLimits = DEFAULT_LIMITS
) -> dict[str, object]:
    """ONE `cross_validate` call, all metrics: shuffled K-fold on a uniform sample of the
    window's rows (drawn from `TrainingRows.uniform`, whatever the label), for the
    selected candidate without its holdout calibration (each fold refits on natural rows, so
    the Platt step tuned to the time holdout and to negative sampling does not apply)."""
    started = time.perf_counter()
    result, y = selection.selected, selection.y
    uniform = np.flatnonzero(selection.rows.uniform)
    rows = uniform[_cv_sample(len(uniform), seed, limits.cv_max_rows)]
    uncalibrated = clone(result.pipeline).set_params(model__slope=1.0, model__intercept=0.0)
    scores = cross_validate(
        uncalibrated,
        selection.X.iloc[rows],
        y[rows],
        cv=StratifiedKFold(cv_folds, shuffle=True, random_state=seed),
        scoring=cv_scoring(),
        error_score="raise",
    )
    summary = cv_summary(scores) | {
        "rows": int(len(rows)),
        "folds": cv_folds,
        "model": result.name,
        "of_rows": selection.rows.plan.rows,
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


def _cv_sample(n_rows: int, seed: int, max_rows: int) -> np.ndarray:
    if n_rows <= max_rows:
        return np.arange(n_rows)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_rows, size=max_rows, replace=False))


def refit_on_all_rows(
    selection: Selection, *, seed: int, limits: TrainingLimits = DEFAULT_LIMITS
) -> tuple[Pipeline, dict[str, object]]:
    """The selected pipeline fitted again on every row (negatives downsampled), calibrated.

    The Platt step keeps the slope learned on the holdout; its intercept moves by
    slope * log(kept share of negatives now / then), which is exactly how negative
    downsampling shifts a model's log-odds, and then by what `level_anchor` finds still
    between the two models' levels, so no second holdout is needed. "Every row" is
    `TrainingRows.sampled`: all positives and the read-time share of the negatives, the
    holdout's included, so the negatives of the refit are a uniform sample of the window's.
    """
    started = time.perf_counter()
    selected, y, holdout = selection.selected, selection.y, selection.holdout
    read_share = selection.rows.negative_share
    everything = selection.rows.sampled(y)
    rows = negative_downsample(y, everything, limits.refit_max_negatives, seed)
    kept_then = read_share * _negative_share(y, ~holdout, limits.fit_max_negatives)
    kept_now = read_share * _negative_share(y, everything, limits.refit_max_negatives)
    slope, intercept = selected.calibration["slope"], selected.calibration["intercept"]
    shift = float(np.log(kept_now / kept_then))
    model = clone(selected.pipeline)  # its recipe, with what selection chose (a blend's weight)
    model.fit(selection.X.iloc[rows], y[rows])
    model.set_params(model__slope=slope, model__intercept=intercept + slope * shift)
    anchor = level_anchor(selection, model, np.intersect1d(selected.fitted_rows, rows), seed=seed,
                          max_rows=limits.anchor_max_rows)
    model.set_params(model__intercept=intercept + slope * shift + anchor["shift"])
    refit = {
        "rows": int(len(rows)),
        "of_rows": selection.rows.plan.rows,
        "negatives_kept_share": kept_now,
        "early_fit_negatives_kept_share": kept_then,
        "platt_slope": slope,
        "platt_intercept": intercept + slope * shift + anchor["shift"],
        "level_anchor": anchor,
        "seconds": round(time.perf_counter() - started, 2),
        "note": f"holdout metrics are of the same pipeline fitted on the {selection.parts[0]}",
    }
    log.info(
        "%s: refitted on all %d rows (%d after downsampling negatives to %.3f); Platt intercept "
        "shifted by %.3f for the negative share and by %+.3f to the early fit's level on %d "
        "early rows (mean p %.5f, %.1f s); %.1f s",
        selected.name, selection.rows.plan.rows, len(rows), kept_now, slope * shift,
        anchor["shift"], anchor["rows"], anchor["early_fit_mean_probability"], anchor["seconds"],
        refit["seconds"],
    )
    return model, refit


def level_anchor(
    selection: Selection, refitted: Pipeline, both: np.ndarray, *, seed: int, max_rows: int
) -> dict[str, float | int]:
    """The log-odds shift that gives the refitted model the early fit's level.

    The early fit's Platt step was fitted where it is honest, on the holdout; the refit has no
    holdout left, and its level differs from the early fit's by more than the negative share
    (the target encoder fits on ordered statistics and scores with full totals, and that
    mismatch is not the same for a model fitted on more rows). So both models score the same
    rows, early rows both were fitted on (at most `max_rows`, classes weighted back to the
    early rows' natural mix), each row encoded as a new row of its levels would be
    (`leave_one_out_log_odds`: without its own label), and the refit is shifted until its mean
    probability there is the early fit's.
    """
    started = time.perf_counter()
    y, rows = selection.y, selection.rows
    if len(both) > max_rows:
        both = np.sort(np.random.default_rng(seed).choice(both, max_rows, replace=False))
    early = ~selection.holdout
    natural = {1: float(((y == 1) & early).sum()),
               0: float(((y == 0) & early).sum()) / rows.negative_share}
    taken = {c: max(int((y[both] == c).sum()), 1) for c in (0, 1)}
    weights = np.where(y[both] == 1, natural[1] / taken[1], natural[0] / taken[0])
    X, labels = selection.X.iloc[both], y[both].astype(np.float64)
    early_log_odds = leave_one_out_log_odds(selection.selected.pipeline, X, labels)
    target = float(np.average(expit(early_log_odds), weights=weights))
    shift = mean_matching_shift(leave_one_out_log_odds(refitted, X, labels), target, weights)
    return {"rows": int(len(both)), "early_fit_mean_probability": target, "shift": shift,
            "seconds": round(time.perf_counter() - started, 2)}


def _negative_share(y: np.ndarray, rows: np.ndarray, max_negatives: int) -> float:
    negatives = int((y[rows] == 0).sum())
    return min(1.0, max_negatives / negatives) if negatives else 1.0
