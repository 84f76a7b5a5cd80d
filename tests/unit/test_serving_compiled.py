"""The compiled scorer must give the pipeline's probabilities (within 1e-9) for every model type.

The pipelines are built with `build_pipeline` exactly as training builds them (so a change of
parameters, crosses or steps in `rtb.models.pipeline` is caught here), fitted on a few
thousand synthetic rows, and given a non-trivial Platt step. The scored rows carry unseen
levels, None and absent keys, ints for text fields, negative counts, several UTC offsets and
missing or future `lastStart`. The reference is the pipeline on the pandas path:
`pipeline.predict_proba(feature_frame(derive_features(raw_frame)))`.
"""

from __future__ import annotations

import math
from datetime import datetime

import lightgbm
import numpy as np
import pandas as pd
import pytest
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import (
    FunctionTransformer,
    QuantileTransformer,
    SplineTransformer,
    StandardScaler,
)

from rtb.data.preprocessing import derive_features
from rtb.dataset_config import load_dataset_config
from rtb.models.encoders import SmoothedTargetEncoder
from rtb.models.pipeline import (
    CANDIDATES,
    LogitRecalibrated,
    _log1p_nonnegative,
    build_pipeline,
    feature_frame,
)
from rtb.serving import lgbm_trees
from rtb.serving.compiled import compile_pipeline
from rtb.serving.errors import NotCompilable
from rtb.serving.samples import raw_rows
from rtb.serving.scorer import build_scorer, records_to_frame

CFG = load_dataset_config("rtb")
TOLERANCE = 1e-9


def reference_frame(rows: list[dict]) -> pd.DataFrame:
    """Raw rows as a frame of object columns, i.e. text as the CSV reader would give it."""
    columns = ["id", CFG.timestamp, *CFG.categorical, *CFG.numerical, *CFG.datetimes]
    return pd.DataFrame({c: pd.Series([r.get(c) for r in rows], dtype=object) for c in columns})


def planted_labels(rows: list[dict], seed: int) -> np.ndarray:
    processed = derive_features(reference_frame(rows), CFG)
    z = (
        -3.0
        + 0.8 * (processed["platform"].astype(str) == "ios").to_numpy()
        + 0.03 * np.nan_to_num(processed["viewCount"].to_numpy(dtype=float))
        - 0.01 * np.nan_to_num(processed["fromLastStart"].to_numpy(dtype=float), nan=40.0)
        + 0.4 * (processed["campaignId"].astype(str).str.len().to_numpy() % 3)
    )
    rng = np.random.default_rng(seed)
    return (rng.random(len(z)) < 1.0 / (1.0 + np.exp(-z))).astype(np.int8)


@pytest.fixture(scope="module")
def training() -> tuple[pd.DataFrame, np.ndarray]:
    rows = raw_rows(4000, seed=1)
    X = feature_frame(derive_features(reference_frame(rows), CFG), CFG)
    return X, planted_labels(rows, seed=2)


@pytest.fixture(scope="module")
def scoring_rows() -> list[dict]:
    rows = raw_rows(3000, seed=3, unseen=0.15, days=21.0)
    rows[0] = {CFG.timestamp: rows[0][CFG.timestamp]}  # every optional field absent
    rows[1] = {**rows[1], **{name: None for name in CFG.categorical + CFG.numerical}}
    rng = np.random.default_rng(4)
    for row in rows[2::7]:  # float NaN gaps, as an in-process caller may pass them
        row[str(rng.choice(CFG.numerical))] = math.nan
        row[str(rng.choice(CFG.categorical))] = math.nan
        if rng.random() < 0.3:
            row["lastStart"] = math.nan
    return rows


_FITTED: dict[str, Pipeline] = {}


def fitted(name: str, training: tuple[pd.DataFrame, np.ndarray]) -> Pipeline:
    if name not in _FITTED:
        _FITTED[name] = fit(name, training)
    return _FITTED[name]


def fit(name: str, training: tuple[pd.DataFrame, np.ndarray]) -> Pipeline:
    X, y = training
    pipeline = build_pipeline(name, CFG, seed=0)
    if "gbm" in name:  # deeper trees: more thresholds, NaN splits and default directions
        pipeline.set_params(model__estimator__min_child_samples=10)
    pipeline.fit(X, y)
    pipeline.set_params(model__slope=0.83, model__intercept=-0.41)
    return pipeline


def reference(pipeline: Pipeline, rows: list[dict]) -> np.ndarray:
    return pipeline.predict_proba(feature_frame(derive_features(reference_frame(rows), CFG), CFG))[
        :, 1
    ]


@pytest.mark.parametrize("name", list(CANDIDATES))
def test_compiled_scorer_matches_pipeline(name: str, training, scoring_rows) -> None:
    pipeline = fitted(name, training)
    compiled = compile_pipeline(pipeline, CFG)
    expected = reference(pipeline, scoring_rows)

    one = np.array([compiled.score_one(row) for row in scoring_rows])
    many = np.array(compiled.score_many(scoring_rows))

    assert np.max(np.abs(one - expected)) <= TOLERANCE
    assert np.max(np.abs(many - expected)) <= TOLERANCE
    assert expected.std() > 0.01  # a model that says the same for every row would prove nothing
    scorer = build_scorer(pipeline, CFG)
    assert scorer.kind == "compiled", scorer.reason


