"""The per-request scorer of `rtb serve`: the scoring tables as generated pure Python.

Why generated code: `predict_proba` on a one-row frame is almost all pandas and sklearn
overhead, while a row needs a few dictionary lookups and multiply-adds. From the
tables of `rtb.scoring.tables` one function is generated at model load:

- the features: one call of `rtb.features.row_deriver(cfg)`, the definition batch data goes
  through as well;
- one dict lookup per categorical column (level -> a tuple of its code, if a cross needs it,
  and every value the head reads for that level) and one per crossed table (key -> its
  values). Memory locality decides the speed here: a tuple of everything a key holds costs
  one cache miss instead of one per value;
- the numeric block's constants, rounding to float32 wherever sklearn computes in float32;
- the head (a sum of contributions, or LightGBM's trees as nested if/else from
  `rtb.scoring.lgbm_trees`, or both for the blend, weighted), then the Platt step.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit

from rtb.dataset_config import DatasetConfig
from rtb.features import f32, row_deriver
from rtb.scoring import lgbm_trees
from rtb.scoring.artifact import (
    BlendHead,
    KeyTable,
    LinearHead,
    NumericBlock,
    ScoringTables,
    TreeHead,
)
from rtb.scoring.errors import NotTabulable
from rtb.scoring.tables import tabulate

log = logging.getLogger(__name__)


def log1p_nonnegative(value: float) -> float:
    """`rtb.models.pipeline.log1p_nonnegative` for one imputed (never NaN) value."""
    return math.log1p(value) if value > 0.0 else 0.0


def sigmoid(z: float) -> float:
    """`scipy.special.expit` without overflow for large |z|."""
    if z >= 0.0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def reject_infinity() -> None:
    """What SimpleImputer does with an infinite count: the pipeline cannot score the row."""
    raise ValueError("a numeric feature is infinite; the model's imputer rejects it")


class _Source:
    """Generated statements, their constants and fresh local names."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.constants: dict[str, object] = {
            "_f32": f32, "_log1p_nn": log1p_nonnegative, "_sigmoid": sigmoid,
            "_reject_infinity": reject_infinity,
        }
        self._counter = 0

    def name(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}{self._counter}"

    def const(self, prefix: str, value: object) -> str:
        name = self.name(f"_{prefix}")
        self.constants[name] = value
        return name

    def emit(self, line: str) -> None:
        self.lines.append("    " + line)

    def text(self, name: str, result: str) -> str:
        return f"def {name}(row):\n" + "\n".join(self.lines) + f"\n    return {result}\n"

    def function(self, name: str, result: str) -> Callable:
        namespace = dict(self.constants)
        exec(compile(self.text(name, result), f"<rtb-scorer-{name}>", "exec"), namespace)
        return namespace[name]  # type: ignore[return-value]


def _rows(columns: list[list[float]]) -> list:
    """Row tuples of equally long columns; a single column stays bare (no 1-tuples)."""
    return columns[0] if len(columns) == 1 else list(zip(*columns, strict=True))


def _lookups(tables: ScoringTables, text: list[str], src: _Source,
             transform: Callable[[np.ndarray], np.ndarray]) -> list[list[str]]:
    """Statements reading every group's values; per group, the locals that hold them.

    `transform` maps a group's values to what the head reads (e.g. tiny values zeroed)."""
    singles = {g.columns[0]: p for p, g in enumerate(tables.groups) if len(g.columns) == 1}
    crossed = {c for g in tables.groups if len(g.columns) > 1 for c in g.columns}
    out: list[list[str]] = [[] for _ in tables.groups]
    code_var: dict[int, str] = {}
    for column, vocabulary in enumerate(tables.vocabularies):
        targets: list[str] = []
        values: list[list[float]] = []
        radix = len(vocabulary) + 1
        if column in crossed:
            code_var[column] = src.name("k")
            targets.append(code_var[column])
            values.append(list(range(radix)))
        if column in singles:
            position = singles[column]
            group = tables.groups[position]
            by_code = transform(group.by_key())
            out[position] = [src.name("x") for _ in range(group.width)]
            targets += out[position]
            values += [by_code[:, i].tolist() for i in range(group.width)]
        if not targets:
            continue
        rows = _rows(values)
        mapping = src.const("map", {str(level): rows[code] for code, level in enumerate(vocabulary)})
        default = src.const("default", rows[radix - 1])
        src.emit(f"{', '.join(targets)} = {mapping}.get({text[column]}, {default})")
    for position, group in enumerate(tables.groups):
        if len(group.columns) == 1:
            continue
        key = code_var[group.columns[0]]
        for column, radix in zip(group.columns[1:], group.radixes[1:], strict=True):
            key = f"({key} * {radix} + {code_var[column]})"
        values = transform(group.values)
        rows = _rows([values[:, i].tolist() for i in range(group.width)])
        mapping = src.const("cross", dict(zip(group.keys.tolist(), rows[:-1], strict=True)))
        default = src.const("default", rows[-1])
        out[position] = [src.name("x") for _ in range(group.width)]
        src.emit(f"{', '.join(out[position])} = {mapping}.get({key}, {default})")
    return out


