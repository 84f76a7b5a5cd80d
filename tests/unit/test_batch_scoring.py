"""`rtb predict` scores every candidate through the scoring tables; the result must be the
pipeline's own, and any pipeline that does not tabulate (or any disagreement) must fall back
to `predict_proba`."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import small_raw_frame
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import QuantileTransformer

from rtb.dataset_config import load_dataset_config
from rtb.features import rows_frame
from rtb.models import encoders
from rtb.models.pipeline import CANDIDATES, LogitRecalibrated, build_pipeline
from rtb.scoring import agreement
from rtb.scoring.batch import TableScorer, batch_scorer

CFG = load_dataset_config("rtb")


def _frames():
    train_raw = small_raw_frame(3000, seed=21)
    test_raw = small_raw_frame(800, seed=22, start="2019-01-09")
    test_raw.loc[::7, "campaignId"] = "never-seen-campaign"
    test_raw.loc[::5, "viewCount"] = np.nan
    train = rows_frame(train_raw.to_dict("records"), CFG)
    test = rows_frame(test_raw.drop(columns=["install"]).to_dict("records"), CFG)
    return train, train_raw["install"].to_numpy(), test


@pytest.mark.parametrize("candidate", list(CANDIDATES))
def test_tables_give_the_pipelines_probabilities(candidate, monkeypatch) -> None:
    X, y, X_test = _frames()
    pipeline = build_pipeline(candidate, CFG).fit(X, y)
    pipeline.set_params(model__slope=0.9, model__intercept=-0.3)
    scorer = batch_scorer(pipeline, X_test.iloc[:100])
    assert isinstance(scorer, TableScorer)
    expected = pipeline.predict_proba(X_test)[:, 1]
    np.testing.assert_allclose(scorer.predict_positive(X_test), expected, rtol=0, atol=1e-12)
    monkeypatch.setattr(encoders, "DENSE_MAX_KEYS", 0)  # hash indexes instead of dense arrays
    hashed = batch_scorer(pipeline, X_test.iloc[:100])
    assert isinstance(hashed, TableScorer)
    np.testing.assert_allclose(hashed.predict_positive(X_test), expected, rtol=0, atol=1e-12)


def test_pipelines_that_do_not_tabulate_keep_predict_proba() -> None:
    X, y, X_test = _frames()
    numeric = make_pipeline(SimpleImputer(), QuantileTransformer(n_quantiles=50))
    features = ColumnTransformer([("numeric", numeric, CFG.feature_numerical)])
    pipeline = Pipeline([("features", features),
                         ("model", LogitRecalibrated(LogisticRegression()))]).fit(X, y)
    assert batch_scorer(pipeline, X_test.iloc[:100]) is None
    with pytest.raises(KeyError):  # a missing column is the caller's to report, as before
        batch_scorer(build_pipeline("logreg_target_encoded", CFG).fit(X, y),
                     X_test.drop(columns=["viewCount"]).iloc[:100])


def test_a_scorer_that_disagrees_is_not_used(monkeypatch) -> None:
    X, y, X_test = _frames()
    pipeline = build_pipeline("logreg_target_encoded", CFG).fit(X, y)
    exact = TableScorer.predict_positive
    monkeypatch.setattr(TableScorer, "predict_positive", lambda self, X: exact(self, X) + 1e-8)
    assert batch_scorer(pipeline, X_test.iloc[:100]) is None
    monkeypatch.setattr(agreement, "AGREEMENT", 1e-7)
    assert batch_scorer(pipeline, X_test.iloc[:100]) is not None
