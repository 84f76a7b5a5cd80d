"""Arrow record batches to a CSV file, formatted on both cores.

The processed CSVs and the predictions CSV are exports for people and other tools: no stage
reads them back, but writing them is the costliest part of `rtb preprocess` and a large part
of `rtb predict`, because Arrow's CSV writer formats one batch at a time on one thread.
Here every batch is cut into slices that are formatted (dictionaries decoded, values turned
into text) on several threads at once, Arrow's kernels releasing the GIL, and the text is
written in the original order. The bytes are those `pyarrow.csv.write_csv` writes for the
same table in one call.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from rtb.overlap import in_order

SLICE_ROWS = 65_536  # rows formatted by one thread at a time
FORMAT_THREADS = 2
_BODY = pcsv.WriteOptions(include_header=False)


def write_csv_batches(path: Path, schema: pa.Schema, batches: Iterable[pa.RecordBatch]) -> int:
    """Write a header for `schema` and then every batch's rows to `path`; the rows written.

    Categorical (dictionary) columns are written as their values. A batch whose column names
    or value types differ from `schema`'s is refused with a ValueError before it is written."""
    plain = pa.schema([field.with_type(_value_type(field.type)) for field in schema])
    rows = 0
    with open(path, "wb") as out:
        out.write(_header(plain))
        for rows_done, text in in_order(_formatted, _slices(batches, plain), threads=FORMAT_THREADS,
                                        ahead=2 * FORMAT_THREADS):
            out.write(text)
            rows += rows_done
    return rows


def _value_type(kind: pa.DataType) -> pa.DataType:
    return kind.value_type if pa.types.is_dictionary(kind) else kind


def _header(schema: pa.Schema) -> bytes:
    sink = pa.BufferOutputStream()
    pcsv.write_csv(schema.empty_table(), sink)
    return sink.getvalue().to_pybytes()


def _slices(
    batches: Iterable[pa.RecordBatch], schema: pa.Schema
) -> Iterator[tuple[pa.RecordBatch, pa.Schema]]:
    for batch in batches:
        got = pa.schema([field.with_type(_value_type(field.type)) for field in batch.schema])
        if not got.equals(schema):
            raise ValueError(f"batch columns {got} do not match the CSV's {schema}")
        for start in range(0, batch.num_rows, SLICE_ROWS):
            yield batch.slice(start, SLICE_ROWS), schema


def _formatted(work: tuple[pa.RecordBatch, pa.Schema]) -> tuple[int, pa.Buffer]:
    batch, schema = work
    columns = [_as_written(column) for column in batch.columns]
    names = schema.names
    sink = pa.BufferOutputStream()
    pcsv.write_csv(pa.record_batch(columns, names=names), sink, _BODY)
    return batch.num_rows, sink.getvalue()


def _as_written(column: pa.Array) -> pa.Array:
    """The column in the type that formats fastest to the same text: dictionaries decoded,
    and float32 slices holding only small whole numbers (counts, flags, hours) as integers."""
    if pa.types.is_dictionary(column.type):
        return column.dictionary_decode()
    if pa.types.is_float32(column.type) and _small_whole_numbers(column):
        return pc.cast(column, pa.int32())
    return column


def _small_whole_numbers(column: pa.Array) -> bool:
    """True if every value is a whole number below 2**24 in magnitude and none is -0.0.

    Every such float32 is exact, and its shortest round-trip text, which Arrow writes, is
    the integer's digits; -0.0 would be written "-0" as a float and "0" as an integer."""
    values = column.drop_null().to_numpy()  # a NaN that is a value, not a gap, fails both
    with np.errstate(invalid="ignore"):
        whole = np.all(values == np.trunc(values)) and np.all(np.abs(values) < 2.0 ** 24)
    return bool(whole) and not np.any(np.signbit(values) & (values == 0))
