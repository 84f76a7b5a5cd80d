"""The report's `params`: what was set on each step of a pipeline, not a `get_params` dump."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression

from rtb.dataset_config import load_dataset_config
from rtb.models.pipeline import BLEND, CANDIDATES, build_pipeline
from rtb.models.training_report import plain_params

CFG = load_dataset_config("rtb")


def test_an_estimator_left_at_its_defaults_reports_nothing() -> None:
    assert plain_params(LogisticRegression()) == {}
    assert plain_params(SimpleImputer()) == {}  # missing_values=nan is its default, NaN or not
    assert plain_params(LogisticRegression(C=0.5, tol=1e-4)) == {"C": 0.5}  # tol is the default


def test_baseline_reports_its_choices_and_no_defaults() -> None:
    pipeline = build_pipeline("logreg_onehot", CFG).set_params(model__slope=0.8, model__intercept=-0.3)
    params = plain_params(pipeline)
    assert params["model"] == "LogitRecalibrated"
    assert params["model__estimator"] == "LogisticRegression"
    assert params["model__estimator__max_iter"] == 200
    assert (params["model__slope"], params["model__intercept"]) == (0.8, -0.3)
    assert params["features__onehot"] == "SparseOneHotEncoder"
    assert params["features__onehot__columns"] == list(CFG.categorical)
    assert params["features__numeric__simpleimputer__strategy"] == "rtb.models.pipeline.median_or_zero"
    for default in ("model__estimator__C", "model__estimator__penalty", "model__estimator__tol",
                    "features__remainder", "memory", "verbose"):
        assert default not in params


@pytest.mark.parametrize("name", list(CANDIDATES))
def test_every_reported_value_is_what_the_pipeline_holds(name: str) -> None:
    pipeline = build_pipeline(name, CFG, seed=7)
    params = plain_params(pipeline)
    held = pipeline.get_params(deep=True)
    assert "deprecated" not in params.values()
    for key, value in params.items():
        if key.endswith("__columns"):
            continue
        if isinstance(value, str) and key in held and hasattr(held[key], "get_params"):
            assert value == held[key].__class__.__name__, key
        elif isinstance(value, int | float) and not isinstance(value, bool):
            assert np.isclose(held[key], value), key
    linear = "model__estimator__linear__" if name == BLEND else "model__estimator__"
    assert f"{linear}class_weight" in held and f"{linear}class_weight" not in params
