"""The scoring tables of a fitted candidate pipeline: everything its model reads, per key.

Why tables: all the candidates (`rtb.models.pipeline`) spend their categorical work on
lookups of fitted values, and their numeric work on a few column-wise constants. Read once,
those become a small artifact that a vectorised batch scorer (`rtb.scoring.batch`) and a
generated per-request scorer (`rtb.scoring.compiled`) share, so the two cannot drift apart:

- per categorical column its vocabulary (a level's code is its position, unseen levels get
  `len(vocabulary)`), and per group (a column or a cross) a `KeyTable` holding, for every
  key seen in training, exactly the values the head consumes for it;
- the numeric block as constants (imputer fills, log1p or not, scaler mean and scale) in
  the dtype sklearn computes it in;
- the head: a logistic regression's intercept and numeric weights (its categorical weights
  are folded into the tables), or a LightGBM ensemble, or both for the blend (the linear
  side with tables and numeric constants of its own); then the Platt step.

For a logistic regression a table holds each key's *contribution to the log-odds*
(encoding, scaling and coefficient applied once per key, rounded where sklearn rounds).
The one-hot model is fitted on a float32 sparse matrix, whose mat-vec rounds every product
and every partial sum to float32 in column order; its tables keep one float32 product per
model column, which the scorers add one at a time. For the GBM a table holds the encoded
values themselves.

`tabulate` recognises the pipeline's shape in one place; anything else raises
`NotTabulable` naming the obstacle, and the caller keeps scoring with the pipeline.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from rtb.models.encoders import SmoothedTargetEncoder, SparseOneHotEncoder
from rtb.models.pipeline import LinearTreeBlend, LogitRecalibrated
from rtb.models.transforms import log1p_nonnegative
from rtb.scoring import lgbm_trees
from rtb.scoring.artifact import (
    BlendHead,
    KeyTable,
    LinearHead,
    NumericBlock,
    ScoringTables,
    TreeHead,
)
from rtb.scoring.errors import NotTabulable

_PROBE_VALUES = (0.0, 1.0, -1.0, 0.5, 3.0, -2.75, 7.3, 12.0, 123.456, 1e4, 3.3e7, 1e-3, math.nan)


# --------------------------------------------------------------------------- recognition
@dataclass
class _Encoded:
    """One group as the categorical block outputs it (before the head)."""

    group: KeyTable  # values: the block's output columns for the group, in its dtype
    offset: int  # the group's first column in the model's input
    one_hot: bool  # one column per level: the key selects the weight, the value is 1.0


def tabulate(pipeline: object) -> ScoringTables:
    """The scoring tables of a fitted candidate pipeline, or NotTabulable naming the step."""
    if not isinstance(pipeline, Pipeline) or len(pipeline.steps) != 2:
        raise NotTabulable("expected Pipeline([features ColumnTransformer, LogitRecalibrated])")
    features, calibrated = pipeline.steps[0][1], pipeline.steps[1][1]
    if not isinstance(features, ColumnTransformer) or not hasattr(features, "transformers_"):
        raise NotTabulable(f"first step is {type(features).__name__}, not a fitted ColumnTransformer")
    if not isinstance(calibrated, LogitRecalibrated) or not hasattr(calibrated, "estimator_"):
        raise NotTabulable(f"last step is {type(calibrated).__name__}, not a fitted LogitRecalibrated")
    blocks = [
        (name, step, list(columns))
        for name, step, columns in features.transformers_
        if not (isinstance(step, str) and step == "drop") and len(columns)
    ]
    categorical: tuple[str, ...] = ()
    vocabularies: tuple[pd.Index, ...] = ()
    encoded: list[_Encoded] = []
    dtypes: list[np.dtype] = []
    if blocks and _is_categorical(blocks[0][1]):
        _, step, columns = blocks.pop(0)
        categorical, vocabularies, encoded, dtype = _categorical_block(step, columns)
        dtypes.append(dtype)
    numeric = None
    if blocks:
        name, step, columns = blocks.pop(0)
        numeric = _numeric_block(name, step, columns)
        dtypes.append(numeric.dtype)
    if blocks:
        raise NotTabulable(f"ColumnTransformer block {blocks[0][0]!r} is not supported "
                           "(one categorical block, then one numeric block)")
    if not dtypes:
        raise NotTabulable("ColumnTransformer produces no columns")
    width = _categorical_width(encoded) + (len(numeric.columns) if numeric else 0)
    sparse = bool(getattr(features, "sparse_output_", False))
    head, groups = _head(calibrated.estimator_, encoded, np.result_type(*dtypes), sparse, width,
                         numeric)
    return ScoringTables(
        categorical=categorical,
        vocabularies=vocabularies,
        groups=tuple(groups),
        numeric=numeric,
        head=head,
        slope=float(calibrated.slope),
        intercept=float(calibrated.intercept),
    )


def _is_categorical(step: object) -> bool:
    inner = step.steps[0][1] if isinstance(step, Pipeline) and step.steps else step
    return isinstance(inner, SmoothedTargetEncoder | SparseOneHotEncoder)


def _block_width(encoded: _Encoded) -> int:
    return len(encoded.group.keys) if encoded.one_hot else encoded.group.width


def _categorical_block(
    step: object, columns: list[str]
) -> tuple[tuple[str, ...], tuple[pd.Index, ...], list[_Encoded], np.dtype]:
    """Codes and per-key outputs of a SparseOneHotEncoder, a SmoothedTargetEncoder, or a
    SmoothedTargetEncoder followed by a StandardScaler."""
    steps = [s for _, s in step.steps] if isinstance(step, Pipeline) else [step]
    encoder = steps[0]
    if list(encoder.feature_names_in_) != columns:
        raise NotTabulable(f"{type(encoder).__name__} was fitted on other columns")
    if isinstance(encoder, SparseOneHotEncoder):
        if len(steps) != 1:
            raise NotTabulable("SparseOneHotEncoder followed by another step is not supported")
        encoded, offset = [], 0
        for position, vocabulary in enumerate(encoder.vocabularies_):
            values = np.append(np.ones(len(vocabulary), np.float32), np.float32(0.0))[:, None]
            keys = np.arange(len(vocabulary), dtype=np.int64)
            group = KeyTable((position,), (len(vocabulary) + 1,), keys, values)
            encoded.append(_Encoded(group, offset, one_hot=True))
            offset += len(vocabulary)
        return tuple(columns), tuple(encoder.vocabularies_), encoded, np.dtype(np.float32)
    scaler = steps[1] if len(steps) == 2 else None
    if len(steps) > 2 or (scaler is not None and not isinstance(scaler, StandardScaler)):
        names = ", ".join(type(s).__name__ for s in steps[1:])
        raise NotTabulable(f"SmoothedTargetEncoder followed by {names} is not supported")
    position_of = {name: position for position, name in enumerate(columns)}
    tables = encoder.encoding_tables()
    blocks = [
        np.vstack([np.column_stack([t.log_odds, t.log_counts]), [t.unseen]]).astype(np.float32)
        for t in tables
    ]
    if scaler is not None:
        blocks = _scaled_blocks(scaler, blocks)
    encoded = [
        _Encoded(
            KeyTable(tuple(position_of[c] for c in t.columns), t.radixes, t.keys, values),
            offset=2 * position,
            one_hot=False,
        )
        for position, (t, values) in enumerate(zip(tables, blocks, strict=True))
    ]
    vocabularies = tuple(encoder.vocabularies_)
    return tuple(columns), vocabularies, encoded, np.dtype(np.float32)


def _scaled_blocks(scaler: StandardScaler, blocks: list[np.ndarray]) -> list[np.ndarray]:
    """Each group's (encoding, log count) rows through the fitted scaler's constants, checked
    bit for bit against the scaler itself on rows drawn from every group."""
    mean, scale = _scaler_constants(scaler, np.dtype(np.float32))
    width = 2 * len(blocks)
    if len(scaler.scale_ if scaler.scale_ is not None else scaler.mean_) != width:
        raise NotTabulable("StandardScaler after SmoothedTargetEncoder has another width")
    scaled = []
    for p, values in enumerate(blocks):
        if mean is not None:
            values = values - mean[2 * p : 2 * p + 2]
        if scale is not None:
            values = values / scale[2 * p : 2 * p + 2]
        scaled.append(values)
    probe_rows = max(len(values) for values in blocks)
    probe_rows = min(probe_rows, 512)
    probe = np.column_stack([np.resize(values, (probe_rows, 2)) for values in blocks])
    emulated = np.column_stack([np.resize(values, (probe_rows, 2)) for values in scaled])
    _check_step(scaler, probe, emulated, "StandardScaler after SmoothedTargetEncoder")
    return scaled


def _scaler_constants(
    scaler: StandardScaler, dtype: np.dtype
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Mean and scale as StandardScaler.transform applies them: cast to the input's dtype."""
    mean = scaler.mean_.astype(dtype) if scaler.with_mean else None
    scale = scaler.scale_.astype(dtype) if scaler.with_std and scaler.scale_ is not None else None
    return mean, scale


