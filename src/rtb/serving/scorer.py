"""The scorer a service uses for one model: compiled when proven equal, else the pipeline.

A compiled scorer is only trusted after it reproduced the pipeline's probabilities on probe
rows built from the model's own vocabularies (seen levels, seen crosses, unseen levels,
gaps, out-of-range numbers). Anything it cannot compile, or any disagreement beyond 1e-9,
leaves the pipeline in charge, with the reason shown by `GET /model`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

from rtb.data.preprocessing import derive_features
from rtb.dataset_config import DatasetConfig
from rtb.errors import RtbError
from rtb.models.pipeline import feature_frame
from rtb.serving.compiled import CompiledScorer, compile_pipeline
from rtb.serving.errors import NotCompilable

log = logging.getLogger(__name__)

TOLERANCE = 1e-9
PROBE_ROWS = 256


def records_to_frame(rows: Sequence[Mapping[str, object]], cfg: DatasetConfig) -> pd.DataFrame:
    """Request rows as the raw frame `derive_features` expects (absent keys are gaps).

    Every column is built as an object column so that an int id stays "123" (as the CSV
    reader gives it) instead of pandas widening a column of ints and gaps to floats.
    """
    columns = cfg.raw_columns("test")
    if not cfg.id:
        columns = [cfg.id_column, *columns]
    data = {}
    for name in columns:
        values = [row.get(name) for row in rows]
        if name == cfg.timestamp or name in cfg.datetimes:
            values = [_utc(v) for v in values]
        data[name] = pd.Series(values, dtype=object)
    return pd.DataFrame(data)


def _utc(value: object) -> object:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


@dataclass
class PipelineScorer:
    """The fitted pipeline itself, through pandas: the reference, and the fallback."""

    pipeline: object
    cfg: DatasetConfig

    def score_many(self, rows: Sequence[Mapping[str, object]]) -> list[float]:
        processed = derive_features(records_to_frame(rows, self.cfg), self.cfg)
        p = self.pipeline.predict_proba(feature_frame(processed, self.cfg))[:, 1]
        return np.asarray(p, dtype=np.float64).tolist()

    def score_one(self, row: Mapping[str, object]) -> float:
        return self.score_many([row])[0]


@dataclass
class Scorer:
    """What the service calls: `kind` is "compiled" or "pipeline", `reason` says why."""

    kind: str
    reason: str
    implementation: CompiledScorer | PipelineScorer = field(repr=False)
    build_seconds: float = 0.0
    max_probe_difference: float | None = None

    def score_one(self, row: Mapping[str, object]) -> float:
        return self.implementation.score_one(row)

    def score_many(self, rows: Sequence[Mapping[str, object]]) -> list[float]:
        return self.implementation.score_many(rows)


def build_scorer(pipeline: object, cfg: DatasetConfig, *, try_compile: bool = True) -> Scorer:
    """Compile and verify; fall back to the pipeline (never fail) unless the pipeline itself
    cannot score the probe rows, which means the model does not fit this dataset config."""
    started = time.perf_counter()
    reference = PipelineScorer(pipeline, cfg)
    probes = probe_rows(pipeline, cfg)
    try:
        expected = np.asarray(reference.score_many(probes))
    except Exception as exc:  # any failure here means this model cannot serve this schema
        raise RtbError(
            f"model cannot score {cfg.name} requests ({type(exc).__name__}: {exc})"
        ) from exc
    if not np.all(np.isfinite(expected)):
        raise RtbError("model produced non-finite probabilities on probe rows")
    if not try_compile:
        return Scorer("pipeline", "compilation disabled", reference,
                      time.perf_counter() - started)
    try:
        compiled = compile_pipeline(pipeline, cfg)
    except NotCompilable as exc:
        log.warning("serving with the pipeline: %s", exc)
        return Scorer("pipeline", f"not compilable: {exc}", reference,
                      time.perf_counter() - started)
    one = np.asarray([compiled.score_one(row) for row in probes])
    many = np.asarray(compiled.score_many(probes))
    difference = float(max(np.max(np.abs(one - expected)), np.max(np.abs(many - expected))))
    if not difference <= TOLERANCE:
        reason = (
            f"compiled scorer differs from the pipeline by {difference:.3g} on probe rows "
            f"(tolerance {TOLERANCE:g})"
        )
        log.warning("serving with the pipeline: %s", reason)
        return Scorer("pipeline", reason, reference, time.perf_counter() - started, difference)
    reason = (
        f"compiled {compiled.kind}; matches the pipeline within {difference:.1e} on "
        f"{len(probes)} probe rows"
    )
    return Scorer("compiled", reason, compiled, time.perf_counter() - started, difference)


def _vocabularies(pipeline: object) -> tuple[dict[str, list[str]], list]:
    """Levels per categorical column and fitted target encoders, found by walking the model."""
    levels: dict[str, list[str]] = {}
    encoders: list = []
    seen: set[int] = set()

    def walk(obj: object, depth: int) -> None:
        if depth > 6 or id(obj) in seen:
            return
        seen.add(id(obj))
        vocabularies = getattr(obj, "vocabularies_", None)
        names = getattr(obj, "feature_names_in_", None)
        if vocabularies is not None and names is not None:
            for name, vocabulary in zip(names, vocabularies, strict=False):
                levels.setdefault(str(name), [str(v) for v in list(vocabulary)[:2000]])
            if hasattr(obj, "tables_") and hasattr(obj, "radix_"):
                encoders.append(obj)
        for child in _children(obj):
            walk(child, depth + 1)

    walk(pipeline, 0)
    return levels, encoders


def _children(obj: object) -> list:
    children = []
    for attr in ("steps", "transformers_"):
        for item in getattr(obj, attr, None) or []:
            children.append(item[1])
    for attr in ("estimator_",):
        if hasattr(obj, attr):
            children.append(getattr(obj, attr))
    return children


def probe_rows(pipeline: object, cfg: DatasetConfig, n: int = PROBE_ROWS,
               seed: int = 0) -> list[dict[str, object]]:
    """Rows that exercise every code path: frequent and rare levels, seen crosses, unseen
    levels, gaps and absent keys, ints for text fields, numbers far outside the training
    range, negative and missing recency."""
    rng = np.random.default_rng(seed)
    levels, encoders = _vocabularies(pipeline)
    crosses = _seen_crosses(encoders, rng)
    base = datetime(2019, 1, 10, 12, 0, tzinfo=UTC)
    rows: list[dict[str, object]] = []
    for i in range(n):
        stamp = base + timedelta(seconds=float(rng.uniform(0, 5 * 86400)), microseconds=i)
        row: dict[str, object] = {cfg.timestamp: stamp}
        if cfg.id:
            row[cfg.id] = f"probe-{i}"
        for name in cfg.categorical:
            options = levels.get(name) or ["a", "b"]
            draw = rng.random()
            if draw < 0.08:
                row[name] = None
            elif draw < 0.14:
                row[name] = f"unseen-{i}"
            elif draw < 0.18:
                continue
            elif draw < 0.6:
                row[name] = options[int(rng.integers(0, min(len(options), 10)))]
            else:
                row[name] = options[int(rng.integers(0, len(options)))]
            value = row.get(name)
            if isinstance(value, str) and value.isdigit() and rng.random() < 0.5:
                row[name] = int(value)
        if crosses and i % 2 == 0:
            row.update(crosses[i % len(crosses)])
        for name in cfg.numerical:
            draw = rng.random()
            if draw < 0.08:
                row[name] = None
            elif draw < 0.12:
                continue
            elif draw < 0.2:
                row[name] = float(rng.choice([0.0, -1.0, -0.5, 1e6, 12345.678]))
            elif draw < 0.6:
                row[name] = int(rng.poisson(5))
            else:
                row[name] = float(np.round(rng.exponential(20.0), 3))
        for source in cfg.datetimes:
            draw = rng.random()
            if draw < 0.15:
                row[source] = None
            elif draw < 0.2:
                continue
            elif draw < 0.25:
                row[source] = stamp + timedelta(hours=float(rng.exponential(3)))
            else:
                row[source] = stamp - timedelta(hours=float(rng.exponential(48)),
                                                microseconds=int(rng.integers(0, 10**6)))
        rows.append(row)
    return rows


def _seen_crosses(encoders: list, rng: np.random.Generator) -> list[dict[str, str]]:
    """Level combinations the target encoders' crossed tables hold (decoded keys)."""
    out: list[dict[str, str]] = []
    for encoder in encoders:
        groups = encoder._groups()
        vocab = dict(zip(encoder.feature_names_in_, encoder.vocabularies_, strict=False))
        for group, table in zip(groups, encoder.tables_, strict=False):
            if len(group) < 2 or len(table[0]) == 0:
                continue
            keys = np.asarray(table[0])
            for key in rng.choice(keys, size=min(8, len(keys)), replace=False).tolist():
                decoded = {}
                for name in reversed(group):
                    radix = int(encoder.radix_[name])
                    code = key % radix
                    key //= radix
                    if code < len(vocab[name]):
                        decoded[name] = str(vocab[name][code])
                out.append(decoded)
    return out
