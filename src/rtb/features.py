"""The features every model reads, derived from a raw request: one definition, two shapes.

Nothing here is fitted. Every feature is a pure function of one row: categoricals as text
with gaps as the level `__missing__`, counts as float32, hours since each extra timestamp
(plus a flag for a missing one), and the hour of day, all in UTC. Everything that *is*
fitted (encodings, imputation, scaling) lives inside the persisted sklearn pipeline.

The same features are needed in two shapes, so both live here side by side and share their
constants:

- `derive_feature_table`: a whole typed interim table at once, in Arrow kernels, for the
  batch stages (`rtb preprocess`, and through it training and `rtb predict`);
- `row_deriver`: one raw request dict at a time, in plain Python, for the scoring service.

Both truncate timestamps to milliseconds first, as `rtb make-dataset` stores them, so a
request scores the same whether it comes through a log file or over HTTP.
`tests/unit/test_features.py` holds the two against each other.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from rtb.dataset_config import DatasetConfig

if TYPE_CHECKING:  # the batch stages run on Arrow alone; pandas costs a noticeable import
    import pandas as pd

MISSING = "__missing__"
SECONDS_PER_HOUR = 3600.0
MS_PER_HOUR = SECONDS_PER_HOUR * 1000.0
MISSING_FLAG_SUFFIX = "_missing"

_F32 = struct.Struct("<f")
_NAN = float("nan")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# --------------------------------------------------------------------------- batch (Arrow)
def derive_feature_table(table: pa.Table, cfg: DatasetConfig) -> pa.Table:
    """Typed interim table -> processed table: id, timestamp, features, target if present.

    Column by column in Arrow: no round trip through pandas. Timestamps come out as naive
    UTC, which Arrow's CSV writer formats far faster than zone-aware ones (the processed CSV
    is UTC by contract).
    """
    stamp = table.column(cfg.timestamp)
    stamp_ms = pc.cast(pc.cast(stamp, pa.timestamp("ms", tz="UTC")), pa.int64())
    columns: dict[str, pa.ChunkedArray] = {
        cfg.id_column: table.column(cfg.id_column),
        cfg.timestamp: pc.cast(stamp_ms, pa.timestamp("ms")),
    }
    for name in cfg.categorical:
        columns[name] = _with_missing_level(table.column(name))
    for name in cfg.numerical:
        columns[name] = pc.cast(table.column(name), pa.float32())
    for source, feature in cfg.datetimes.items():
        earlier = pc.cast(pc.cast(table.column(source), pa.timestamp("ms", tz="UTC")), pa.int64())
        hours = pc.divide(pc.cast(pc.subtract(stamp_ms, earlier), pa.float64()), MS_PER_HOUR)
        columns[feature] = pc.cast(hours, pa.float32())
        columns[feature + MISSING_FLAG_SUFFIX] = pc.cast(pc.is_null(hours), pa.float32())
    columns[cfg.hour_feature] = pc.cast(pc.hour(stamp), pa.float32())
    if cfg.target in table.column_names:
        columns[cfg.target] = pc.cast(table.column(cfg.target), pa.int8())
    return pa.table(columns)


def _with_missing_level(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """The column as a dictionary whose gaps are the level `__missing__`, done on each chunk's
    indices and small dictionary rather than on millions of decoded strings."""
    if not pa.types.is_dictionary(column.type):
        column = pc.dictionary_encode(pc.cast(column, pa.string()))
    value_type = pa.string()
    chunks = []
    for chunk in column.chunks:
        dictionary = pc.cast(chunk.dictionary, value_type)
        indices = chunk.indices
        if chunk.null_count:
            position = pc.index(dictionary, MISSING).as_py()
            if position < 0:
                dictionary = pa.concat_arrays([dictionary, pa.array([MISSING], value_type)])
                position = len(dictionary) - 1
            indices = pc.fill_null(indices, pa.scalar(position, indices.type))
        chunks.append(pa.DictionaryArray.from_arrays(pc.cast(indices, pa.int32()), dictionary))
    return pa.chunked_array(chunks, type=pa.dictionary(pa.int32(), value_type))


# --------------------------------------------------------------------------- one row (Python)
RowDeriver = Callable[[Mapping[str, object]], tuple]


def row_deriver(cfg: DatasetConfig) -> RowDeriver:
    """A function from one raw request dict to its feature values, in `cfg.feature_columns`
    order (categoricals as str, the rest as float).

    Absent keys and None are gaps. Categorical values may be ints (ids the log writes as
    digits); counts may be ints, floats or numeric text (unparseable text is a gap, as in the
    log reader); timestamps are ISO strings or datetimes, naive ones meaning UTC. A closure
    over the column names rather than a loop over the config: it runs on every served
    request.
    """
    categorical = tuple(cfg.categorical)
    numerical = tuple(cfg.numerical)
    recency = tuple(cfg.datetimes)
    timestamp = cfg.timestamp

    def derive(row: Mapping[str, object]) -> tuple:
        get = row.get
        out: list[object] = []
        for name in categorical:
            value = get(name)
            out.append(value if value.__class__ is str else as_text(value))
        for name in numerical:
            out.append(as_float32(get(name)))
        stamp = epoch_ms(get(timestamp))
        flags = []
        for source in recency:
            earlier = epoch_ms(get(source))
            if stamp is None or earlier is None:
                out.append(_NAN)
                flags.append(1.0)
            else:
                out.append(f32((stamp - earlier) / MS_PER_HOUR))
                flags.append(0.0)
        out += flags
        out.append(_NAN if stamp is None else float(stamp // 3_600_000 % 24))
        return tuple(out)

    return derive


def as_text(value: object) -> str:
    """A categorical value as the batch path has it: text, with gaps as `__missing__`."""
    if value is None or (isinstance(value, float) and value != value):
        return MISSING
    if type(value).__name__ == "NAType":
        return MISSING
    return str(value)


def f32(value: float) -> float:
    """Round a double to the nearest float32 (what `astype(np.float32)` does); an overflow
    becomes +-inf, as in numpy."""
    try:
        return _F32.unpack(_F32.pack(value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def as_float32(value: object) -> float:
    """A count as the batch path holds it: float32, with gaps (and unparseable text) as NaN."""
    if value is None:
        return _NAN
    if value.__class__ is not float and value.__class__ is not int:
        try:
            value = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return _NAN
    return f32(value)  # type: ignore[arg-type]


def as_utc(value: object) -> datetime | None:
    """A request timestamp as an aware datetime; naive values are UTC; gaps (None, NaN, NaT)
    are None."""
    if value is None or value != value:  # NaN and pandas' NaT are not equal to themselves
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    elif not isinstance(value, datetime):
        if isinstance(value, float) and value != value:
            return None
        raise TypeError(f"expected an ISO timestamp string or datetime, got {value!r}")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def epoch_ms(value: object) -> int | None:
    """Milliseconds since the epoch (truncated, as make-dataset stores timestamps), or None."""
    moment = as_utc(value)
    if moment is None:
        return None
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def rows_frame(rows: Sequence[Mapping[str, object]], cfg: DatasetConfig) -> pd.DataFrame:
    """Raw request rows as the frame a model pipeline reads: `cfg.feature_columns` in order,
    categoricals as pandas categories, the rest float32, exactly as `row_deriver` gives them.

    The reference path of the scoring service (and of tests that fit pipelines on a few
    rows): a pandas frame per call is slow, but it goes through sklearn as batch data does.
    """
    import numpy as np
    import pandas as pd

    derive = row_deriver(cfg)
    values = list(zip(*(derive(row) for row in rows), strict=True)) if rows else None
    columns = cfg.feature_columns
    data = {}
    for position, name in enumerate(columns):
        column = values[position] if values else ()
        if position < len(cfg.categorical):
            data[name] = pd.Categorical(column)
        else:
            data[name] = np.asarray(column, dtype=np.float32)
    return pd.DataFrame(data, columns=columns)


def feature_frame(frame: pd.DataFrame, cfg: DatasetConfig) -> pd.DataFrame:
    """The columns a model pipeline reads, in order (id, timestamp and target are not
    features)."""
    return frame[cfg.feature_columns]