def _numeric_block(name: str, step: object, columns: list[str]) -> NumericBlock:
    """SimpleImputer, then optionally log1p, then optionally StandardScaler; or passthrough."""
    float32 = np.dtype(np.float32)
    if (isinstance(step, str) and step == "passthrough") or (
        isinstance(step, FunctionTransformer) and step.func is None  # fitted "passthrough"
    ):
        return NumericBlock(tuple(columns), float32, None, False, None, None)
    steps = [s for _, s in step.steps] if isinstance(step, Pipeline) else [step]
    imputer = steps.pop(0) if steps and isinstance(steps[0], SimpleImputer) else None
    if imputer is None:
        raise NotTabulable(f"numeric block {name!r} does not start with a SimpleImputer")
    missing = imputer.missing_values
    if imputer.add_indicator or not (isinstance(missing, float) and math.isnan(missing)):
        raise NotTabulable("SimpleImputer: only missing_values=nan without indicator")
    fills = np.asarray(imputer.statistics_, dtype=np.float64)
    if np.isnan(fills).any() and not imputer.keep_empty_features:
        raise NotTabulable("SimpleImputer drops all-missing columns (keep_empty_features)")
    log1p = bool(steps) and isinstance(steps[0], FunctionTransformer)
    if log1p:
        function = steps.pop(0)
        if function.func is not log1p_nonnegative or function.kw_args:
            label = getattr(function.func, "__qualname__", repr(function.func))
            raise NotTabulable(f"FunctionTransformer func {label} has no table equivalent")
    dtype = np.dtype(np.float64) if log1p else float32
    mean = scale = None
    if steps and isinstance(steps[0], StandardScaler):
        mean, scale = _scaler_constants(steps.pop(0), dtype)
    if steps:
        raise NotTabulable(f"{type(steps[0]).__name__} in numeric block {name!r} "
                           "has no table equivalent")
    block = NumericBlock(tuple(columns), dtype, fills.astype(float32), log1p, mean, scale)
    probe = np.array([[v] * len(columns) for v in _PROBE_VALUES], dtype=np.float32)
    _check_step(step, pd.DataFrame(probe, columns=columns), block.apply(probe),
                f"numeric block {name!r}")
    return block


