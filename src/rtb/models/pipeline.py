"""The candidate model pipelines. Each is a complete sklearn Pipeline from processed frame to
probability: `pipeline.predict_proba(processed_df)` is the whole scoring path.

- `logreg_onehot`: the baseline users expect (one-hot ids + scaled counts + logistic
  regression). Kept in every report so that progress is measured against it.
- `logreg_target_encoded`: smoothed target encodings of ids and their crosses, log counts,
  logistic regression. Robust on small data, cheap to serve.
- `gbm_target_encoded`: the same encodings plus raw numerics into LightGBM, which finds the
  non-linear recency and history effects and their interactions.
- `blend_target_encoded` (optional, `OPTIONAL_CANDIDATES`): both of the above on one set of
  encodings, their log-odds mixed by a weight fitted on the holdout (`LinearTreeBlend`). The
  two err differently (the linear model extrapolates smoothly over rare levels, the trees find
  shapes), so where neither dominates the blend beats both; the time holdout decides whether
  it does on the data at hand.

Every pipeline ends in `LogitRecalibrated`, a Platt step on the log-odds whose two parameters
are fitted on the latest (held-out) data, so probabilities match current install rates.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
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


def _linear_model() -> LogisticRegression:
    return LogisticRegression(C=1.0, max_iter=300, tol=1e-5)


def build_logreg_target_encoded(cfg: DatasetConfig, seed: int = 0) -> Pipeline:
    features = ColumnTransformer(
        _with_numeric(
            cfg,
            ("target", make_pipeline(_target_encoder(cfg, seed), StandardScaler()),
             cfg.categorical),
            _numeric_block(log_counts=True),
        )
    )
    return Pipeline([("features", features), ("model", LogitRecalibrated(_linear_model()))])


def _trees(seed: int) -> BaseEstimator:
    from lightgbm import LGBMClassifier  # a slow import; scoring a linear champion never needs it

    return LGBMClassifier(
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


def _encoded_with_raw_numerics(cfg: DatasetConfig, seed: int) -> ColumnTransformer:
    return ColumnTransformer(
        _with_numeric(cfg, ("target", _target_encoder(cfg, seed), cfg.categorical), "passthrough")
    )


def build_gbm_target_encoded(cfg: DatasetConfig, seed: int = 0) -> Pipeline:
    return Pipeline([("features", _encoded_with_raw_numerics(cfg, seed)),
                     ("model", LogitRecalibrated(_trees(seed)))])


class LinearTreeBlend(ClassifierMixin, BaseEstimator):
    """A logistic regression (`linear`) and LightGBM (`trees`) on the same matrix (target
    encodings, then `n_numeric` raw numeric columns), their log-odds mixed with
    `linear_weight` on the linear one.

    The linear side sees what `logreg_target_encoded` sees (encodings standardised; numerics
    imputed, log-compressed and standardised by the same `_numeric_block`), the trees what
    `gbm_target_encoded` sees. So the blend of two candidates fitted on the same rows needs no
    fit of its own (`from_members`), and as one estimator behind one set of encodings it
    calibrates, refits, re-anchors and tabulates as any other candidate.
    """

    def __init__(self, linear: BaseEstimator, trees: BaseEstimator, n_numeric: int = 0,
                 linear_weight: float = 0.5):
        self.linear = linear
        self.trees = trees
        self.n_numeric = n_numeric
        self.linear_weight = linear_weight

    def fit(self, X: np.ndarray, y: np.ndarray) -> LinearTreeBlend:
        encoded, numeric = self._split(np.asarray(X))
        self.scaler_ = StandardScaler().fit(encoded)
        self.numeric_ = _numeric_block(log_counts=True).fit(numeric) if numeric.shape[1] else None
        self.linear_ = clone(self.linear).fit(self._linear_input(encoded, numeric), y)
        self.trees_ = clone(self.trees).fit(X, y)
        self.classes_ = self.trees_.classes_
        return self

    @classmethod
    def from_members(cls, linear: Pipeline, trees: Pipeline, *, linear_weight: float = 0.5
                     ) -> LinearTreeBlend:
        """The blend of a fitted `logreg_target_encoded` and `gbm_target_encoded` (fitted on
        the same rows, so their encodings are the same), without fitting anything."""
        blocks = linear.named_steps["features"].named_transformers_
        numeric = blocks.get("numeric")
        blend = cls(linear[-1].estimator, trees[-1].estimator,
                    n_numeric=0 if numeric is None else len(numeric.feature_names_in_),
                    linear_weight=linear_weight)
        blend.scaler_ = blocks["target"][-1]
        blend.numeric_ = numeric
        blend.linear_ = linear[-1].estimator_
        blend.trees_ = trees[-1].estimator_
        blend.classes_ = blend.trees_.classes_
        return blend

    def _split(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cut = X.shape[1] - self.n_numeric
        return X[:, :cut], X[:, cut:]

    def _linear_input(self, encoded: np.ndarray, numeric: np.ndarray) -> np.ndarray:
        blocks = [self.scaler_.transform(encoded)]
        if self.numeric_ is not None:
            names = getattr(self.numeric_, "feature_names_in_", None)  # a member's was named
            frame = numeric if names is None else pd.DataFrame(numeric, columns=names)
            blocks.append(self.numeric_.transform(frame))
        return np.hstack(blocks)

    def linear_log_odds(self, X: np.ndarray) -> np.ndarray:
        """The linear side's log-odds (what `logreg_target_encoded` would give)."""
        check_is_fitted(self, "linear_")
        return np.asarray(self.linear_.decision_function(self._linear_input(*self._split(
            np.asarray(X)))), dtype=np.float64)

    def tree_log_odds(self, X: np.ndarray) -> np.ndarray:
        """The trees' raw score (what `gbm_target_encoded` would give)."""
        check_is_fitted(self, "trees_")
        return np.asarray(self.trees_.predict(np.asarray(X), raw_score=True), dtype=np.float64)

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        weight = self.linear_weight
        return weight * self.linear_log_odds(X) + (1.0 - weight) * self.tree_log_odds(X)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        positive = expit(self.decision_function(X))
        return np.column_stack([1.0 - positive, positive])

    @property
    def feature_importances_(self) -> np.ndarray:
        """The trees' share of split gain per input (what the report's plot shows)."""
        gain = np.asarray(self.trees_.booster_.feature_importance(importance_type="gain"), float)
        return gain / gain.sum() if gain.sum() > 0 else gain


