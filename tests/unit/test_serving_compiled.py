"""The compiled scorer must give the pipeline's probabilities (within 1e-9) for every model type.

The pipelines are built with `build_pipeline` exactly as training builds them (so a change of
parameters, crosses or steps in `rtb.models.pipeline` is caught here), fitted on a few
thousand synthetic rows, and given a non-trivial Platt step. The scored rows carry unseen
levels, None and absent keys, ints for text fields, negative counts, several UTC offsets and
missing or future `lastStart`. The reference is the pipeline on the pandas path:
`pipeline.predict_proba(rows_frame(rows, cfg))`.
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
from sklearn.preprocessing import QuantileTransformer
from support.raw_requests import raw_rows

from rtb.dataset_config import load_dataset_config
from rtb.features import rows_frame
from rtb.models.pipeline import BLEND, CANDIDATES, LogitRecalibrated, build_pipeline
from rtb.scoring import lgbm_trees
from rtb.scoring.compiled import compile_pipeline
from rtb.scoring.errors import NotTabulable
from rtb.serving.scorer import build_scorer

CFG = load_dataset_config("rtb")
TOLERANCE = 1e-9


def planted_labels(rows: list[dict], seed: int) -> np.ndarray:
    processed = rows_frame(rows, CFG)
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
    return rows_frame(rows, CFG), planted_labels(rows, seed=2)


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
    trees = {"gbm_target_encoded": "model__estimator", BLEND: "model__estimator__trees"}
    if name in trees:  # deeper trees: more thresholds, NaN splits and default directions
        pipeline.set_params(**{f"{trees[name]}__min_child_samples": 10})
    pipeline.fit(X, y)
    pipeline.set_params(model__slope=0.83, model__intercept=-0.41)
    return pipeline


def reference(pipeline: Pipeline, rows: list[dict]) -> np.ndarray:
    return pipeline.predict_proba(rows_frame(rows, CFG))[:, 1]


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
        return pipeline.predict_proba(rows_frame(rows, CFG))[:, 1].tolist()

    return score


def test_unknown_step_falls_back_to_the_pipeline(training, scoring_rows) -> None:
    numeric = make_pipeline(SimpleImputer(), QuantileTransformer(n_quantiles=50))
    features = ColumnTransformer([("numeric", numeric, CFG.feature_numerical)])
    pipeline = Pipeline([("features", features),
                         ("model", LogitRecalibrated(LogisticRegression()))])
    X, y = training
    pipeline.fit(X, y)
    with pytest.raises(NotTabulable, match="QuantileTransformer"):
        compile_pipeline(pipeline, CFG)
    scorer = build_scorer(pipeline, CFG)
    assert scorer.kind == "pipeline"
    assert "QuantileTransformer" in scorer.reason
    rows = scoring_rows[:50]
    assert np.allclose(scorer.score_many(rows), reference(pipeline, rows), rtol=0, atol=1e-12)


def test_lightgbm_trees_follow_lightgbm_rules_exactly() -> None:
    """NaN / Zero / None missing types, default directions, tiny values."""
    rng = np.random.default_rng(0)
    n = 3000
    X = np.column_stack([
        rng.integers(0, 12, n).astype(float),  # few distinct values
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
            zero_as_missing=zero_as_missing,
        ).fit(X, y)
        ensemble = lgbm_trees.parse_booster(model.booster_)
        names = [f"f{i}" for i in range(X.shape[1])]
        body = lgbm_trees.ensemble_statements(ensemble, names, "raw", "    ")
        source = "def raw_score(f0, f1, f2, f3):\n" + "\n".join(body) + "\n    return raw\n"
        namespace: dict[str, object] = {}
        exec(compile(source, "<trees>", "exec"), namespace)
        expected = model.booster_.predict(test, raw_score=True)
        zeroed = np.where(np.abs(test) <= lgbm_trees.ZERO_THRESHOLD, 0.0, test)
        got = np.array([namespace["raw_score"](*row) for row in zeroed.tolist()])
        assert np.array_equal(got, expected), (zero_as_missing, np.abs(got - expected).max())


def test_lightgbm_categorical_splits_are_rejected() -> None:
    """No candidate splits on categories; a model that does must not be scored by tables."""
    rng = np.random.default_rng(0)
    X = np.column_stack([rng.integers(0, 12, 2000).astype(float), rng.normal(size=2000)])
    y = (np.isin(X[:, 0], [1, 4, 7]) ^ (rng.random(2000) < 0.1)).astype(int)
    model = lightgbm.LGBMClassifier(n_estimators=5, min_child_samples=5, verbose=-1,
                                    cat_smooth=1.0, min_data_per_group=5)
    model.fit(X, y, categorical_feature=[0])
    with pytest.raises(NotTabulable, match="categorical splits"):
        lgbm_trees.parse_booster(model.booster_)


@pytest.mark.parametrize("name", list(CANDIDATES))
def test_huge_numbers_score_or_fail_as_the_pipeline_does(name: str, training) -> None:
    """A count beyond float32 becomes inf: the linear models' imputer rejects it, so the
    compiled scorer must raise too; the GBM reads it as it is, so both must give one
    finite probability."""
    pipeline = fitted(name, training)
    compiled = compile_pipeline(pipeline, CFG)
    row = {"timestamp": "2019-01-09 21:20:15.943000+00:00", "startCount": 1e300}
    if "gbm" in name:
        got = compiled.score_one(row)
        assert math.isfinite(got)
        assert abs(got - reference(pipeline, [row])[0]) <= TOLERANCE
        return
    with pytest.raises(ValueError, match="infinity"):
        reference(pipeline, [row])
    with pytest.raises(ValueError, match="infinite"):
        compiled.score_one(row)