@pytest.mark.parametrize("name", list(CANDIDATES))
def test_validated_datetimes_score_like_iso_text(name: str, training, scoring_rows) -> None:
    """The service hands the scorer datetimes (pydantic), in-process callers pass ISO text."""
    pipeline = fitted(name, training)
    compiled = compile_pipeline(pipeline, CFG)
    rows = scoring_rows[:300]
    parsed = [
        {k: datetime.fromisoformat(v) if isinstance(v, str) and k in ("timestamp", "lastStart") else v
         for k, v in row.items()}
        for row in rows
    ]
    assert [compiled.score_one(r) for r in parsed] == [compiled.score_one(r) for r in rows]
    via_pandas = PipelineOnRecords(pipeline)
    assert np.max(np.abs(np.array(via_pandas(parsed)) - reference(pipeline, rows))) <= TOLERANCE


def PipelineOnRecords(pipeline: Pipeline):  # noqa: N802 - reads as a constructor in the test
    def score(rows: list[dict]) -> list[float]:
        processed = derive_features(records_to_frame(rows, CFG), CFG)
        return pipeline.predict_proba(feature_frame(processed, CFG))[:, 1].tolist()

    return score


def test_splines_compile_and_match(training, scoring_rows) -> None:
    """SplineTransformer (linear extrapolation) on the numeric block of a target-encoded LR."""
    numeric = make_pipeline(
        SimpleImputer(strategy="median", keep_empty_features=True),
        FunctionTransformer(_log1p_nonnegative),  # float64 from here on, as splines need
        StandardScaler(),
        SplineTransformer(n_knots=5, degree=3, extrapolation="linear"),
    )
    target = make_pipeline(SmoothedTargetEncoder(crosses=(("campaignId", "country"),)),
                           StandardScaler())
    features = ColumnTransformer(
        [("target", target, CFG.categorical), ("numeric", numeric, CFG.feature_numerical)]
    )
    pipeline = Pipeline([("features", features),
                         ("model", LogitRecalibrated(LogisticRegression(max_iter=300)))])
    X, y = training
    pipeline.fit(X, y).set_params(model__slope=1.2, model__intercept=0.3)
    compiled = compile_pipeline(pipeline, CFG)
    expected = reference(pipeline, scoring_rows)
    got = np.array([compiled.score_one(row) for row in scoring_rows])
    assert np.max(np.abs(got - expected)) <= TOLERANCE


def test_unknown_step_falls_back_to_the_pipeline(training, scoring_rows) -> None:
    numeric = make_pipeline(SimpleImputer(), QuantileTransformer(n_quantiles=50))
    features = ColumnTransformer([("numeric", numeric, CFG.feature_numerical)])
    pipeline = Pipeline([("features", features),
                         ("model", LogitRecalibrated(LogisticRegression()))])
    X, y = training
    pipeline.fit(X, y)
    with pytest.raises(NotCompilable, match="QuantileTransformer"):
        compile_pipeline(pipeline, CFG)
    scorer = build_scorer(pipeline, CFG)
    assert scorer.kind == "pipeline"
    assert "QuantileTransformer" in scorer.reason
    rows = scoring_rows[:50]
    assert np.allclose(scorer.score_many(rows), reference(pipeline, rows), rtol=0, atol=1e-12)


def test_lightgbm_trees_follow_lightgbm_rules_exactly() -> None:
    """Categorical splits, NaN / Zero / None missing types, default directions, tiny values."""
    rng = np.random.default_rng(0)
    n = 3000
    X = np.column_stack([
        rng.integers(0, 12, n).astype(float),  # categorical
        np.where(rng.random(n) < 0.2, np.nan, rng.normal(size=n)),  # NaN -> missing_type NaN
        np.where(rng.random(n) < 0.3, 0.0, rng.exponential(size=n)),  # zeros
        rng.normal(size=n),
    ])
    logit = (np.isin(X[:, 0], [1, 4, 7]) * 1.5 + np.nan_to_num(X[:, 1], nan=2.0)
             - (X[:, 2] == 0) * 1.0 + X[:, 3])
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    test = np.column_stack([
        np.where(rng.random(n) < 0.1, np.nan, rng.integers(-2, 15, n).astype(float) + 0.3),
        np.where(rng.random(n) < 0.2, np.nan, rng.normal(size=n)),
        np.where(rng.random(n) < 0.3, rng.choice([0.0, 1e-36, -1e-36], n), rng.normal(size=n)),
        np.where(rng.random(n) < 0.1, np.nan, rng.normal(size=n)),
    ])
    for zero_as_missing in (False, True):
        model = lightgbm.LGBMClassifier(
            n_estimators=40, num_leaves=15, min_child_samples=5, verbose=-1,
            zero_as_missing=zero_as_missing, cat_smooth=1.0, min_data_per_group=5,
        ).fit(X, y, categorical_feature=[0])
        ensemble = lgbm_trees.parse_booster(model.booster_)
        assert ensemble.categorical.any()
        constants: dict[str, object] = {}
        names = [f"f{i}" for i in range(X.shape[1])]
        body = lgbm_trees.ensemble_statements(ensemble, names, "raw", constants, "    ")
        source = "def raw_score(f0, f1, f2, f3):\n" + "\n".join(body) + "\n    return raw\n"
        namespace: dict[str, object] = dict(constants)
        exec(compile(source, "<trees>", "exec"), namespace)
        expected = model.booster_.predict(test, raw_score=True)
        zeroed = np.where(np.abs(test) <= lgbm_trees.ZERO_THRESHOLD, 0.0, test)
        got = np.array([namespace["raw_score"](*row) for row in zeroed.tolist()])
        assert np.array_equal(got, expected), (zero_as_missing, np.abs(got - expected).max())


def test_huge_numbers_do_not_crash_the_compiled_path(training) -> None:
    pipeline = fitted("logreg_onehot", training)
    compiled = compile_pipeline(pipeline, CFG)
    row = {"timestamp": "2019-01-09 21:20:15.943000+00:00", "startCount": 1e300}
    assert 0.0 <= compiled.score_one(row) <= 1.0 or math.isnan(compiled.score_one(row))
