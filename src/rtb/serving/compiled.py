"""Compile a fitted candidate pipeline into a pure-Python scorer for one raw request dict.

Why: `pipeline.predict_proba(feature_frame(derive_features(frame)))` costs milliseconds per
call in pandas and sklearn overhead, while the arithmetic a row needs is a few dozen
dictionary lookups and multiply-adds. At load time the fitted objects are walked once and
turned into generated Python source (no pandas, no numpy per request):

- feature derivation as in `rtb.data.preprocessing.derive_features` (timestamps parsed with
  `datetime.fromisoformat`, hours since each extra timestamp, hour of day, categoricals as
  text with None -> `__missing__`, numbers rounded to float32 as the processed frame holds
  them);
- target-encoding tables (single and crossed columns) as dicts from level codes to rows of
  precomputed values; one-hot weights as dicts from level to coefficient;
- imputation, log1p and scaling as constants, with float32 rounding wherever sklearn computes
  in float32 (the emulation of each step is checked against the step itself at compile time);
- logistic regression folded into the tables, or LightGBM trees as nested if/else
  (`rtb.serving.lgbm_trees`), then the Platt step of `LogitRecalibrated`.

Anything the compiler does not know raises `NotCompilable` naming the step, and the caller
falls back to the pipeline. Values that go through table lookups are produced by calling the
fitted step itself on every table row, so only the per-row numeric steps are re-implemented.
"""

from __future__ import annotations

import logging
import math
import struct
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
from scipy.interpolate import BSpline, PPoly
from scipy.special import expit
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, SplineTransformer, StandardScaler

from rtb.dataset_config import DatasetConfig
from rtb.models.encoders import MISSING, SmoothedTargetEncoder, SparseOneHotEncoder
from rtb.models.pipeline import LogitRecalibrated, _log1p_nonnegative
from rtb.serving import lgbm_trees
from rtb.serving.errors import NotCompilable

log = logging.getLogger(__name__)

SECONDS_PER_HOUR = 3600.0
_F32 = struct.Struct("<f")
_PACK, _UNPACK = _F32.pack, _F32.unpack
_MICROSECOND = timedelta(microseconds=1)
_NAN = float("nan")
_INF = float("inf")


# --------------------------------------------------------------------------- row helpers
def f32(value: float) -> float:
    """Round a double to the nearest float32 (what `astype(np.float32)` does)."""
    return _UNPACK(_PACK(value))[0]


def f32_safe(value: float) -> float:
    """`f32` that overflows to +-inf like numpy instead of raising."""
    try:
        return _UNPACK(_PACK(value))[0]
    except OverflowError:
        return math.copysign(_INF, value)


def as_utc(value: object) -> datetime | None:
    """A request timestamp as an aware datetime; naive values are UTC, as pandas' utc=True."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    elif not isinstance(value, datetime):
        if isinstance(value, float) and value != value:
            return None
        raise TypeError(f"expected an ISO timestamp string or datetime, got {value!r}")
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def as_text(value: object) -> str:
    """A categorical value as pandas' `astype("string").fillna(MISSING)` renders it."""
    if value is None or (isinstance(value, float) and value != value):
        return MISSING
    if type(value).__name__ == "NAType":
        return MISSING
    return str(value)


