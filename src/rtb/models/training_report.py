"""The training report: every number a reviewer needs to trust or reject a model.

`build_report` assembles `reports/report_<version>.yaml` from what training and the
promotion gate decided; the helpers describe rather than decide: calibration per segment,
the parameters that were set (not the defaults), and the environment (library versions, git
sha: `RTB_GIT_SHA` inside the image) a run came from."""

from __future__ import annotations

import inspect
import os
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import FunctionType

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.pipeline import Pipeline

from rtb.dataset_config import DatasetConfig
from rtb.models.metrics import bootstrap_log_loss_uplift, rate_entropy, reliability_table
from rtb.models.pipeline import BASELINE
from rtb.models.training import Selection, TrainingLimits

SEGMENT_MAX_LEVELS = 12
LIBRARIES = ("numpy", "pandas", "pyarrow", "scikit-learn", "lightgbm", "joblib", "isal")


def segment_calibration(
    frame: pd.DataFrame, y: np.ndarray, p: np.ndarray, cfg: DatasetConfig
) -> dict[str, dict[str, dict[str, float]]]:
    """Calibration ratio per level of each low-cardinality categorical (platform, connection)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name in cfg.categorical:
        codes, levels = pd.factorize(frame[name], sort=False)
        if len(levels) > SEGMENT_MAX_LEVELS:
            continue
        rows_per_level = np.bincount(codes[codes >= 0], minlength=len(levels))
        installs = np.bincount(codes[codes >= 0], weights=y[codes >= 0], minlength=len(levels))
        predicted = np.bincount(codes[codes >= 0], weights=p[codes >= 0], minlength=len(levels))
        out[name] = {}
        for position in np.argsort(np.asarray(levels, dtype=str)):
            rows, observed = int(rows_per_level[position]), installs[position] / rows_per_level[position]
            out[name][str(levels[position])] = {
                "rows": rows,
                "observed_rate": float(observed),
                "mean_predicted": float(predicted[position] / rows),
                "calibration_ratio": float(predicted[position] / rows / observed) if observed else None,
            }
    return out


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_sha() -> str | None:
    if os.environ.get("RTB_GIT_SHA"):
        return os.environ["RTB_GIT_SHA"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def plain_params(estimator: BaseEstimator) -> dict[str, object]:
    """What was set on a pipeline, step by step: every parameter that differs from its
    estimator's default, keyed as `set_params` names it (`model__estimator__max_iter`).

    A full `get_params` dump buries the few choices that define a model under dozens of
    defaults and sentinels (`penalty: deprecated`); this is the recipe a reader can compare
    between two reports, and the promotion gate compares between two models. Each nested
    estimator is named by its class under its own key; a column transformer's blocks list
    their columns under `<block>__columns`."""
    out: dict[str, object] = {}
    _explicit(estimator, "", out)
    return out


COMPOSITES = ("steps", "transformers", "transformer_list")  # lists of named sub-estimators


def _explicit(estimator: BaseEstimator, prefix: str, out: dict[str, object]) -> None:
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(type(estimator).__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    for key, value in estimator.get_params(deep=False).items():
        if key in COMPOSITES and isinstance(value, list | tuple):
            for name, step, *columns in value:
                _nested(step, f"{prefix}{name}", out)
                if columns:
                    out[f"{prefix}{name}__columns"] = _plain(columns[0])
        elif key not in defaults or not _same(value, defaults[key]):
            _nested(value, f"{prefix}{key}", out)


def _nested(value: object, key: str, out: dict[str, object]) -> None:
    if hasattr(value, "get_params") and not isinstance(value, type):
        out[key] = type(value).__name__
        _explicit(value, f"{key}__", out)
    else:
        out[key] = _plain(value)


def _same(value: object, default: object) -> bool:
    """Whether a parameter still holds its default (NaN equals NaN; arrays never match)."""
    if value is default:
        return True
    if isinstance(value, float) and isinstance(default, float):
        return value == default or (np.isnan(value) and np.isnan(default))
    if type(value) is not type(default) and not (
        isinstance(value, int | float) and isinstance(default, int | float)
    ):
        return False
    try:
        return bool(value == default)
    except (TypeError, ValueError):
        return False


def _plain(value: object) -> object:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, FunctionType):
        return f"{value.__module__}.{value.__qualname__}"
    return type(value).__name__


def baseline_comparison(selection: Selection, seed: int) -> dict[str, object]:
    """The selected candidate against the baseline on the time holdout: the report's
    `comparison` section, with a paired bootstrap of the log-loss uplift."""
    return {
        "baseline": BASELINE,
        "baseline_holdout_log_loss": selection.baseline.holdout["log_loss"],
        "uplift_vs_baseline": bootstrap_log_loss_uplift(
            selection.y_holdout,
            selection.selected.holdout_probabilities,
            selection.baseline.holdout_probabilities,
            seed=seed,
        ),
    }


def build_report(
    version: str,
    cfg: DatasetConfig,
    selection: Selection,
    *,
    model: Pipeline,
    cv: dict[str, object],
    comparison: dict[str, object],
    refit: dict[str, object],
    decision: dict[str, object],
    limits: TrainingLimits,
    seconds: float,
    artifacts: dict[str, object],
) -> dict[str, object]:
    """The report YAML's content, in the order a reader wants it (`comparison` is
    `baseline_comparison(selection, seed)`, computed beside the refit)."""
    selected, frame, holdout = selection.selected, selection.frame, selection.holdout
    plan = selection.rows.plan
    y_hold = selection.y_holdout
    return {
        "version": version,
        "dataset": cfg.name,
        "model": selected.name,
        "selected": {
            "name": selected.name,
            "holdout_log_loss": selected.holdout["log_loss"],
            "rule": selection.rule,
        },
        "cv": cv,
        "holdout": selected.holdout,
        "candidates": {r.name: r.summary() for r in selection.candidates},
        "comparison": comparison,
        "promotion": decision,
        "calibration": {
            **selected.calibration,
            "fitted_on": f"time holdout ({selection.parts[1]})",
            "overall_ratio": selected.holdout["calibration_ratio"],
            "by_segment": segment_calibration(
                frame[holdout], y_hold, selected.holdout_probabilities, cfg
            ),
            "reliability": reliability_table(y_hold, selected.holdout_probabilities),
        },
        "data": {
            "rows": plan.rows,
            "train_rows": plan.rows - plan.holdout_rows,
            "holdout_rows": plan.holdout_rows,
            "kept_rows": len(frame),
            "read_negatives_kept_share": plan.negative_share,
            "holdout_max_rows": limits.holdout_max_rows,
            "fit_max_negatives": limits.fit_max_negatives,
            "refit_max_negatives": limits.refit_max_negatives,
            "base_rate": plan.base_rate,
            "base_rate_entropy": rate_entropy(plan.base_rate),
            "holdout_starts": str(plan.holdout_starts),
            "features": cfg.feature_columns,
        },
        "refit": refit,
        "params": plain_params(model),
        "training_seconds": round(seconds, 2),
        "environment": {"libraries": library_versions(), "git_sha": git_sha()},
        "artifacts": artifacts,
    }
