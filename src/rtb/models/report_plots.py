"""Pictures of a training run, written next to `reports/report_<version>.yaml`.

The YAML report holds the numbers; these PNGs let a reviewer see in seconds whether the model
ranks well (ROC), whether its probabilities can be bid on (reliability, deciles) and what it
leans on (importance). Figures are built on `matplotlib.figure.Figure` directly, never through
`pyplot`, so no global backend or figure registry is touched: the training stage can call
this from any process (a container without a display, a test runner, a notebook) and leaks
no figures. Every file is written atomically and never overwrites an earlier run's picture.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
from sklearn.metrics import roc_auc_score, roc_curve
from sklearn.pipeline import Pipeline

from rtb.config import ProjectPaths
from rtb.errors import RtbError
from rtb.io_utils import EXISTS, atomic_path
from rtb.models.metrics import reliability_table

log = logging.getLogger(__name__)

KINDS = ("roc", "reliability", "deciles", "importance")
HOLDOUT_KINDS = KINDS[:3]  # drawn from the holdout's probabilities alone
RELIABILITY_BINS = 10
DECILES = 10
TOP_FEATURES = 20
MAX_CURVE_POINTS = 4000  # a 700k-row holdout has ~100k ROC vertices; 4k draw the same line
LABEL_CHARS = 48
LOG_FINE_DECADES = 2.5  # a log axis up to this wide gets 1-2-5 ticks, a wider one decades only
LOG_MAX_DECADE_TICKS = 8  # beyond this many decades, label every other (or third...) decade
DPI = 110
_SELECTED_COLOR = "#1f4e79"
_POSITIVE_COLOR = "#2e7d32"
_NEGATIVE_COLOR = "#c62828"


def write_report_plots(
    paths: ProjectPaths,
    version: str,
    y_holdout: np.ndarray,
    p_holdout: np.ndarray,
    model: Pipeline | None,
    candidates: Mapping[str, np.ndarray] | None = None,
    *,
    kinds: Sequence[str] = KINDS,
) -> list[Path]:
    """Write the ROC, reliability, decile and importance PNGs of one model version (or the
    `kinds` of them asked for: the holdout's three need no `model`, so training draws them
    before its refit is done, and the importance plot once it is).

    `p_holdout` are the selected model's (calibrated) probabilities on the time holdout and
    `candidates` maps candidates' names to theirs on the same rows (ROC only; an entry equal
    to `p_holdout` names the selected curve instead of being drawn twice). Returns
    the written paths in `KINDS` order. Refuses to run if any of those pictures of `version`
    exists, so a rerun never mixes pictures of two different fits under one version.
    """
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or ("importance" in kinds and model is None):
        raise ValueError(f"plots {list(kinds)}: expected some of {KINDS}, a model for importance")
    y, p = _check_inputs(y_holdout, p_holdout, candidates)
    targets = {kind: paths.report_plot(version, kind) for kind in KINDS if kind in kinds}
    existing = [str(path) for path in targets.values() if path.exists()]
    if existing:
        raise RtbError(f"{', '.join(existing)}: {EXISTS}")
    builders = {
        "roc": lambda: _roc_figure(y, p, candidates or {}, version),
        "reliability": lambda: _reliability_figure(y, p, version),
        "deciles": lambda: _decile_figure(y, p, version),
        "importance": lambda: _importance_figure(model, version),
    }
    written = []
    for kind in targets:
        figure = builders[kind]()
        with atomic_path(targets[kind]) as tmp:
            figure.savefig(tmp, format="png", dpi=DPI)
        log.info("wrote %s plot to %s (%d bytes)", kind, targets[kind], targets[kind].stat().st_size)
        written.append(targets[kind])
    return written


def _check_inputs(
    y_holdout: np.ndarray, p_holdout: np.ndarray, candidates: Mapping[str, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_holdout).ravel()
    p = np.asarray(p_holdout, dtype=np.float64).ravel()
    if len(y) != len(p):
        raise RtbError(f"y_holdout has {len(y)} rows but p_holdout has {len(p)}; expected equal")
    labels = set(np.unique(y).tolist())
    if not labels <= {0, 1}:
        raise RtbError(f"y_holdout: expected 0/1 labels, got values {sorted(labels)[:5]}")
    if labels != {0, 1}:
        raise RtbError(
            f"y_holdout: has only label(s) {sorted(labels)} in {len(y)} rows; ROC and "
            "reliability plots need both installs and non-installs"
        )
    named = [("p_holdout", p), *((f"candidates[{k!r}]", v) for k, v in (candidates or {}).items())]
    for name, values in named:
        values = np.asarray(values, dtype=np.float64).ravel()
        if len(values) != len(y):
            raise RtbError(f"{name}: has {len(values)} rows, expected {len(y)} like y_holdout")
        if not np.all(np.isfinite(values)) or values.min() < 0 or values.max() > 1:
            raise RtbError(f"{name}: expected finite probabilities in [0, 1]")
    return y.astype(np.int8), p


def _new_figure(title: str, size: tuple[float, float] = (7.0, 5.5)) -> tuple[Figure, Axes]:
    figure = Figure(figsize=size, layout="constrained")
    axes = figure.add_subplot()
    axes.set_title(title, fontsize=11)
    axes.grid(True, alpha=0.3)
    return figure, axes


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most MAX_CURVE_POINTS vertices of a monotone curve, keeping both ends."""
    if len(x) <= MAX_CURVE_POINTS:
        return x, y
    keep = np.unique(np.linspace(0, len(x) - 1, MAX_CURVE_POINTS).round().astype(int))
    return x[keep], y[keep]


