"""write_csv_batches writes the bytes Arrow's one-call writer writes, whatever the values."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pytest

from rtb import csv_export
from rtb.csv_export import write_csv_batches

# Float32 values next to the integer fast path's edges: exact whole numbers below 2**24 go
# through it, the rest (fractions, -0.0, NaN, infinities, large numbers) must not.
EDGE_FLOATS = [0.0, 1.0, 352.0, -3.0, 16777215.0, 16777216.0, 16777217.0, 123456789.0, 1e15,
               -0.0, 0.5, 10.354491, float("nan"), float("inf"), -float("inf"), 3e38, None]


def _expected(table: pa.Table) -> bytes:
    plain = pa.table([pc.cast(c, c.type.value_type) if pa.types.is_dictionary(c.type) else c
                      for c in table.columns], names=table.column_names)
    sink = pa.BufferOutputStream()
    pcsv.write_csv(plain, sink)
    return sink.getvalue().to_pybytes()


def _table(rows: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    counts = rng.poisson(30, rows).astype(np.float32)
    edges = np.array([np.nan if v is None else v for v in EDGE_FLOATS], dtype=np.float32)
    mixed = counts.copy()
    mixed[rows // 2 : rows // 2 + len(edges)] = edges  # one slice holds every edge case
    levels = np.array(["a", 'say "hi"', "x;y", "", "é"], dtype=object)
    return pa.table({
        "id": pa.array([f"id{i}" for i in range(rows)]),
        "when": pa.array([datetime(2019, 1, 15, 0, 0, i % 60, 1000 * (i % 1000)) for i in range(rows)],
                         pa.timestamp("ms")),
        "level": pa.array(levels[rng.integers(0, len(levels), rows)]).dictionary_encode(),
        "counts": pa.array(counts, mask=rng.random(rows) < 0.1),
        "mixed": pa.array(mixed, mask=np.isin(np.arange(rows), [rows // 2 + len(edges) - 1])),
        "hours": pa.array(rng.random(rows).astype(np.float32) * 100),
        "label": pa.array(rng.integers(0, 2, rows).astype(np.int8)),
    })


@pytest.mark.parametrize("slice_rows", [7, 64, 100_000])
def test_the_file_equals_one_call_of_arrows_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slice_rows: int
) -> None:
    monkeypatch.setattr(csv_export, "SLICE_ROWS", slice_rows)
    table = _table(1_000, seed=slice_rows)
    batches = table.to_batches(max_chunksize=300)  # slices cross batch boundaries too
    out = tmp_path / "out.csv"

    rows = write_csv_batches(out, table.schema, batches)

    assert rows == table.num_rows
    assert out.read_bytes() == _expected(table)
    text = out.read_text(encoding="utf-8")
    assert '"say ""hi"""' in text and ",-0," in text and ",nan," in text and ",16777216," in text


def test_a_slice_of_whole_numbers_is_written_as_integers_and_others_as_floats() -> None:
    whole = pa.array([0, 3, 16777215, None], pa.float32())
    assert csv_export._as_written(whole).type == pa.int32()
    for value in (0.5, -0.0, float("nan"), 16777216.0, float("inf")):
        column = pa.array([1.0, value], pa.float32())
        assert csv_export._as_written(column).type == pa.float32(), value


def test_no_batches_writes_the_header_alone(tmp_path: Path) -> None:
    schema = pa.schema([("id", pa.string()), ("level", pa.dictionary(pa.int32(), pa.string()))])
    out = tmp_path / "empty.csv"
    assert write_csv_batches(out, schema, []) == 0
    assert out.read_bytes() == b'"id","level"\n'


def test_a_batch_that_does_not_match_the_schema_fails(tmp_path: Path) -> None:
    schema = pa.schema([("id", pa.string()), ("p", pa.float64())])
    wrong = pa.record_batch([pa.array(["a"]), pa.array(["not a number"])], names=["id", "p"])
    with pytest.raises(ValueError, match="do not match"):
        write_csv_batches(tmp_path / "bad.csv", schema, [wrong])
