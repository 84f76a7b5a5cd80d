"""Report plots: four readable PNGs per version, never overwritten, clear errors on bad input."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from rtb.config import ProjectPaths
from rtb.dataset_config import load_dataset_config
from rtb.errors import RtbError
from rtb.features import feature_frame, rows_frame
from rtb.models.pipeline import LogitRecalibrated, build_pipeline
from rtb.models.report_plots import (
    HOLDOUT_KINDS,
    KINDS,
    _reliability_figure,
    feature_names,
    write_report_plots,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROWS = 3000


def _raw_frame(rows: int, seed: int = 0) -> pd.DataFrame:
    """A raw RTB log with a planted signal (campaign, platform, recency, start count)."""
    rng = np.random.default_rng(seed)
    stamp = pd.Timestamp("2019-01-01", tz="UTC") + pd.to_timedelta(
        np.sort(rng.uniform(0, 7 * 86_400, rows)), unit="s"
    )
    campaign = rng.integers(0, 30, rows)
    platform = rng.choice(["android", "ios"], rows)
    hours_since = rng.exponential(48, rows)
    start_count = rng.poisson(20, rows).astype(float)
    start_count[rng.random(rows) < 0.02] = np.nan
    logit = (
        -3.5
        + 0.08 * (campaign - 15)
        + 0.6 * (platform == "ios")
        - 0.01 * hours_since
        + 0.02 * np.nan_to_num(start_count)
    )
    last_start = pd.Series(stamp - pd.to_timedelta(hours_since, unit="h"))
    last_start[rng.random(rows) < 0.05] = pd.NaT
    return pd.DataFrame(
        {
            "id": [f"r{i}" for i in range(rows)],
            "timestamp": stamp,
            "campaignId": [f"c{c}" for c in campaign],
            "platform": platform,
            "softwareVersion": rng.choice(["9", "10.1", "12.1"], rows),
            "sourceGameId": rng.integers(1000, 1040, rows).astype(str),
            "country": rng.choice(["US", "DE", "JP", None], rows, p=[0.5, 0.3, 0.19, 0.01]),
            "startCount": start_count,
            "viewCount": rng.poisson(10, rows),
            "clickCount": rng.poisson(1, rows),
            "installCount": rng.poisson(0.3, rows),
            "lastStart": last_start,
            "startCount1d": rng.poisson(2, rows),
            "startCount7d": rng.poisson(8, rows),
            "connectionType": rng.choice(["wifi", "cellular"], rows),
            "deviceType": rng.choice(["iPhone10,1", "SM-G960F", "Pixel 3"], rows),
            "install": (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int8),
        }
    )


@pytest.fixture(scope="module")
def fitted() -> dict[str, object]:
    cfg = load_dataset_config("rtb")
    raw = _raw_frame(ROWS)
    records = raw.astype(object).where(raw.notna(), None).to_dict("records")  # gaps as None
    frame = rows_frame(records, cfg).assign(**{cfg.target: raw[cfg.target].to_numpy()})
    train, holdout = frame.iloc[: ROWS * 4 // 5], frame.iloc[ROWS * 4 // 5 :]
    y_train = train[cfg.target].to_numpy()
    models = {
        name: build_pipeline(name, cfg).fit(feature_frame(train, cfg), y_train)
        for name in ("logreg_onehot", "gbm_target_encoded")
    }
    X_hold = feature_frame(holdout, cfg)
    return {
        "y": holdout[cfg.target].to_numpy(),
        "p": {name: model.predict_proba(X_hold)[:, 1] for name, model in models.items()},
        "models": models,
    }


def _assert_pngs(paths: list, reports_dir, version: str) -> None:
    assert [p.name for p in paths] == [f"report_{version}_{kind}.png" for kind in KINDS]
    for path in paths:
        assert path.parent == reports_dir
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC, path
        assert len(data) > 10_000, f"{path} is only {len(data)} bytes"
    assert not [p.name for p in reports_dir.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("name", ["logreg_onehot", "gbm_target_encoded"])
def test_writes_four_pngs_for_each_model_family(fitted, tmp_path, name, caplog) -> None:
    version = f"20190108T000000Z-{name}"
    with caplog.at_level(logging.INFO, logger="rtb.models.report_plots"):
        paths = write_report_plots(
            ProjectPaths(tmp_path), version, fitted["y"], fitted["p"][name], fitted["models"][name],
            candidates=fitted["p"],  # as training passes them: the selected model included
        )
    _assert_pngs(paths, ProjectPaths(tmp_path).reports_dir, version)
    assert all(str(path) in caplog.text for path in paths)


def test_holdout_plots_first_without_a_model_then_importance(fitted, tmp_path) -> None:
    """How training draws them: the holdout's three beside the refit, importance after it."""
    paths, name = ProjectPaths(tmp_path), "gbm_target_encoded"
    y, p, model = fitted["y"], fitted["p"][name], fitted["models"][name]
    with pytest.raises(ValueError, match="a model for importance"):
        write_report_plots(paths, "v", y, p, None)
    first = write_report_plots(paths, "v", y, p, None, fitted["p"], kinds=HOLDOUT_KINDS)
    assert not paths.report_plot("v", "importance").exists()
    last = write_report_plots(paths, "v", y, p, model, kinds=("importance",))
    _assert_pngs(first + last, paths.reports_dir, "v")
    with pytest.raises(RtbError, match="report_v_importance.png.*never overwritten"):
        write_report_plots(paths, "v", y, p, model, kinds=("importance",))


