"""The candidate model pipelines. Each is a complete sklearn Pipeline from processed frame to
probability: `pipeline.predict_proba(processed_df)` is the whole scoring path.

- `logreg_onehot`: the baseline users expect (one-hot ids + scaled counts + logistic
  regression). Kept in every report so that progress is measured against it.
- `logreg_target_encoded`: smoothed target encodings of ids and their crosses, log counts,
  logistic regression. Robust on small data, cheap to serve.
- `gbm_target_encoded`: the same encodings plus raw numerics into LightGBM, which finds the
  non-linear recency and history effects and their interactions.

Every pipeline ends in `LogitRecalibrated`, a Platt step on the log-odds whose two parameters
are fitted on the latest (held-out) data, so probabilities match current install rates.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
from scipy.special import expit, logit
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sklearn.utils.validation import check_is_fitted

from rtb.dataset_config import DatasetConfig
from rtb.models.encoders import SmoothedTargetEncoder, SparseOneHotEncoder
from rtb.models.transforms import log1p_nonnegative

BASELINE = "logreg_onehot"
PROBABILITY_FLOOR = 1e-7


class LogitRecalibrated(ClassifierMixin, BaseEstimator):
    """Wrap a classifier and map its probability p to expit(slope * logit(p) + intercept).

    slope/intercept are hyper-parameters set from a time holdout (Platt scaling on the
    log-odds), so the step stays a plain Pipeline member that sklearn can clone and refit.
    """

    def __init__(self, estimator: BaseEstimator, slope: float = 1.0, intercept: float = 0.0):
        self.estimator = estimator
        self.slope = slope
        self.intercept = intercept

    def fit(self, X: object, y: np.ndarray) -> LogitRecalibrated:
        self.estimator_ = clone(self.estimator).fit(X, y)
        self.classes_ = self.estimator_.classes_
        return self

    def raw_log_odds(self, X: object) -> np.ndarray:
        """Uncalibrated log-odds of the wrapped model (what the calibration is fitted on)."""
        check_is_fitted(self, "estimator_")
        if hasattr(self.estimator_, "decision_function"):
            return np.asarray(self.estimator_.decision_function(X), dtype=np.float64)
        proba = self.estimator_.predict_proba(X)[:, 1]
        return logit(np.clip(proba, PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR))

    def predict_proba(self, X: object) -> np.ndarray:
        positive = expit(self.slope * self.raw_log_odds(X) + self.intercept)
        return np.column_stack([1.0 - positive, positive])

    def predict(self, X: object) -> np.ndarray:
        return self.classes_[(self.predict_proba(X)[:, 1] >= 0.5).astype(int)]


def leave_one_out_log_odds(pipeline: Pipeline, X: object, y: np.ndarray) -> np.ndarray:
    """Calibrated log-odds of a fitted candidate on rows it was fitted on, scored as new rows
    of the same levels would be: each target-encoded block through the encoder's
    `transform_leave_one_out` (no row's own label in its encodings), every other block
    through its usual transform. What the refit's level is compared on (see
    `rtb.models.training.refit_on_all_rows`)."""
    features, calibrated = pipeline.named_steps["features"], pipeline[-1]
    blocks = []
    for name, transformer, columns in features.transformers_:
        if transformer == "drop" or (name == "remainder" and not len(columns)):
            continue
        part = X[columns]
        steps = transformer.steps if isinstance(transformer, Pipeline) else [(name, transformer)]
        if isinstance(steps[0][1], SmoothedTargetEncoder):
            block = steps[0][1].transform_leave_one_out(part, y)
            for _, step in steps[1:]:
                block = step.transform(block)
        else:
            block = part.to_numpy() if transformer == "passthrough" else transformer.transform(part)
        blocks.append(block)
    if features.sparse_output_:  # stacked as the fitted ColumnTransformer stacks its blocks
        matrix = sp.hstack([sp.csr_matrix(block) for block in blocks], format="csr")
    else:
        matrix = np.hstack([block.toarray() if sp.issparse(block) else np.asarray(block)
                            for block in blocks])
    return calibrated.slope * calibrated.raw_log_odds(matrix) + calibrated.intercept


# Models pickled before the function moved to `rtb.models.transforms` name it here, some by
# its old private name.
_log1p_nonnegative = log1p_nonnegative


def median_or_zero(values: np.ndarray) -> float:
    """Imputation value of a numeric column: the median of its values, 0 if it has none.

    A plain function as SimpleImputer's strategy because strategy="median" goes through
    numpy.ma's full sort, a noticeable part of every full-size training run; np.median
    partitions instead.
    """
    return float(np.median(values)) if len(values) else 0.0


def _numeric_block(*, log_counts: bool) -> Pipeline:
    """Impute, compress heavy tails (counts), scale."""
    steps: list = [SimpleImputer(strategy=median_or_zero, keep_empty_features=True)]
    if log_counts:
        steps.append(FunctionTransformer(log1p_nonnegative, feature_names_out="one-to-one"))
    steps.append(StandardScaler())
    return make_pipeline(*steps)


def _with_numeric(cfg: DatasetConfig, head: tuple[str, object, list[str]], numeric: object) -> list:
    blocks = [head]
    if cfg.feature_numerical:
        blocks.append(("numeric", numeric, cfg.feature_numerical))
    return blocks


def build_logreg_onehot(cfg: DatasetConfig, seed: int = 0) -> Pipeline:
    features = ColumnTransformer(
        _with_numeric(
            cfg,
            ("onehot", SparseOneHotEncoder(min_frequency=1), cfg.categorical),
            _numeric_block(log_counts=False),
        ),
        sparse_threshold=1.0,
    )
    model = LogisticRegression(C=1.0, max_iter=200, tol=1e-4)
    return Pipeline([("features", features), ("model", LogitRecalibrated(model))])


def _target_encoder(cfg: DatasetConfig, seed: int) -> SmoothedTargetEncoder:
    return SmoothedTargetEncoder(crosses=tuple(tuple(c) for c in cfg.crosses), smoothing="auto")


def build_logreg_target_encoded(cfg: DatasetConfig, seed: int = 0) -> Pipeline:
    features = ColumnTransformer(
        _with_numeric(
            cfg,
            ("target", make_pipeline(_target_encoder(cfg, seed), StandardScaler()),
             cfg.categorical),
            _numeric_block(log_counts=True),
        )
    )
    model = LogisticRegression(C=1.0, max_iter=300, tol=1e-5)
    return Pipeline([("features", features), ("model", LogitRecalibrated(model))])


def build_gbm_target_encoded(cfg: DatasetConfig, seed: int = 0) -> Pipeline:
    features = ColumnTransformer(
        _with_numeric(cfg, ("target", _target_encoder(cfg, seed), cfg.categorical), "passthrough")
    )
    from lightgbm import LGBMClassifier  # a slow import; scoring a linear champion never needs it

    model = LGBMClassifier(
        n_estimators=120,
        learning_rate=0.08,
        num_leaves=15,
        min_child_samples=400,
        min_child_weight=1.0,
        subsample=0.5,
        subsample_freq=1,
        colsample_bytree=0.8,
        reg_lambda=5.0,
        max_bin=63,
        n_jobs=2,
        random_state=seed,
        verbose=-1,
    )
    return Pipeline([("features", features), ("model", LogitRecalibrated(model))])


CANDIDATES: dict[str, Callable[[DatasetConfig, int], Pipeline]] = {
    BASELINE: build_logreg_onehot,
    "logreg_target_encoded": build_logreg_target_encoded,
    "gbm_target_encoded": build_gbm_target_encoded,
}


def build_pipeline(name: str, cfg: DatasetConfig, seed: int = 0) -> Pipeline:
    """A fresh, unfitted candidate pipeline by name."""
    return CANDIDATES[name](cfg, seed)

