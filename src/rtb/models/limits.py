"""How much data each step of training uses: the knobs that trade time for precision."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TrainingLimits:
    """`holdout_max_rows` bounds the time holdout (the latest rows, ties kept together; a
    million rows still hold about 12k installs at a 1.2% base rate), so that with the two
    limits below train's memory is bounded, not grown by the window.
    `fit_max_negatives` bounds every candidate's fit (selection comes out the same as with
    twice as many, in half the time); `refit_max_negatives` bounds the shipped model's refit;
    together they bound the rows training keeps while reading (`rtb.models.training_rows`).
    `min_class_rows` is what the 5-fold cross-fitted calibration needs of each class on each
    side of the time split. `cv_max_rows` bounds the report's cross-validation, which decides
    nothing: with the GBM selected, its folds on 300k rows outlasted the refit beside them.
    `anchor_max_rows` bounds the early rows on which the refit takes over the early fit's level
    (the mean of 150k probabilities is known to a fraction of a percent).
    """

    holdout_share: float = 0.2
    holdout_max_rows: int = 1_000_000
    fit_max_negatives: int = 300_000
    refit_max_negatives: int = 600_000
    cv_max_rows: int = 150_000
    anchor_max_rows: int = 150_000
    min_class_rows: int = 5
    score_chunk_rows: int = 250_000
    fit_threads: int = 2


DEFAULT_LIMITS = TrainingLimits()
