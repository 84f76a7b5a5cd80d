"""The scorer a service uses for one model: compiled when proven equal, else the pipeline.

A compiled scorer (`rtb.scoring.compiled`, generated from the model's scoring tables) is only
trusted after it reproduced the pipeline's probabilities on probe rows built from the
model's own vocabularies (seen levels, seen crosses, unseen levels, gaps, out-of-range
numbers), by the agreement check batch scoring uses too. Anything that does not tabulate,
or any disagreement, leaves the pipeline in charge, with the reason shown by `GET /model`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np

from rtb.dataset_config import DatasetConfig
from rtb.errors import RtbError
from rtb.features import rows_frame
from rtb.scoring import agreement
from rtb.scoring.compiled import CompiledScorer, compile_pipeline
from rtb.scoring.errors import NotTabulable

log = logging.getLogger(__name__)

PROBE_ROWS = 256


@dataclass
class PipelineScorer:
    """The fitted pipeline itself, through pandas: the reference, and the fallback."""

    pipeline: object
    cfg: DatasetConfig

    def score_many(self, rows: Sequence[Mapping[str, object]]) -> list[float]:
        p = self.pipeline.predict_proba(rows_frame(rows, self.cfg))[:, 1]
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

    def fallback(reason: str) -> Scorer:
        return Scorer("pipeline", reason, reference, time.perf_counter() - started)

    if not try_compile:
        return fallback("compilation disabled")
    try:
        compiled = compile_pipeline(pipeline, cfg)
    except NotTabulable as exc:
        log.warning("serving with the pipeline: %s", exc)
        return fallback(f"not compilable: {exc}")
    one = [compiled.score_one(row) for row in probes]
    many = compiled.score_many(probes)
    difference = max(agreement.disagreement(one, expected),
                     agreement.disagreement(many, expected))
    if not agreement.agrees(one, expected) or not agreement.agrees(many, expected):
        reason = (
            f"compiled scorer differs from the pipeline by {difference:.3g} on probe rows "
            f"(tolerance {agreement.AGREEMENT:g})"
        )
        log.warning("serving with the pipeline: %s", reason)
        return fallback(reason)
    reason = (
        f"compiled {compiled.kind}; matches the pipeline within {difference:.1e} on "
        f"{len(probes)} probe rows"
    )
    return Scorer("compiled", reason, compiled, time.perf_counter() - started)


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
            if hasattr(obj, "encoding_tables"):
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
        for table in encoder.encoding_tables():
            if len(table.columns) < 2 or len(table.keys) == 0:
                continue
            chosen = rng.choice(table.keys, size=min(8, len(table.keys)), replace=False)
            for key in chosen.tolist():
                decoded = {}
                for name, vocabulary, radix in zip(
                    reversed(table.columns), reversed(table.vocabularies),
                    reversed(table.radixes), strict=True,
                ):
                    key, code = divmod(key, radix)
                    if code < len(vocabulary):
                        decoded[name] = str(vocabulary[code])
                out.append(decoded)
    return out
