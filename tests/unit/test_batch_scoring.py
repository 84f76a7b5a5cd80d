"""`rtb predict` scores the target-encoded logistic regression through per-level log-odds
tables; the result must be the pipeline's own, and any other pipeline (or any disagreement)
must fall back to `predict_proba`."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import small_raw_frame

from rtb.data.preprocessing import derive_features
from rtb.dataset_config import load_dataset_config
from rtb.models import batch_scoring
from rtb.models.batch_scoring import LinearTargetEncodedScorer, batch_scorer
from rtb.models.pipeline import build_pipeline, feature_frame

CFG = load_dataset_config("rtb")


def _frames():
    train = derive_features(small_raw_frame(3000, seed=21), CFG)
    test_raw = small_raw_frame(800, seed=22, start="2019-01-09")
    test_raw.loc[::7, "campaignId"] = "never-seen-campaign"
    test_raw.loc[::5, "viewCount"] = np.nan
    test = derive_features(test_raw.drop(columns=["install"]), CFG)
    return feature_frame(train, CFG), train["install"].to_numpy(), feature_frame(test, CFG)


def test_tables_give_the_pipelines_probabilities() -> None:
    X, y, X_test = _frames()
    pipeline = build_pipeline("logreg_target_encoded", CFG).fit(X, y)
    pipeline.set_params(model__slope=0.9, model__intercept=-0.3)
    scorer = batch_scorer(pipeline, X_test.iloc[:100])
    assert isinstance(scorer, LinearTargetEncodedScorer)
    expected = pipeline.predict_proba(X_test)[:, 1]
    np.testing.assert_allclose(scorer.predict_positive(X_test), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("candidate", ["logreg_onehot", "gbm_target_encoded"])
def test_other_pipelines_keep_predict_proba(candidate) -> None:
    X, y, X_test = _frames()
    pipeline = build_pipeline(candidate, CFG).fit(X, y)
    assert batch_scorer(pipeline, X_test.iloc[:100]) is None


def test_a_scorer_that_disagrees_is_not_used(monkeypatch) -> None:
    X, y, X_test = _frames()
    pipeline = build_pipeline("logreg_target_encoded", CFG).fit(X, y)
    exact = LinearTargetEncodedScorer.predict_positive
    monkeypatch.setattr(LinearTargetEncodedScorer, "predict_positive", lambda self, X: exact(self, X) + 1e-8)
    assert batch_scorer(pipeline, X_test.iloc[:100]) is None
    monkeypatch.setattr(batch_scoring, "AGREEMENT", 1e-7)
    assert batch_scorer(pipeline, X_test.iloc[:100]) is not None