def _check_step(step: object, probe: object, emulated: np.ndarray, label: str) -> None:
    """The emulation of a fitted step must reproduce it bit for bit (NaN equal to NaN)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = np.asarray(step.transform(probe))
    if expected.dtype != emulated.dtype or not np.array_equal(expected, emulated, equal_nan=True):
        raise NotTabulable(f"{label}: table emulation differs from the fitted step")


# --------------------------------------------------------------------------- heads
def _head(
    estimator: object, encoded: list[_Encoded], dtype: np.dtype, sparse: bool, width: int,
    numeric: NumericBlock | None,
) -> tuple[LinearHead | TreeHead | BlendHead, list[KeyTable]]:
    if isinstance(estimator, LogisticRegression):
        return _linear_head(estimator, encoded, dtype, sparse, width)
    if type(estimator).__name__ == "LGBMClassifier":
        return _tree_head(estimator, encoded, width)
    if isinstance(estimator, LinearTreeBlend):
        return _blend_head(estimator, encoded, width, numeric)
    raise NotTabulable(f"final estimator {type(estimator).__name__} is not supported")


def _tree_head(estimator: object, encoded: list[_Encoded], width: int
               ) -> tuple[TreeHead, list[KeyTable]]:
    if any(e.one_hot for e in encoded):
        raise NotTabulable("LightGBM on one-hot columns is not supported")
    if not hasattr(estimator, "decision_function") or len(estimator.classes_) != 2:
        raise NotTabulable("LGBMClassifier is not binary or lacks decision_function")
    ensemble = lgbm_trees.parse_booster(estimator.booster_)
    if ensemble.n_features > width:
        raise NotTabulable(f"LightGBM reads {ensemble.n_features} features, the pipeline "
                           f"gives {width}")
    groups = [e.group for e in encoded]
    return TreeHead(estimator, ensemble), [_as_float64(g, g.values) for g in groups]


def _blend_head(blend: LinearTreeBlend, encoded: list[_Encoded], width: int,
                numeric: NumericBlock | None) -> tuple[BlendHead, list[KeyTable]]:
    """The trees on the encodings as the GBM reads them; the linear side's scaler folded into
    per-key contributions as for `logreg_target_encoded`, its numeric steps a block of their
    own on the same raw columns."""
    if type(blend.trees_).__name__ != "LGBMClassifier":
        raise NotTabulable(f"blend's trees are {type(blend.trees_).__name__}, not LGBMClassifier")
    if any(e.one_hot for e in encoded) or (numeric is not None and numeric.fills is not None):
        raise NotTabulable("blend expects target encodings and raw numeric columns")
    trees, groups = _tree_head(blend.trees_, encoded, width)
    scaled = _scaled_blocks(blend.scaler_, [e.group.values for e in encoded])
    linear_encoded = [
        _Encoded(KeyTable(e.group.columns, e.group.radixes, e.group.keys, values), e.offset,
                 one_hot=False)
        for e, values in zip(encoded, scaled, strict=True)
    ]
    linear_numeric = None
    if blend.numeric_ is not None:
        if numeric is None:
            raise NotTabulable("blend has a numeric block but the pipeline no numeric columns")
        linear_numeric = _numeric_block("blend numeric", blend.numeric_, list(numeric.columns))
    dtype = np.result_type(np.float32, linear_numeric.dtype if linear_numeric else np.float32)
    linear, linear_groups = _linear_head(blend.linear_, linear_encoded, dtype, False, width)
    return BlendHead(trees, linear, tuple(linear_groups), linear_numeric,
                     float(blend.linear_weight)), groups


def _linear_head(
    model: LogisticRegression, encoded: list[_Encoded], dtype: np.dtype, sparse: bool, width: int
) -> tuple[LinearHead, list[KeyTable]]:
    coef = np.asarray(model.coef_)
    if coef.ndim != 2 or coef.shape[0] != 1 or len(model.classes_) != 2:
        raise NotTabulable("LogisticRegression is not binary")
    if coef.shape[1] != width:
        raise NotTabulable(f"LogisticRegression has {coef.shape[1]} inputs, the pipeline {width}")
    product = np.result_type(dtype, coef.dtype)
    float32 = product == np.float32
    if float32 and not sparse:
        raise NotTabulable("LogisticRegression on dense float32 input: BLAS summation order "
                           "is not reproducible")
    weights = coef[0].astype(product)
    groups = []
    for e in encoded:
        if e.one_hot:  # the key's own column; the default row (no column) adds nothing
            picked = np.append(weights[e.offset : e.offset + len(e.group.keys)], 0.0)
            products = e.group.values.astype(product) * picked.astype(product)[:, None]
        else:
            products = e.group.values.astype(product) * weights[e.offset : e.offset + e.group.width]
        if not float32:
            products = products.sum(axis=1, keepdims=True)
        groups.append(_as_float64(e.group, products))
    numeric_weights = weights[_categorical_width(encoded) :].astype(np.float64)
    intercept = float(np.asarray(model.intercept_, dtype=product)[0])
    return LinearHead(intercept, numeric_weights, float32), groups


def _categorical_width(encoded: list[_Encoded]) -> int:
    return encoded[-1].offset + _block_width(encoded[-1]) if encoded else 0


def _as_float64(group: KeyTable, values: np.ndarray) -> KeyTable:
    return KeyTable(group.columns, group.radixes, group.keys, np.asarray(values, dtype=np.float64))