def _numeric(block: NumericBlock | None, number: list[str], src: _Source) -> list[str]:
    """Statements for the numeric block; the locals holding its outputs."""
    if block is None:
        return []
    out = []
    for column, var in enumerate(number):
        if block.fills is not None:
            fill = float(block.fills[column])
            src.emit(f"{var} = {var} if {var} == {var} else {fill!r}")
    if block.fills is not None and number:  # a sum of float32 values is finite unless one is inf
        src.emit(f"if ({' + '.join(number)}) * 0.0 != 0.0: _reject_infinity()")
    round32 = "_f32" if block.dtype == np.float32 else ""
    for column, var in enumerate(number):
        expression = f"_log1p_nn({var})" if block.log1p else var
        if block.mean is not None:
            expression = f"{round32}({expression} - {float(block.mean[column])!r})"
        if block.scale is not None:
            expression = f"{round32}({expression} / {float(block.scale[column])!r})"
        if expression != var:
            src.emit(f"{var} = {expression}")
        out.append(var)
    return out


def _linear(head: LinearHead, groups: list[list[str]], numeric: list[str], src: _Source,
            raw: str = "raw") -> None:
    """The decision function into `raw`: order-free in float64, else float32 in column order."""
    weights = [repr(float(w)) for w in head.weights]
    if not head.float32:
        terms = [repr(head.intercept), *(v for vs in groups for v in vs)]
        terms += [f"{w} * {v}" for w, v in zip(weights, numeric, strict=True)]
        src.emit(f"{raw} = {' + '.join(terms)}")
        return
    src.emit(f"{raw} = 0.0")
    for var in (v for vs in groups for v in vs):
        src.emit(f"{raw} = _f32({raw} + {var})")
    for w, var in zip(weights, numeric, strict=True):
        src.emit(f"{raw} = _f32({raw} + _f32({var} * {w}))")
    src.emit(f"{raw} = _f32({raw} + {head.intercept!r})")


def _trees(head: TreeHead, groups: list[list[str]], numeric: list[str], src: _Source,
           raw: str = "raw") -> Callable:
    """The ensemble's if/else into `raw`; returns the function giving a row's feature list
    (what the booster's batch predictor reads)."""
    zero = repr(lgbm_trees.ZERO_THRESHOLD)
    for var in numeric:
        src.emit(f"if -{zero} <= {var} <= {zero}: {var} = 0.0")
    names = [v for vs in groups for v in vs] + numeric
    features_of = src.function("features_of", f"[{', '.join(names)}]")
    for line in lgbm_trees.ensemble_statements(head.ensemble, names, raw, ""):
        src.emit(line)
    return features_of


def _blend(tables: ScoringTables, head: BlendHead, text: list[str], number: list[str],
           src: _Source) -> None:
    """Both sides of a blend into `raw`: one lookup per key for both sides' values (the two
    sides' tables share their keys), the linear side on a copy of the raw numbers (its
    numeric steps change them), then the trees."""
    joined = tuple(
        KeyTable(trees.columns, trees.radixes, trees.keys,
                 np.hstack([_zero_tiny(trees.values), linear.values]))
        for trees, linear in zip(tables.groups, head.linear_groups, strict=True)
    )
    both = _lookups(dataclasses.replace(tables, groups=joined), text, src, np.asarray)
    tree_groups = [values[: group.width] for values, group in zip(both, tables.groups, strict=True)]
    linear_groups = [values[group.width :] for values, group in zip(both, tables.groups, strict=True)]
    copies = [src.name("n") for _ in number]
    for copy, var in zip(copies, number, strict=True):
        src.emit(f"{copy} = {var}")
    linear_numeric = _numeric(head.linear_numeric, copies, src)
    _linear(head.linear, linear_groups, linear_numeric, src, raw="raw_linear")
    _trees(head.trees, tree_groups, _numeric(tables.numeric, number, src), src, raw="raw_trees")
    weight = head.linear_weight
    src.emit(f"raw = {weight!r} * raw_linear + {1.0 - weight!r} * raw_trees")


