"""Batch scoring of the target-encoded logistic regression as table lookups and one dot product.

`pipeline.predict_proba` on millions of rows materialises every encoded column in float32,
scales it, stacks it with the numeric block in float64 and multiplies by the coefficients.
For `logreg_target_encoded` all of that folds into one table per encoded group: the table
holds each level's *contribution to the log-odds* (encoding, scaling and coefficient
applied once per level, in the same float32 steps sklearn takes), so a row costs one gather
per group plus the small numeric block. `rtb predict` uses it when the pipeline has exactly
that shape and the first rows agree with `predict_proba` to 1e-9; otherwise it keeps using
the pipeline. The compiled per-request scorer (`rtb.serving.compiled`) is the one-row
counterpart of the same idea.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from rtb.models.encoders import DENSE_MAX_KEYS, SmoothedTargetEncoder
from rtb.models.pipeline import LogitRecalibrated, _log1p_nonnegative

AGREEMENT = 1e-9


class LinearTargetEncodedScorer:
    """Probability of install for a processed frame, equal to the pipeline's to ~1e-12."""

    def __init__(self, pipeline: Pipeline) -> None:
        shape = _linear_target_encoded_parts(pipeline)
        if shape is None:
            raise ValueError("not a fitted target-encoded logistic regression pipeline")
        self.encoder, te_scaler, self.imputer, num_scaler, model, self.columns = shape
        self.calibration = (float(pipeline[-1].slope), float(pipeline[-1].intercept))
        weights = model.coef_.ravel().astype(np.float64)
        width = 2 * len(self.encoder.tables_)
        te_weights, self.numeric_weights = weights[:width], weights[width:]
        self.intercept = float(model.intercept_[0])
        if num_scaler is not None:
            self.numeric_mean, self.numeric_scale = num_scaler.mean_, num_scaler.scale_
        mean32, scale32 = te_scaler.mean_.astype(np.float32), te_scaler.scale_.astype(np.float32)
        prior = float(np.log(self.encoder.prior_ / (1.0 - self.encoder.prior_)))

        def contribution(odds: np.ndarray, counts: np.ndarray, p: int) -> np.ndarray:
            odds32 = (odds.astype(np.float32) - mean32[2 * p]) / scale32[2 * p]
            counts32 = (counts.astype(np.float32) - mean32[2 * p + 1]) / scale32[2 * p + 1]
            return (te_weights[2 * p] * odds32.astype(np.float64)
                    + te_weights[2 * p + 1] * counts32.astype(np.float64))

        # Per group: each level's contribution, the contribution of an unseen level, and (for
        # key spaces up to DENSE_MAX_KEYS) the same laid out by key, so lookups need no hashing.
        self.tables: list[tuple[np.ndarray, float, np.ndarray | None]] = []
        for p, (group, (levels, odds, counts)) in enumerate(
            zip(self.encoder._groups(), self.encoder.tables_, strict=True)
        ):
            by_level = contribution(odds, counts, p)
            unseen = float(contribution(np.array([prior]), np.array([0.0]), p)[0])
            size = int(np.prod([self.encoder.radix_[name] for name in group], dtype=np.float64))
            by_key = None
            if size <= DENSE_MAX_KEYS:
                by_key = np.full(size, unseen)
                by_key[levels] = by_level
            self.tables.append((by_level, unseen, by_key))

    def log_odds(self, X: pd.DataFrame) -> np.ndarray:
        """Uncalibrated log-odds (what the Platt step is applied to)."""
        frame = pd.DataFrame(X)
        codes = self.encoder._level_codes(frame[list(self.encoder.feature_names_in_)])
        z = np.full(len(frame), self.intercept)
        for position, (group, (levels, _, _)) in enumerate(
            zip(self.encoder._groups(), self.encoder.tables_, strict=True)
        ):
            by_level, unseen, by_key = self.tables[position]
            key = self.encoder._group_keys(codes, group)
            if by_key is not None:
                z += by_key[key]
                continue
            slot = self.encoder._level_index(position, levels).get_indexer(key)
            z += np.where(slot >= 0, by_level[slot], unseen)
        if len(self.numeric_weights):
            numeric = frame[self.columns].to_numpy(dtype=np.float32, copy=True)
            fills = self.imputer.statistics_.astype(np.float32)
            gaps = np.isnan(numeric)
            numeric[gaps] = np.broadcast_to(fills, numeric.shape)[gaps]
            scaled = (_log1p_nonnegative(numeric) - self.numeric_mean) / self.numeric_scale
            z += scaled @ self.numeric_weights
        return z

    def predict_positive(self, X: pd.DataFrame) -> np.ndarray:
        slope, intercept = self.calibration
        return expit(slope * self.log_odds(X) + intercept)


def batch_scorer(pipeline: object, sample: pd.DataFrame) -> LinearTargetEncodedScorer | None:
    """The fast scorer if `pipeline` has the right shape and agrees with it on `sample`."""
    if not isinstance(pipeline, Pipeline) or _linear_target_encoded_parts(pipeline) is None:
        return None
    expected = pipeline.predict_proba(sample)[:, 1]  # a KeyError here is the caller's to report
    try:
        scorer = LinearTargetEncodedScorer(pipeline)
        fast = scorer.predict_positive(sample)
    except (ValueError, AttributeError, KeyError, IndexError, TypeError):
        return None  # an unexpected inner shape: the pipeline itself scores
    if not np.allclose(fast, expected, rtol=0, atol=AGREEMENT):
        return None
    return scorer


def _linear_target_encoded_parts(pipeline: Pipeline) -> tuple | None:
    """The fitted steps of build_logreg_target_encoded's pipeline, or None for any other shape."""
    if len(pipeline.steps) != 2:
        return None
    features, calibrated = pipeline.steps[0][1], pipeline.steps[1][1]
    if not isinstance(features, ColumnTransformer) or not isinstance(calibrated, LogitRecalibrated):
        return None
    model = getattr(calibrated, "estimator_", None)
    if not isinstance(model, LogisticRegression) or model.coef_.shape[0] != 1:
        return None
    fitted = getattr(features, "transformers_", None)
    if fitted is None:
        return None
    blocks = [(name, step, cols) for name, step, cols in fitted if name != "remainder"]
    remainder = [step for name, step, _ in fitted if name == "remainder"]
    if remainder and remainder[0] != "drop" or len(blocks) not in (1, 2):
        return None
    target = blocks[0][1]
    if not (
        isinstance(target, Pipeline)
        and len(target.steps) == 2
        and isinstance(target.steps[0][1], SmoothedTargetEncoder)
        and isinstance(target.steps[1][1], StandardScaler)
    ):
        return None
    imputer = num_scaler = None
    columns: list[str] = []
    if len(blocks) == 2:
        numeric = blocks[1][1]
        steps = [step for _, step in getattr(numeric, "steps", [])]
        if not (
            len(steps) == 3
            and isinstance(steps[0], SimpleImputer)
            and not steps[0].add_indicator
            and isinstance(steps[1], FunctionTransformer)
            and steps[1].func is _log1p_nonnegative
            and isinstance(steps[2], StandardScaler)
        ):
            return None
        imputer, num_scaler, columns = steps[0], steps[2], list(blocks[1][2])
    return target.steps[0][1], target.steps[1][1], imputer, num_scaler, model, columns