def as_number(value: object) -> float:
    """`pd.to_numeric(errors="coerce")` for one value: unparseable text becomes NaN."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return _NAN


def log1p_nonnegative(value: float) -> float:
    """`rtb.models.pipeline._log1p_nonnegative` for one value (NaN stays NaN)."""
    if value > 0.0:
        return math.log1p(value)
    return value if value != value else 0.0


def sigmoid(z: float) -> float:
    """`scipy.special.expit` without overflow for large |z|."""
    if z >= 0.0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


HELPERS: dict[str, object] = {
    "_as_utc": as_utc,
    "_as_text": as_text,
    "_as_number": as_number,
    "_log1p_nn": log1p_nonnegative,
    "_sigmoid": sigmoid,
    "_NAN": _NAN,
    "_US": _MICROSECOND,
    "_str": str,
    "_float": float,
    "_int": int,
    "_MISSING": MISSING,
}


# --------------------------------------------------------------------------- intermediate form
@dataclass
class CodeMap:
    """Level -> code of one encoder column; unseen levels get code `len(levels)`."""

    column: str
    codes: dict[str, int]
    name: str = ""

    @property
    def unseen(self) -> int:
        return len(self.codes)


@dataclass
class Table:
    """Rows of precomputed values addressed by the codes of one or more categorical columns.

    The last row is the default for keys the encoder did not see. A single-column table's row
    is the code itself; a crossed table maps the mixed-radix key of its codes to a row.
    """

    maps: list[CodeMap]
    radixes: list[int]
    rows: dict[int, int] | None
    n_rows: int
    name: str = ""


@dataclass
class Categorical:
    """A processed categorical column entering a block."""

    column: str


@dataclass
class Dense:
    """One numeric column computed per row into a local variable."""

    var: str


@dataclass
class Tabled:
    """One numeric column read from a table row."""

    table: Table
    values: np.ndarray


@dataclass
class OneHot:
    """`len(levels)` indicator columns of one categorical: at most one of them is 1.0."""

    column: str
    levels: list[str]
    values: np.ndarray = field(default_factory=lambda: np.ones(0, np.float32))

    @property
    def width(self) -> int:
        return len(self.levels)


@dataclass
class Piecewise:
    """One spline output of a numeric local: a polynomial per knot interval inside
    [lo, hi], a line outside it, 0.0 for NaN (SplineTransformer's extrapolation rules).

    Evaluated as piecewise polynomials rather than B-spline recursions: the same function up
    to rounding (~1e-16), at a fraction of the per-row cost, and a linear model's weighted
    sum of one input's splines folds into a single piecewise polynomial.
    """

    var: str
    breaks: tuple[float, ...]
    coeffs: np.ndarray  # (degree + 1, intervals), highest power first, in (x - break)
    lo: float
    hi: float
    below: tuple[float, float]  # value at lo and slope, for x < lo
    above: tuple[float, float]  # value at hi and slope, for x > hi

    def key(self) -> tuple:
        return (self.var, self.breaks, self.lo, self.hi)

    def scaled(self, weight: float) -> Piecewise:
        return Piecewise(
            self.var, self.breaks, self.coeffs * weight, self.lo, self.hi,
            (self.below[0] * weight, self.below[1] * weight),
            (self.above[0] * weight, self.above[1] * weight),
        )

    def plus(self, other: Piecewise) -> Piecewise:
        return Piecewise(
            self.var, self.breaks, self.coeffs + other.coeffs, self.lo, self.hi,
            (self.below[0] + other.below[0], self.below[1] + other.below[1]),
            (self.above[0] + other.above[0], self.above[1] + other.above[1]),
        )

    def statements(self, out: str) -> list[str]:
        v, lines = self.var, []
        lines.append(f"if {v} != {v}: {out} = 0.0")
        lines.append(f"elif {v} < {self.lo!r}: "
                     f"{out} = {self.below[0]!r} + ({v} - {self.lo!r}) * {self.below[1]!r}")
        lines.append(f"elif {v} > {self.hi!r}: "
                     f"{out} = {self.above[0]!r} + ({v} - {self.hi!r}) * {self.above[1]!r}")
        last = len(self.breaks) - 1
        for interval, start in enumerate(self.breaks):
            horner = repr(float(self.coeffs[0, interval]))
            for power in range(1, self.coeffs.shape[0]):
                horner = f"({horner} * d + {float(self.coeffs[power, interval])!r})"
            if interval < last:
                lines.append(f"elif {v} < {self.breaks[interval + 1]!r}:")
            else:
                lines.append("else:")
            lines.append(f"    d = {v} - {start!r}; {out} = {horner}")
        return lines

    def evaluate(self, x: float) -> float:
        namespace: dict[str, float] = {self.var: x}
        exec("\n".join(self.statements("out")), {}, namespace)
        return namespace["out"]


Feature = Categorical | Dense | Tabled | OneHot | Piecewise


def _width(feature: Feature) -> int:
    return feature.width if isinstance(feature, OneHot) else 1


class _Source:
    """Generated statements, their constants and fresh local names."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.constants: dict[str, object] = {}
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


# --------------------------------------------------------------------------- derivation
def _derive(cfg: DatasetConfig, src: _Source) -> dict[str, str]:
    """Statements computing every processed feature column; returns column -> local name."""
    local: dict[str, str] = {}
    src.emit("get = row.get")
    src.emit(f"ts = _as_utc(get({cfg.timestamp!r}))")
    for name in cfg.categorical:
        var = src.name("c")
        src.emit(f"{var} = get({name!r})")
        src.emit(f"{var} = {var} if {var}.__class__ is _str else _as_text({var})")
        local[name] = var
    for name in cfg.numerical:
        var = src.name("n")
        src.emit(f"{var} = get({name!r})")
        src.emit(f"if {var} is None: {var} = _NAN")
        src.emit(f"elif {var}.__class__ is _float or {var}.__class__ is _int: {var} = _f32({var})")
        src.emit(f"else: {var} = _f32(_as_number({var}))")
        local[name] = var
    for source, feature in cfg.datetimes.items():
        var, flag, earlier = src.name("n"), src.name("n"), src.name("t")
        src.emit(f"{earlier} = get({source!r})")
        src.emit(f"if ts is None or {earlier} is None or {earlier} != {earlier}:")
        src.emit(f"    {var} = _NAN; {flag} = 1.0")
        src.emit("else:")
        # pandas: timedelta -> total_seconds (count / 1e6) -> / 3600 -> float32
        src.emit(f"    {var} = _f32((ts - _as_utc({earlier})) // _US / 1e6 / {SECONDS_PER_HOUR!r})")
        src.emit(f"    {flag} = 0.0")
        local[feature] = var
        local[f"{feature}_missing"] = flag
    hour = src.name("n")
    src.emit("if ts is None: " + f"{hour} = _NAN")
    src.emit("else:")
    src.emit("    off = ts.utcoffset()")
    src.emit(f"    {hour} = _float(ts.hour if not off else (ts - off).hour)")
    local["hour"] = hour
    return local


# --------------------------------------------------------------------------- block steps
def _call_step(step: object, matrix: np.ndarray) -> np.ndarray:
    """Run a fitted step on a matrix, as a frame when it was fitted on one."""
    names = getattr(step, "feature_names_in_", None)
    data: object = matrix
    if names is not None and len(names) == matrix.shape[1]:
        data = pd.DataFrame(matrix, columns=list(names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = step.transform(data)
    if hasattr(out, "toarray"):
        out = out.toarray()
    return np.asarray(out)


_PROBE_VALUES = (0.0, 1.0, -1.0, 0.5, 3.0, -2.75, 7.3, 12.0, 123.456, 1e4, 3.3e7, 1e-3, _NAN)


@dataclass
class _Elementwise:
    """One numeric step as a per-value Python expression, plus its constants per column."""

    template: str  # format fields: x plus the per-column constants
    constants: list[dict[str, float]]

    def expression(self, column: int, var: str) -> str:
        names = {key: repr(value) for key, value in self.constants[column].items()}
        return self.template.format(x=var, **names)

    def evaluate(self, column: int, value: float) -> float:
        names = {key: repr(value) for key, value in self.constants[column].items()}
        names = {key: f"({text})" for key, text in names.items()}
        code = self.template.format(x="x", **names)
        return eval(code, {**HELPERS, "_f32": f32_safe, "nan": _NAN, "inf": _INF}, {"x": value})


def _elementwise(step: object, dtype: np.dtype, width: int) -> tuple[_Elementwise, np.dtype]:
    """The exact per-value equivalent of a column-wise sklearn step, or NotCompilable."""
    probe = np.ones((1, width), dtype=dtype)
    out_dtype = _call_step(step, probe).dtype
    if dtype not in (np.float32, np.float64) or out_dtype not in (np.float32, np.float64):
        raise NotCompilable(f"{type(step).__name__}: unsupported dtype {dtype} -> {out_dtype}")
    in32 = dtype == np.float32
    if isinstance(step, SimpleImputer):
        if step.add_indicator or not (
            isinstance(step.missing_values, float) and math.isnan(step.missing_values)
        ):
            raise NotCompilable("SimpleImputer: only missing_values=nan without indicator")
        fills = _call_step(step, np.full((1, width), np.nan, dtype=dtype))
        if fills.shape[1] != width or np.isnan(fills).any():
            raise NotCompilable("SimpleImputer drops all-missing columns (keep_empty_features)")
        template = "({x} if {x} == {x} else {fill})"
        return _Elementwise(template, [{"fill": float(v)} for v in fills[0]]), out_dtype
    if isinstance(step, StandardScaler):
        # sklearn: X -= mean_.astype(X.dtype); X /= scale_.astype(X.dtype), in X's dtype.
        mean = step.mean_ if step.with_mean else None
        scale = step.scale_ if step.with_std else None
        rounding = "_f32" if in32 else ""
        expr = "{x}"
        if mean is not None:
            expr = f"{rounding}({expr} - {{m}})"
        if scale is not None:
            expr = f"{rounding}({expr} / {{s}})"
        constants = []
        for column in range(width):
            values = {}
            if mean is not None:
                values["m"] = float(dtype.type(mean[column]))
            if scale is not None:
                values["s"] = float(dtype.type(scale[column]))
            constants.append(values)
        return _Elementwise(expr, constants), out_dtype
    if isinstance(step, FunctionTransformer):
        if step.kw_args:
            raise NotCompilable("FunctionTransformer with kw_args is not supported")
        if step.func is None:
            return _Elementwise("{x}", [{} for _ in range(width)]), out_dtype
        if step.func is _log1p_nonnegative:
            return _Elementwise("_log1p_nn({x})", [{} for _ in range(width)]), out_dtype
        name = getattr(step.func, "__qualname__", repr(step.func))
        raise NotCompilable(f"FunctionTransformer func {name} has no compiled equivalent")
    raise NotCompilable(f"{type(step).__name__} has no compiled equivalent")


def _check_elementwise(step: object, op: _Elementwise, dtype: np.dtype, width: int) -> None:
    """Bitwise check of the per-value emulation against the step on probe values."""
    probe = np.array([[v] * width for v in _PROBE_VALUES], dtype=dtype)
    expected = _call_step(step, probe)
    for row, value in enumerate(probe):
        for column in range(width):
            got = op.evaluate(column, float(value[column]))
            want = float(expected[row, column])
            if not (got == want or (math.isnan(got) and math.isnan(want))):
                raise NotCompilable(
                    f"{type(step).__name__}: compiled value {got!r} != {want!r} for input "
                    f"{float(value[column])!r} (column {column})"
                )


def _apply_elementwise(
    step: object, features: list[Feature], dtype: np.dtype, src: _Source
) -> tuple[list[Feature], np.dtype]:
    if any(isinstance(f, Categorical | OneHot) for f in features):
        raise NotCompilable(f"{type(step).__name__} after a categorical/one-hot output")
    features = [_materialize(f, src) if isinstance(f, Piecewise) else f for f in features]
    width = len(features)
    op, out_dtype = _elementwise(step, dtype, width)
    _check_elementwise(step, op, dtype, width)
    tabled = _tabled_outputs(step, features, dtype, lambda p: range(p, p + 1))
    out: list[Feature] = []
    for position, feature in enumerate(features):
        if isinstance(feature, Tabled):
            out.append(Tabled(feature.table, tabled[position][0]))
            continue
        var = src.name("v")
        src.emit(f"{var} = {op.expression(position, feature.var)}")  # type: ignore[union-attr]
        out.append(Dense(var))
    return out, out_dtype


def _spline(
    step: SplineTransformer, features: list[Feature], dtype: np.dtype, src: _Source
) -> tuple[list[Feature], np.dtype]:
    """B-spline bases of each input: Piecewise for per-row inputs, the step itself for tables."""
    if dtype != np.float64:
        raise NotCompilable(f"SplineTransformer on {dtype} input (only float64 is exact)")
    if step.extrapolation not in ("linear", "constant") or not step.include_bias:
        raise NotCompilable(
            f"SplineTransformer extrapolation={step.extrapolation!r}, "
            f"include_bias={step.include_bias} is not supported"
        )
    if getattr(step, "sparse_output", False):
        raise NotCompilable("SplineTransformer with sparse_output is not supported")
    width = len(features)
    if len(step.bsplines_) != width:
        raise NotCompilable("SplineTransformer was fitted on another number of columns")
    n_splines = step.bsplines_[0].c.shape[1]
    if any(isinstance(f, Categorical | OneHot) for f in features):
        raise NotCompilable("SplineTransformer after a categorical/one-hot output")
    features = [_materialize(f, src) if isinstance(f, Piecewise) else f for f in features]
    out: list[Feature] = []
    by_table = _tabled_outputs(
        step, features, dtype, lambda p: range(p * n_splines, (p + 1) * n_splines)
    )
    for position, feature in enumerate(features):
        if isinstance(feature, Tabled):
            out += [Tabled(feature.table, v) for v in by_table[position]]
            continue
        out += _spline_pieces(step, step.bsplines_[position], feature.var)  # type: ignore[union-attr]
    _check_pieces(step, features, out, n_splines)
    return out, np.dtype(np.float64)


def _spline_pieces(step: SplineTransformer, spl: BSpline, var: str) -> list[Piecewise]:
    k = int(spl.k)
    t = np.asarray(spl.t, dtype=np.float64)
    n_splines = spl.c.shape[1]
    lo, hi = float(t[k]), float(t[-k - 1])
    f_lo, f_hi = spl(lo), spl(hi)
    if step.extrapolation == "linear":
        d_lo, d_hi = spl(lo, nu=1), spl(hi, nu=1)
        reach = k + 1 if k <= 1 else k
    else:
        d_lo, d_hi = np.zeros(n_splines), np.zeros(n_splines)
        reach = k
    pieces = []
    for j in range(n_splines):
        poly = PPoly.from_spline(BSpline(t, spl.c[:, j], k))
        keep = [m for m in range(k, len(t) - k - 1) if poly.x[m + 1] > poly.x[m]]
        below = (float(f_lo[j]), float(d_lo[j])) if j < reach else (0.0, 0.0)
        above = (float(f_hi[j]), float(d_hi[j])) if j >= n_splines - reach else (0.0, 0.0)
        pieces.append(Piecewise(
            var, tuple(float(poly.x[m]) for m in keep), np.asarray(poly.c[:, keep], float),
            lo, hi, below, above,
        ))
    return pieces


def _check_pieces(step: SplineTransformer, features: list[Feature], out: list[Feature],
                  n_splines: int) -> None:
    """Piecewise values against the step on probe values, to 1e-12 (rounding differs)."""
    dense = [p for p, f in enumerate(features) if not isinstance(f, Tabled)]
    if not dense:
        return
    spans = [(float(s.t[s.k]), float(s.t[-s.k - 1])) for s in step.bsplines_]
    for fraction in (-0.7, -1e-9, 0.0, 0.13, 0.5, 0.77, 1.0, 1.0 + 1e-9, 1.9):
        probe = np.array([[lo + fraction * (hi - lo) for lo, hi in spans]], dtype=np.float64)
        expected = _call_step(step, probe)[0]
        for position in dense:
            x = float(probe[0, position])
            for j in range(n_splines):
                got = out[position * n_splines + j].evaluate(x)  # type: ignore[union-attr]
                want = float(expected[position * n_splines + j])
                if abs(got - want) > 1e-12 * max(1.0, abs(want)):
                    raise NotCompilable(
                        f"SplineTransformer: compiled value {got!r} != {want!r} at x={x!r}"
                    )


def _materialize(feature: Piecewise, src: _Source) -> Dense:
    var = src.name("s")
    for line in feature.statements(var):
        src.emit(line)
    return Dense(var)


def _tabled_outputs(step: object, features: list[Feature], dtype: np.dtype,
                    outputs_of: Callable[[int], range]) -> dict[int, list[np.ndarray]]:
    """Run the fitted step on every table row; per input position, its output columns."""
    by_table: dict[int, list[int]] = {}
    for position, feature in enumerate(features):
        if isinstance(feature, Tabled):
            by_table.setdefault(id(feature.table), []).append(position)
    out: dict[int, list[np.ndarray]] = {}
    for positions in by_table.values():
        table = features[positions[0]].table  # type: ignore[union-attr]
        matrix = np.zeros((table.n_rows, len(features)), dtype=dtype)
        for position in positions:
            matrix[:, position] = features[position].values  # type: ignore[union-attr]
        transformed = _call_step(step, matrix)
        for position in positions:
            out[position] = [transformed[:, c].copy() for c in outputs_of(position)]
    return out


def _code_map(column: str, vocabulary: pd.Index) -> CodeMap:
    return CodeMap(column, {str(level): code for code, level in enumerate(vocabulary)})


def _one_hot(
    step: SparseOneHotEncoder, features: list[Feature]
) -> tuple[list[Feature], np.dtype]:
    columns = _categorical_names(step, features)
    out: list[Feature] = []
    for column, vocabulary in zip(columns, step.vocabularies_, strict=True):
        levels = [str(level) for level in vocabulary]
        out.append(OneHot(column, levels, np.ones(len(levels), dtype=np.float32)))
    return out, np.dtype(np.float32)


def _categorical_names(step: object, features: list[Feature]) -> list[str]:
    if not all(isinstance(f, Categorical) for f in features):
        raise NotCompilable(f"{type(step).__name__} must read raw categorical columns")
    columns = [f.column for f in features]  # type: ignore[union-attr]
    if list(step.feature_names_in_) != columns:
        raise NotCompilable(f"{type(step).__name__} was fitted on other columns")
    return columns


def _target_encoder(
    step: SmoothedTargetEncoder, features: list[Feature]
) -> tuple[list[Feature], np.dtype]:
    """Every group's rows of (encoding, log count), computed by the encoder itself.

    All groups' rows go through one `transform` call: a row built for one group holds that
    group's levels and an unseen filler elsewhere, so only its own group's outputs are read.
    """
    columns = _categorical_names(step, features)
    maps = {
        column: _code_map(column, vocabulary)
        for column, vocabulary in zip(columns, step.vocabularies_, strict=True)
    }
    for code_map in maps.values():
        if step.radix_[code_map.column] != code_map.unseen + 1:
            raise NotCompilable("SmoothedTargetEncoder radix does not match its vocabulary")
    groups = step._groups()
    if len(groups) != len(step.tables_):
        raise NotCompilable("SmoothedTargetEncoder tables do not match its groups")
    unseen = "\x00unseen\x00"
    texts = {c: np.array([*maps[c].codes, unseen], dtype=object) for c in columns}
    codes_per_column: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    tables: list[Table] = []
    for group, (keys, _, _) in zip(groups, step.tables_, strict=True):
        radixes = [int(step.radix_[c]) for c in group]
        if len(group) == 1:
            decoded = [np.arange(radixes[0], dtype=np.int64)]  # every code, then unseen
            rows = None
        else:
            rest = np.asarray(keys, dtype=np.int64).copy()
            decoded = []
            for radix in reversed(radixes):
                decoded.append(rest % radix)
                rest //= radix
            decoded.reverse()
            if any((d == radix - 1).any() for d, radix in zip(decoded, radixes, strict=True)):
                raise NotCompilable("SmoothedTargetEncoder table holds an unseen-level key")
            decoded = [np.append(d, radix - 1) for d, radix in zip(decoded, radixes, strict=True)]
            rows = {int(key): row for row, key in enumerate(np.asarray(keys).tolist())}
        n_rows = len(decoded[0])
        for column in columns:
            if column in group:
                codes_per_column[column].append(decoded[group.index(column)])
            else:
                codes_per_column[column].append(np.full(n_rows, len(texts[column]) - 1))
        tables.append(Table([maps[c] for c in group], radixes, rows, n_rows))
    if not groups:
        return [], np.dtype(np.float32)
    # Categorical columns take the encoder's O(levels) path, as processed frames do.
    frame = pd.DataFrame(
        {
            c: pd.Categorical.from_codes(np.concatenate(codes_per_column[c]), categories=texts[c])
            for c in columns
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoded = np.asarray(step.transform(frame))
    out: list[Feature] = []
    start = 0
    for position, table in enumerate(tables):
        block = encoded[start : start + table.n_rows]
        out.append(Tabled(table, block[:, 2 * position].copy()))
        out.append(Tabled(table, block[:, 2 * position + 1].copy()))
        start += table.n_rows
    return out, encoded.dtype


def _compile_block(
    step: object, features: list[Feature], dtype: np.dtype | None, src: _Source
) -> tuple[list[Feature], np.dtype | None]:
    if isinstance(step, Pipeline):
        for _, sub in step.steps:
            if sub is None or sub == "passthrough":
                continue
            features, dtype = _compile_block(sub, features, dtype, src)
        return features, dtype
    if isinstance(step, str) and step == "passthrough":
        step = FunctionTransformer()
    if isinstance(step, SparseOneHotEncoder):
        return _one_hot(step, features)
    if isinstance(step, SmoothedTargetEncoder):
        return _target_encoder(step, features)
    if isinstance(step, SplineTransformer):
        if dtype is None:
            raise NotCompilable("SplineTransformer on categorical input")
        return _spline(step, features, dtype, src)
    if isinstance(step, SimpleImputer | StandardScaler | FunctionTransformer):
        if dtype is None:
            raise NotCompilable(f"{type(step).__name__} on categorical input")
        return _apply_elementwise(step, features, dtype, src)
    raise NotCompilable(f"{type(step).__name__} has no compiled equivalent")


@dataclass
class _Assembled:
    features: list[Feature]
    dtype: np.dtype
    sparse: bool


def _column_transformer(ct: ColumnTransformer, local: dict[str, str], src: _Source,
                        cfg: DatasetConfig) -> _Assembled:
    names = [str(n) for n in getattr(ct, "feature_names_in_", [])]
    missing = [n for n in names if n not in local]
    if not names or missing:
        raise NotCompilable(f"ColumnTransformer reads columns the service cannot derive: {missing}")
    categorical = set(cfg.categorical)
    features: list[Feature] = []
    dtypes: list[np.dtype] = []
    for name, transformer, _ in ct.transformers_:
        if isinstance(transformer, str) and transformer == "drop":
            continue
        indices = ct._transformer_to_input_indices.get(name, [])
        if len(indices) == 0:
            continue
        columns = [names[i] for i in indices]
        inputs: list[Feature] = [
            Categorical(c) if c in categorical else Dense(local[c]) for c in columns
        ]
        kinds = {isinstance(f, Categorical) for f in inputs}
        if len(kinds) > 1:
            raise NotCompilable(f"ColumnTransformer block {name!r} mixes categorical and numeric")
        dtype = None if kinds == {True} else np.dtype(np.float32)
        block, out_dtype = _compile_block(transformer, inputs, dtype, src)
        if out_dtype is None or any(isinstance(f, Categorical) for f in block):
            raise NotCompilable(f"ColumnTransformer block {name!r} passes raw categoricals on")
        features += block
        dtypes.append(out_dtype)
    if not features:
        raise NotCompilable("ColumnTransformer produces no columns")
    return _Assembled(features, np.result_type(*dtypes), bool(getattr(ct, "sparse_output_", False)))


# --------------------------------------------------------------------------- lookups
class _Lookups:
    """Table reads, emitted as one dict lookup per code map and one per crossed table.

    Memory locality decides the speed here: a lookup that returns a tuple of every value the
    model reads for that key costs one cache miss instead of one per value. Single-column
    tables ride on their column's code lookup (level -> (code, values...)); crossed tables map
    the mixed-radix key of the codes to their values.
    """

    def __init__(self, src: _Source, local: dict[str, str]) -> None:
        self.src = src
        self.local = local
        self.requests: list[tuple[Table, np.ndarray, str]] = []

    def request(self, table: Table, values: np.ndarray) -> str:
        """A local that will hold `values[row of this table]`; emitted by `emit`."""
        var = self.src.name("x")
        self.requests.append((table, np.asarray(values, dtype=np.float64), var))
        return var

    def emit(self) -> None:
        tables: dict[int, tuple[Table, list[tuple[np.ndarray, str]]]] = {}
        for table, values, var in self.requests:
            tables.setdefault(id(table), (table, []))[1].append((values, var))
        crossed = [(t, p) for t, p in tables.values() if t.rows is not None]
        maps: dict[int, CodeMap] = {}
        payload: dict[int, list[tuple[np.ndarray, str]]] = {}
        for table, requested in tables.values():
            for code_map in table.maps:
                maps.setdefault(id(code_map), code_map)
            if table.rows is None:
                payload.setdefault(id(table.maps[0]), []).extend(requested)
        needs_code = {id(m) for table, _ in crossed for m in table.maps}
        code_vars: dict[int, str] = {}
        for key, code_map in maps.items():
            items = payload.get(key, [])
            targets = [var for _, var in items]
            columns = [values.tolist() for values, _ in items]
            if key in needs_code:
                code_vars[key] = self.src.name("k")
                targets.insert(0, code_vars[key])
                columns.insert(0, list(range(code_map.unseen + 1)))
            if not targets:
                continue
            rows = _rows_of(columns)
            mapping = self.src.const("map", {level: rows[code] for level, code in
                                             code_map.codes.items()})
            default = self.src.const("default", rows[code_map.unseen])
            text = self.local[code_map.column]
            self.src.emit(f"{', '.join(targets)} = {mapping}.get({text}, {default})")
        for table, requested in crossed:
            key = code_vars[id(table.maps[0])]
            for code_map, radix in zip(table.maps[1:], table.radixes[1:], strict=True):
                key = f"({key} * {radix} + {code_vars[id(code_map)]})"
            rows = _rows_of([values.tolist() for values, _ in requested])
            assert table.rows is not None
            mapping = self.src.const("cross", {k: rows[r] for k, r in table.rows.items()})
            default = self.src.const("default", rows[table.n_rows - 1])
            targets = ", ".join(var for _, var in requested)
            self.src.emit(f"{targets} = {mapping}.get({key}, {default})")


def _rows_of(columns: list[list]) -> list:
    """Row tuples of equally long columns; a single column stays bare (no 1-tuples)."""
    if len(columns) == 1:
        return columns[0]
    return list(zip(*columns, strict=True))


# --------------------------------------------------------------------------- final models
def _linear(model: LogisticRegression, assembled: _Assembled, lookups: _Lookups) -> list[str]:
    """Statements computing the logistic regression's decision function into `raw`."""
    coef = np.asarray(model.coef_)
    intercept = np.asarray(model.intercept_)
    if coef.ndim != 2 or coef.shape[0] != 1 or len(model.classes_) != 2:
        raise NotCompilable("LogisticRegression is not binary")
    width = sum(_width(f) for f in assembled.features)
    if coef.shape[1] != width:
        raise NotCompilable(f"LogisticRegression has {coef.shape[1]} inputs, pipeline {width}")
    dot_dtype = np.result_type(assembled.dtype, coef.dtype)
    if dot_dtype == np.float64:
        return _linear_float64(coef[0], float(intercept[0]), assembled, lookups)
    if dot_dtype == np.float32 and assembled.sparse:
        return _linear_float32_sparse(coef[0], float(intercept[0]), assembled, lookups)
    raise NotCompilable(
        f"LogisticRegression on dense {dot_dtype} input: BLAS summation order is not exact"
    )


def _linear_float64(
    weights: np.ndarray, intercept: float, assembled: _Assembled, lookups: _Lookups
) -> list[str]:
    """Order-free sum in float64: contributions of a table's columns are folded into one value."""
    src = lookups.src
    terms: list[str] = []
    lines: list[str] = []
    folded: dict[int, tuple[Table, np.ndarray]] = {}
    splines: dict[tuple, Piecewise] = {}
    offset = 0
    for feature in assembled.features:
        if isinstance(feature, Piecewise):
            scaled = feature.scaled(float(weights[offset]))
            key = feature.key()
            splines[key] = splines[key].plus(scaled) if key in splines else scaled
        elif isinstance(feature, OneHot):
            w = weights[offset : offset + feature.width].astype(np.float64)
            products = feature.values.astype(np.float64) * w
            table = src.const("onehot", dict(zip(feature.levels, products.tolist(), strict=True)))
            terms.append(f"{table}.get({lookups.local[feature.column]}, 0.0)")
        elif isinstance(feature, Tabled):
            table, total = folded.get(id(feature.table), (feature.table, 0.0))
            contribution = feature.values.astype(np.float64) * float(weights[offset])
            folded[id(feature.table)] = (table, total + contribution)
        else:
            terms.append(f"{float(weights[offset])!r} * {feature.var}")
        offset += _width(feature)
    for table, total in folded.values():
        terms.append(lookups.request(table, total))
    for spline in splines.values():
        var = src.name("s")
        lines += spline.statements(var)
        terms.append(var)
    return lines + [f"raw = {intercept!r}"] + [f"raw += {term}" for term in terms]


def _linear_float32_sparse(
    weights: np.ndarray, intercept: float, assembled: _Assembled, lookups: _Lookups
) -> list[str]:
    """scipy's CSR mat-vec in float32: products and running sum rounded per stored entry,
    in column order; entries that are zero add nothing."""
    src = lookups.src
    lines = ["raw = 0.0"]
    offset = 0
    for feature in assembled.features:
        if isinstance(feature, Piecewise):
            raise NotCompilable("float32 logistic regression on spline outputs is not exact")
        if isinstance(feature, OneHot):
            w = weights[offset : offset + feature.width]
            products = (feature.values * w).astype(np.float32)
            table = src.const("onehot", dict(zip(feature.levels, products.tolist(), strict=True)))
            lines.append(f"raw = _f32(raw + {table}.get({lookups.local[feature.column]}, 0.0))")
        elif isinstance(feature, Tabled):
            products = (feature.values.astype(np.float32) * weights[offset]).astype(np.float32)
            lines.append(f"raw = _f32(raw + {lookups.request(feature.table, products)})")
        else:
            w = repr(float(weights[offset]))
            lines.append(f"raw = _f32(raw + _f32({feature.var} * {w}))")
        offset += _width(feature)
    lines.append(f"raw = _f32(raw + {intercept!r})")
    return lines


def _gbm_feature_vars(assembled: _Assembled, lookups: _Lookups) -> tuple[list[str], list[str]]:
    """One local per model input column, tiny values zeroed as LightGBM's dense reader does."""
    src = lookups.src
    names: list[str] = []
    lines: list[str] = []
    zero = lgbm_trees.ZERO_THRESHOLD
    for feature in assembled.features:
        if isinstance(feature, OneHot):
            raise NotCompilable("LightGBM on one-hot columns is not supported by the compiler")
        if isinstance(feature, Tabled):
            values = feature.values.astype(np.float64)
            values[np.abs(values) <= zero] = 0.0
            names.append(lookups.request(feature.table, values))
        elif isinstance(feature, Piecewise):
            var = src.name("x")
            lines += feature.statements(var)
            lines.append(f"if -{zero!r} <= {var} <= {zero!r}: {var} = 0.0")
            names.append(var)
        else:
            var = src.name("x")
            lines.append(f"{var} = {feature.var}")
            lines.append(f"if -{zero!r} <= {var} <= {zero!r}: {var} = 0.0")
            names.append(var)
    return names, lines


# --------------------------------------------------------------------------- the scorer
@dataclass
class CompiledScorer:
    """Pure-Python scorer equivalent to the pipeline it was compiled from."""

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
        a batch is a loop. For trees, a batch derives the compiled feature rows and lets the
        booster's native batch predictor walk them: the same features and the same trees, so
        the same raw scores, at less than half the per-row cost of the generated code.
        """
        if self.booster is None or self.features_of is None or len(rows) < self.batch_threshold:
            score = self.score_one
            return [score(row) for row in rows]
        features_of = self.features_of
        X = np.array([features_of(row) for row in rows], dtype=np.float64)
        raw = self.booster.predict(X, raw_score=True, num_threads=1, **self._iterations())
        return expit(self.slope * np.asarray(raw, dtype=np.float64) + self.intercept).tolist()

    def _iterations(self) -> dict[str, int]:
        best = int(getattr(self.booster, "best_iteration", 0) or 0)
        return {"num_iteration": best} if best > 0 else {}


def _build_function(
    source: str, constants: dict[str, object], name: str, safe: bool
) -> Callable:
    namespace: dict[str, object] = {**HELPERS, **constants, "_f32": f32_safe if safe else f32}
    exec(compile(source, f"<rtb-compiled-{name}{'-safe' if safe else ''}>", "exec"), namespace)
    return namespace[name]  # type: ignore[return-value]


def _wrap(lines: list[str], name: str, result: str) -> str:
    body = "\n".join(lines)
    return f"def {name}(row):\n{body}\n    return {result}\n"


def compile_pipeline(pipeline: object, cfg: DatasetConfig) -> CompiledScorer:
    """A pure-Python scorer for one raw request dict, or NotCompilable naming the obstacle."""
    if not isinstance(pipeline, Pipeline) or len(pipeline.steps) != 2:
        raise NotCompilable("expected Pipeline([features ColumnTransformer, LogitRecalibrated])")
    features_step, model_step = pipeline.steps[0][1], pipeline.steps[1][1]
    if not isinstance(features_step, ColumnTransformer):
        raise NotCompilable(f"first step is {type(features_step).__name__}, not ColumnTransformer")
    if not isinstance(model_step, LogitRecalibrated) or not hasattr(model_step, "estimator_"):
        raise NotCompilable(f"last step is {type(model_step).__name__}, not LogitRecalibrated")
    src = _Source()
    local = _derive(cfg, src)
    assembled = _column_transformer(features_step, local, src, cfg)
    lookups = _Lookups(src, local)
    estimator = model_step.estimator_
    slope, intercept = float(model_step.slope), float(model_step.intercept)
    ensemble = None
    feature_lines = None
    if isinstance(estimator, LogisticRegression):
        kind = "logistic_regression"
        lines = _linear(estimator, assembled, lookups)
        lookups.emit()
    elif type(estimator).__name__ == "LGBMClassifier":
        kind = "lightgbm"
        if not hasattr(estimator, "decision_function"):
            raise NotCompilable("LGBMClassifier without decision_function (lightgbm < 4.7)")
        if len(estimator.classes_) != 2:
            raise NotCompilable("LGBMClassifier is not binary")
        ensemble = lgbm_trees.parse_booster(estimator.booster_)
        names, lines = _gbm_feature_vars(assembled, lookups)
        lookups.emit()
        for line in lines:
            src.emit(line)
        feature_lines = list(src.lines) + [f"    features = [{', '.join(names)}]"]
        lines = lgbm_trees.ensemble_statements(ensemble, names, "raw", src.constants, "")
    else:
        raise NotCompilable(f"final estimator {type(estimator).__name__} is not supported")
    for line in lines:
        src.emit(line)
    src.emit(f"z = {slope!r} * raw + {intercept!r}")
    source = _wrap(src.lines, "score_one", "_sigmoid(z)")
    fast = _build_function(source, src.constants, "score_one", safe=False)
    safe = _build_function(source, src.constants, "score_one", safe=True)

    def score_one(row: Mapping[str, object]) -> float:
        try:
            return fast(row)
        except OverflowError:
            return safe(row)

    features_of = None
    if feature_lines is not None:
        features_of = _build_function(
            _wrap(feature_lines, "features_of", "features"), src.constants, "features_of",
            safe=True,
        )
    log.debug("compiled %s scorer: %d lines of source", kind, source.count("\n"))
    return CompiledScorer(
        kind=kind,
        source=source,
        score_one=score_one,
        features_of=features_of,
        booster=estimator.booster_ if ensemble is not None else None,
        slope=slope,
        intercept=intercept,
    )