def _zero_tiny(values: np.ndarray) -> np.ndarray:
    """LightGBM's dense reader takes |value| <= 1e-35 as 0.0; the trees must see the same."""
    values = np.array(values, dtype=np.float64)
    values[np.abs(values) <= lgbm_trees.ZERO_THRESHOLD] = 0.0
    return values


@dataclass
class CompiledScorer:
    """Pure-Python scorer equivalent to the pipeline its tables came from."""

    kind: str
    source: str
    score_one: Callable[[Mapping[str, object]], float] = field(repr=False)
    features_of: Callable[[Mapping[str, object]], list[float]] | None = field(repr=False)
    booster: object | None = field(default=None, repr=False)
    slope: float = 1.0
    intercept: float = 0.0
    batch_threshold: int = 16

    def score_many(self, rows: Sequence[Mapping[str, object]]) -> list[float]:
        """Probabilities for many rows.

        Linear models are already at the floor per row (lookups and a few multiply-adds), so
        a batch is a loop. For trees, a batch derives the feature rows and lets the booster's
        native batch predictor walk them: the same features and the same trees, so the same
        raw scores, without the per-row cost of the generated if/else.
        """
        if self.booster is None or self.features_of is None or len(rows) < self.batch_threshold:
            score = self.score_one
            return [score(row) for row in rows]
        features_of = self.features_of
        X = np.array([features_of(row) for row in rows], dtype=np.float64)
        best = int(getattr(self.booster, "best_iteration", 0) or 0)
        iterations = {"num_iteration": best} if best > 0 else {}
        raw = self.booster.predict(X, raw_score=True, num_threads=1, **iterations)
        return expit(self.slope * np.asarray(raw, dtype=np.float64) + self.intercept).tolist()


def compile_scorer(tables: ScoringTables, cfg: DatasetConfig) -> CompiledScorer:
    """A pure-Python scorer of one raw request dict, or NotTabulable if the model reads a
    column `cfg` does not derive."""
    position = {name: i for i, name in enumerate(cfg.feature_columns)}
    missing = [name for name in tables.columns if name not in position]
    if missing:
        raise NotTabulable(f"the model reads columns the service cannot derive: {missing}")
    src = _Source()
    derived = [f"f{i}" for i in range(len(cfg.feature_columns))]
    src.constants["_derive"] = row_deriver(cfg)
    src.emit(f"{', '.join(derived)}, = _derive(row)")
    text = [derived[position[name]] for name in tables.categorical]
    number = [derived[position[name]] for name in (tables.numeric.columns if tables.numeric else ())]
    head = tables.head
    features_of = None
    if isinstance(head, BlendHead):
        _blend(tables, head, text, number, src)
    elif isinstance(head, TreeHead):
        groups = _lookups(tables, text, src, _zero_tiny)
        features_of = _trees(head, groups, _numeric(tables.numeric, number, src), src)
    else:
        _linear(head, _lookups(tables, text, src, np.asarray),
                _numeric(tables.numeric, number, src), src)
    result = f"_sigmoid({tables.slope!r} * raw + {tables.intercept!r})"
    score_one = src.function("score_one", result)
    source = src.text("score_one", result)
    log.debug("compiled %s scorer: %d lines of source", tables.kind, source.count("\n"))
    return CompiledScorer(
        kind=tables.kind,
        source=source,
        score_one=score_one,
        features_of=features_of,
        booster=head.model.booster_ if isinstance(head, TreeHead) else None,
        slope=tables.slope,
        intercept=tables.intercept,
    )


def compile_pipeline(pipeline: object, cfg: DatasetConfig) -> CompiledScorer:
    """`compile_scorer` of the pipeline's tables (NotTabulable naming any obstacle)."""
    return compile_scorer(tabulate(pipeline), cfg)