def build_blend_target_encoded(cfg: DatasetConfig, seed: int = 0) -> Pipeline:
    blend = LinearTreeBlend(_linear_model(), _trees(seed), n_numeric=len(cfg.feature_numerical))
    return Pipeline([("features", _encoded_with_raw_numerics(cfg, seed)),
                     ("model", LogitRecalibrated(blend))])


def blend_of(linear: Pipeline, trees: Pipeline, *, linear_weight: float = 0.5) -> Pipeline:
    """The fitted `blend_target_encoded` made of a fitted `logreg_target_encoded` and
    `gbm_target_encoded` that saw the same rows (uncalibrated: its Platt step is still to be
    fitted). Selection gets the blend's holdout figures without a third fit."""
    blended = LogitRecalibrated(LinearTreeBlend.from_members(linear, trees,
                                                             linear_weight=linear_weight))
    blended.estimator_ = blended.estimator
    blended.classes_ = blended.estimator.classes_
    return Pipeline([("features", trees.named_steps["features"]), ("model", blended)])


BLEND = "blend_target_encoded"
# A blend is made of candidates fitted on the same rows: (linear member, tree member).
BLEND_MEMBERS = ("logreg_target_encoded", "gbm_target_encoded")

CANDIDATES: dict[str, Callable[[DatasetConfig, int], Pipeline]] = {
    BASELINE: build_logreg_onehot,
    "logreg_target_encoded": build_logreg_target_encoded,
    "gbm_target_encoded": build_gbm_target_encoded,
    BLEND: build_blend_target_encoded,
}


# Candidates a run fits only when asked ($RTB_EXTRA_CANDIDATES): the blend costs both its
# members' time in every refit and prediction, beyond the benchmark's speed goal.
OPTIONAL_CANDIDATES = (BLEND,)
DEFAULT_CANDIDATES = tuple(name for name in CANDIDATES if name not in OPTIONAL_CANDIDATES)


def build_pipeline(name: str, cfg: DatasetConfig, seed: int = 0) -> Pipeline:
    """A fresh, unfitted candidate pipeline by name."""
    return CANDIDATES[name](cfg, seed)