def test_refuses_to_overwrite_a_version(fitted, tmp_path) -> None:
    args = (fitted["y"], fitted["p"]["logreg_onehot"], fitted["models"]["logreg_onehot"])
    first = write_report_plots(ProjectPaths(tmp_path), "v1", *args)
    before = {path: path.read_bytes() for path in first}
    with pytest.raises(RtbError, match="report_v1_roc.png.*never overwritten"):
        write_report_plots(ProjectPaths(tmp_path), "v1", *args)
    assert {path: path.read_bytes() for path in first} == before
    assert len(write_report_plots(ProjectPaths(tmp_path), "v2", *args)) == 4


def test_feature_names_come_from_the_encoders(fitted) -> None:
    onehot = fitted["models"]["logreg_onehot"]
    names = feature_names(onehot, onehot[-1].estimator_.coef_.shape[1])
    assert any(name.startswith("onehot__campaignId=c") for name in names)
    assert "numeric__fromLastStart" in names
    gbm = fitted["models"]["gbm_target_encoded"]
    names = feature_names(gbm, gbm[-1].estimator_.n_features_in_)
    assert "target__te_campaignIdxcountry" in names


def test_falls_back_to_positional_names_when_pipeline_cannot_name_features(tmp_path) -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(500, 3))
    y = (X[:, 0] + rng.normal(size=500) > 0).astype(int)
    # A bare numpy array gives StandardScaler no input names: it answers x0.. itself; a step
    # without get_feature_names_out must fall back too.
    model = Pipeline([("passthrough", _NoNames()), ("model", LogitRecalibrated(
        LogisticRegression()))]).fit(X, y)
    assert feature_names(model, 3) == ["x0", "x1", "x2"]
    scaled = Pipeline([("scale", StandardScaler()), ("model", LogitRecalibrated(
        LogisticRegression()))]).fit(X, y)
    paths = write_report_plots(ProjectPaths(tmp_path), "plain", y, scaled.predict_proba(X)[:, 1], scaled)
    assert len(paths) == 4


class _NoNames:
    def fit(self, X, y=None):
        return self

    def transform(self, X):
        return X


def test_bad_inputs_name_the_problem(fitted, tmp_path) -> None:
    model = fitted["models"]["logreg_onehot"]
    y, p = fitted["y"], fitted["p"]["logreg_onehot"]
    with pytest.raises(RtbError, match="y_holdout has .* rows but p_holdout has"):
        write_report_plots(ProjectPaths(tmp_path), "v", y, p[:-1], model)
    with pytest.raises(RtbError, match="only label"):
        write_report_plots(ProjectPaths(tmp_path), "v", np.zeros_like(y), p, model)
    with pytest.raises(RtbError, match=r"candidates\['other'\]: has"):
        write_report_plots(ProjectPaths(tmp_path), "v", y, p, model, candidates={"other": p[:10]})
    with pytest.raises(RtbError, match="p_holdout: expected finite probabilities"):
        write_report_plots(ProjectPaths(tmp_path), "v", y, np.where(p > 0.5, np.nan, p) + np.nan, model)
    assert list(tmp_path.iterdir()) == []


def _drawn_tick_labels(figure) -> dict[str, list]:
    """Per axis, the (text, pixel box) of every tick label drawn inside the axis range."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    axes = figure.axes[0]
    drawn = {}
    for name, axis, (low, high) in (("x", axes.xaxis, axes.get_xlim()), ("y", axes.yaxis, axes.get_ylim())):
        drawn[name] = [
            (tick.label1.get_text(), tick.label1.get_window_extent(renderer))
            for tick in [*axis.get_major_ticks(), *axis.get_minor_ticks()]
            if tick.label1.get_visible() and tick.label1.get_text() and low <= tick.get_loc() <= high
        ]
    return drawn


@pytest.mark.parametrize(("centre", "spread"), [(0.012, 0.6), (0.003, 0.6), (0.05, 0.4), (0.02, 0.15),
                                                (0.001, 2.5)])
def test_reliability_tick_labels_do_not_overlap(centre: float, spread: float) -> None:
    """Around a 1% base rate a log axis spans under two decades, where matplotlib's default
    labels minor ticks too (2, 3, 4, 6 x 10^k) and they collide along the x axis."""
    rng = np.random.default_rng(0)
    p = np.clip(rng.lognormal(np.log(centre), spread, 20_000), 1e-6, 0.999)
    y = (rng.random(len(p)) < p).astype(np.int8)
    for name, labels in _drawn_tick_labels(_reliability_figure(y, p, "v")).items():
        texts = [text for text, _ in labels]
        assert len(texts) >= 2, f"{name} axis: {texts}"
        clashes = [(a[0], b[0]) for i, a in enumerate(labels) for b in labels[i + 1:] if a[1].overlaps(b[1])]
        assert not clashes, f"{name} axis tick labels overlap: {clashes}"