def _roc_figure(
    y: np.ndarray, p: np.ndarray, candidates: Mapping[str, np.ndarray], version: str
) -> Figure:
    figure, axes = _new_figure(f"ROC on the time holdout ({len(y):,} rows) - {version}")
    selected = "selected model"
    for name, scores in candidates.items():
        scores = np.asarray(scores, dtype=np.float64).ravel()
        if np.array_equal(scores, p):  # the selected model is usually among the candidates
            selected = f"selected: {name}"
            continue
        fpr, tpr, _ = roc_curve(y, scores)
        axes.plot(*_thin(fpr, tpr), lw=1.2, alpha=0.8,
                  label=f"{name} (AUC {roc_auc_score(y, scores):.4f})")
    fpr, tpr, _ = roc_curve(y, p)
    axes.plot(*_thin(fpr, tpr), lw=2.4, color=_SELECTED_COLOR,
              label=f"{selected} (AUC {roc_auc_score(y, p):.4f})")
    axes.plot([0, 1], [0, 1], ls="--", lw=1, color="grey", label="chance (AUC 0.5)")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("false positive rate")
    axes.set_ylabel("true positive rate (share of installs ranked above the threshold)")
    axes.legend(loc="lower right", fontsize=9)
    return figure


def _wilson_interval(positives: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """95% Wilson interval of a rate: honest for the few installs a low bin holds."""
    z = 1.96
    rate = positives / rows
    centre = (rate + z * z / (2 * rows)) / (1 + z * z / rows)
    half = z * np.sqrt(rate * (1 - rate) / rows + z * z / (4 * rows * rows)) / (1 + z * z / rows)
    return centre - half, centre + half


def _reliability_figure(y: np.ndarray, p: np.ndarray, version: str) -> Figure:
    """Mean predicted vs observed install rate in equal-count bins, on log axes.

    Install probabilities span two or three orders of magnitude around a ~1% base rate; on
    linear axes every bin but the top one collapses into the corner.
    """
    table = reliability_table(y, p, bins=RELIABILITY_BINS)
    predicted = np.array([row["mean_predicted"] for row in table])
    observed = np.array([row["observed_rate"] for row in table])
    rows = np.array([row["rows"] for row in table], dtype=np.float64)
    low, high = _wilson_interval(observed * rows, rows)
    positive = np.concatenate([predicted[predicted > 0], observed[observed > 0], high])
    floor = max(float(positive.min()) / 2 if positive.size else 1e-4, 1e-6)
    top = min(1.0, float(max(predicted.max(), high.max())) * 2)
    shown = np.maximum(observed, floor)
    figure, axes = _new_figure(
        f"Reliability: {RELIABILITY_BINS} equal-count bins of {int(rows[0]):,}+ rows - {version}"
    )
    axes.plot([floor, top], [floor, top], ls="--", lw=1, color="grey", label="perfect calibration")
    axes.errorbar(
        np.maximum(predicted, floor), shown,
        yerr=[shown - np.maximum(low, floor), np.maximum(high, floor) - shown],
        fmt="o-", color=_SELECTED_COLOR, ecolor="#7a9cc6", capsize=3, label="observed (95% CI)",
    )
    zero = observed == 0
    if zero.any():
        axes.scatter(np.maximum(predicted[zero], floor), shown[zero], s=70, facecolors="none",
                     edgecolors=_NEGATIVE_COLOR, zorder=3, label="no installs in bin (drawn at floor)")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlim(floor, top)
    axes.set_ylim(floor, top)
    _log_ticks(axes, floor, top)
    axes.set_xlabel("mean predicted install probability")
    axes.set_ylabel("observed install rate")
    ratio = float(p.mean() / y.mean())
    axes.legend(loc="upper left", fontsize=9,
                title=f"mean predicted / observed = {ratio:.3f}", title_fontsize=9)
    return figure


def _log_ticks(axes: Axes, low: float, high: float) -> None:
    """Readable ticks on both log axes of [low, high]: 1-2-5 steps as plain decimals over a
    range of up to LOG_FINE_DECADES decades, whole decades beyond, minor ticks unlabelled.

    matplotlib's default labels the minor ticks (2, 3, 4, 6 x 10^k) whenever a log axis spans
    less than about two decades, as a reliability plot around a 1% base rate does, and those
    labels overlap along the x axis."""
    subs = (1.0, 2.0, 5.0) if np.log10(high / low) <= LOG_FINE_DECADES else (1.0,)
    for axis in (axes.xaxis, axes.yaxis):
        axis.set_major_locator(LogLocator(base=10.0, subs=subs, numticks=LOG_MAX_DECADE_TICKS))
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_locator(LogLocator(base=10.0, subs=np.arange(2, 10), numticks=100))
        axis.set_minor_formatter(NullFormatter())


def _decile_figure(y: np.ndarray, p: np.ndarray, version: str) -> Figure:
    table = reliability_table(y, p, bins=DECILES)
    observed = np.array([row["observed_rate"] for row in table])
    predicted = np.array([row["mean_predicted"] for row in table])
    deciles = np.arange(1, len(table) + 1)
    figure, axes = _new_figure(f"Install rate by predicted-probability decile - {version}")
    axes.bar(deciles, observed, color="#8fb3d9", edgecolor=_SELECTED_COLOR, label="observed rate")
    axes.plot(deciles, predicted, "D", color=_NEGATIVE_COLOR, label="mean predicted")
    axes.axhline(y.mean(), ls="--", lw=1, color="grey", label=f"base rate {y.mean():.4f}")
    lift = observed[-1] / y.mean()
    axes.set_xticks(deciles)
    axes.set_xlabel("decile of predicted probability (1 = lowest, 10 = highest)")
    axes.set_ylabel("install rate")
    axes.legend(loc="upper left", fontsize=9, title=f"top-decile lift {lift:.2f}x",
                title_fontsize=9)
    return figure


def feature_names(model: Pipeline, n_features: int) -> list[str]:
    """Names of the final estimator's inputs, or x0..xN when the pipeline cannot tell."""
    try:
        names = [str(name) for name in model[:-1].get_feature_names_out()]
    except Exception as exc:  # noqa: BLE001 - any failure here only costs readable labels
        log.warning("feature names unavailable (%s); labelling features x0..x%d",
                    exc, n_features - 1)
        return [f"x{i}" for i in range(n_features)]
    if len(names) != n_features:
        log.warning("pipeline names %d features but the model has %d; labelling x0..x%d",
                    len(names), n_features, n_features - 1)
        return [f"x{i}" for i in range(n_features)]
    return names


def _inner_estimator(model: Pipeline) -> object:
    """The fitted model inside the `LogitRecalibrated` last step (or the last step itself)."""
    final = model[-1] if isinstance(model, Pipeline) else model
    return getattr(final, "estimator_", final)


def _importances(estimator: object) -> tuple[np.ndarray, str, bool] | None:
    """(values, axis label, signed) of a linear model's coefficients or a tree model's gains."""
    if hasattr(estimator, "coef_"):
        coef = np.asarray(estimator.coef_, dtype=np.float64)
        return coef.reshape(-1) if coef.ndim == 1 else coef[0], "coefficient", True
    booster = getattr(estimator, "booster_", None)
    if booster is not None:
        gain = np.asarray(booster.feature_importance(importance_type="gain"), dtype=np.float64)
        total = gain.sum()
        return (gain / total if total > 0 else gain), "share of total split gain", False
    if hasattr(estimator, "feature_importances_"):
        return np.asarray(estimator.feature_importances_, dtype=np.float64), "importance", False
    return None


def _shorten(label: str) -> str:
    return label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "\u2026"


def _importance_figure(model: Pipeline, version: str) -> Figure:
    estimator = _inner_estimator(model)
    found = _importances(estimator)
    kind = type(estimator).__name__
    if found is None:
        figure, axes = _new_figure(f"Feature importance - {version}")
        axes.axis("off")
        axes.text(0.5, 0.5, f"{kind} exposes neither coefficients nor feature importances",
                  ha="center", va="center")
        log.warning("importance plot of %s: %s has no coef_ or feature_importances_",
                    version, kind)
        return figure
    values, label, signed = found
    names = feature_names(model, len(values))
    order = np.argsort(-np.abs(values), kind="stable")[:TOP_FEATURES][::-1]
    top = values[order]
    what = "coefficients by |value|" if signed else "features by gain"
    figure, axes = _new_figure(
        f"{kind}: top {len(order)} of {len(values):,} {what} - {version}",
        size=(8.5, 0.32 * len(order) + 1.8),
    )
    colors = [_POSITIVE_COLOR if v >= 0 else _NEGATIVE_COLOR for v in top] if signed else (
        _SELECTED_COLOR)
    axes.barh(np.arange(len(order)), top, color=colors)
    axes.set_yticks(np.arange(len(order)), [_shorten(names[i]) for i in order], fontsize=8)
    axes.set_xlabel(label + (" (green raises, red lowers the install odds)" if signed else ""))
    if signed:
        axes.axvline(0, color="black", lw=0.8)
    axes.grid(True, axis="x", alpha=0.3)
    axes.grid(False, axis="y")
    return figure
