"""Read a raw gzip CSV as Arrow record batches, or fail with one line naming file, column and line.

Reading is the floor of the whole pipeline's speed, so the happy path is pyarrow's streaming
parser with explicit column types and large blocks (each block is parsed with all cores),
fed by Intel ISA-L's gzip decoder (`isal`: about 2x zlib's speed, and zlib inflate alone was
half of pyarrow's own gzip read). It holds one block at a time, so memory does not grow with
the file. Only when that parse fails do we re-read the file as strings, from the failing
block on, to find the first offending line, so that the error tells the user exactly what to
fix.
"""

from __future__ import annotations

import functools
import gzip
import logging
import re
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
from isal import igzip, isal_zlib

from rtb.data.timestamp_formats import parse_formatted
from rtb.dataset_config import DatasetConfig
from rtb.errors import RtbError

if TYPE_CHECKING:  # pandas is imported only on the error path: it slows every start
    import pandas as pd

log = logging.getLogger(__name__)

GZIP_MAGIC = b"\x1f\x8b"
READ_BLOCK_BYTES = 8 << 20
# Not "NA": that is Namibia's country code.
NULL_TEXTS = ["", "NaN", "nan", "null", "NULL", "None"]
SAMPLE_LINES = 200
ZONE_SUFFIX = re.compile(r"(Z|[+-]\d\d:?\d\d)$")


def _open_checked(path: Path) -> None:
    if not path.exists():
        raise RtbError(f"{path}: file not found")
    if not path.is_file():
        raise RtbError(f"{path}: expected a file, found a directory or special file")
    if path.stat().st_size == 0:
        raise RtbError(f"{path}: file is empty (expected a gzip-compressed CSV with a header row)")
    if path.suffix == ".gz":
        with open(path, "rb") as handle:
            if handle.read(2) != GZIP_MAGIC:
                raise RtbError(f"{path}: not gzip-compressed (expected a .csv.gz file)")


def read_header(path: Path, separator: str) -> list[str]:
    """The header row's column names, read without decompressing the whole file."""
    _open_checked(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as handle:
            first = handle.readline()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise RtbError(f"{path}: cannot read the header row ({exc})") from exc
    if not first.strip():
        raise RtbError(f"{path}: no header row (expected {separator!r}-separated column names)")
    return [name.strip().strip('"') for name in first.rstrip("\r\n").split(separator)]


def check_columns(path: Path, header: list[str], cfg: DatasetConfig, split: str) -> list[str]:
    """Columns to keep; a missing required column or a wrong separator is a one-line error."""
    required = cfg.raw_columns(split)
    if len(header) == 1 and len(required) > 1:
        others = [sep for sep in (",", ";", "\t", "|") if sep != cfg.separator and sep in header[0]]
        hint = f" (the header looks {others[0]!r}-separated)" if others else ""
        raise RtbError(
            f"{path}: expected {cfg.separator!r}-separated columns {required}, "
            f"found a single column{hint}"
        )
    duplicated = sorted(name for name, count in Counter(header).items() if count > 1)
    if duplicated:
        shown = duplicated[:10] + (["..."] if len(duplicated) > 10 else [])
        raise RtbError(f"{path}: header repeats column(s) {shown}")
    missing = [c for c in required if c not in header]
    if missing:
        raise RtbError(f"{path}: missing required column(s) {missing} (expected {required})")
    dropped = [c for c in header if c in cfg.drop]
    extra = [c for c in header if c not in required and c not in cfg.drop]
    if split == "test" and cfg.target in extra:
        extra.remove(cfg.target)
    if dropped:
        log.info("%s: dropping column(s) %s as configured (never features)", path.name, dropped)
    if extra:
        log.info("%s: ignoring extra column(s) %s", path.name, extra)
    return required


@dataclass(frozen=True)
class RawBatch:
    """Rows of a raw file as parsed, and the file line of the first one (the header is line 1),
    so that a check on the batch can name the line of a bad value."""

    batch: pa.RecordBatch
    first_line: int


def read_raw_batches(
    path: Path, cfg: DatasetConfig, split: str, *, block_bytes: int = READ_BLOCK_BYTES
) -> Iterator[RawBatch]:
    """Parse the raw file with explicit types, one block of `block_bytes` at a time; on
    failure pinpoint the bad column and line.

    The parser types every column itself: categoricals straight into dictionaries (one per
    batch), counts into float32, timestamps into timestamps (with or without a UTC offset,
    as the first rows show), so no string copy of the values is ever built, and only one
    block of the file is in memory at a time. The blocks are those of a one-shot read with
    the same block size, so the batches are too.
    """
    header = read_header(path, cfg.separator)
    columns = check_columns(path, header, cfg, split)
    types: dict[str, pa.DataType] = {c: pa.string() for c in columns}
    for name in cfg.categorical:
        types[name] = pa.dictionary(pa.int32(), pa.string())
    for name in cfg.numerical:
        types[name] = pa.float32()
    # Declared formats are parsed from text after the read (`parse_timestamps`).
    stamp_types = {} if cfg.timestamp_format else _timestamp_types(path, header, cfg)
    if split == "train":
        types[cfg.target] = pa.float64()
    # Perhaps only the timestamps disagree with the first rows (offsets on some rows, not on
    # others): then the rest of the file is read again with them as text, which
    # `parse_timestamps` takes in both kinds; the rows already handed out stay as they are.
    attempts = [types | stamp_types, types] if stamp_types else [types]
    done = 0
    first_error: pa.ArrowInvalid | None = None
    for column_types in attempts:
        try:
            for batch in _skipping(_stream(path, cfg, columns, column_types, block_bytes), done):
                yield RawBatch(batch, done + 2)
                done += batch.num_rows
        except pa.ArrowInvalid as exc:
            first_error = first_error or exc
            continue
        return
    assert first_error is not None
    raise _explain_parse_error(path, cfg, columns, first_error, block_bytes, done) from first_error


def _skipping(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """The batches without their first `rows` rows."""
    for batch in batches:
        if rows >= batch.num_rows:
            rows -= batch.num_rows
            continue
        yield batch.slice(rows) if rows else batch
        rows = 0


def _stream(
    path: Path, cfg: DatasetConfig, columns: list[str], types: dict[str, pa.DataType],
    block_bytes: int, convert: pcsv.ConvertOptions | None = None,
) -> Iterator[pa.RecordBatch]:
    convert = convert or pcsv.ConvertOptions(
        column_types=types,
        include_columns=columns,
        strings_can_be_null=True,
        null_values=NULL_TEXTS,
        quoted_strings_can_be_null=True,
    )
    parse = pcsv.ParseOptions(delimiter=cfg.separator, newlines_in_values=False)
    read = pcsv.ReadOptions(block_size=block_bytes, use_threads=True)
    try:
        with (igzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as handle:
            yield from pcsv.open_csv(
                handle, read_options=read, parse_options=parse, convert_options=convert
            )
    except (OSError, EOFError, zlib.error, isal_zlib.error) as exc:
        raise RtbError(f"{path}: cannot decompress or read ({exc})") from exc


def _timestamp_types(path: Path, header: list[str], cfg: DatasetConfig) -> dict[str, pa.DataType]:
    """Zone-aware or naive timestamp type per datetime column, judged from the first rows.

    A column with no value in the sample stays text and is parsed after the read.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    samples: dict[str, list[str]] = {name: [] for name in [cfg.timestamp, *cfg.datetimes]}
    positions = {name: header.index(name) for name in samples}
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as handle:
            handle.readline()
            for _, line in zip(range(SAMPLE_LINES), handle, strict=False):
                fields = line.rstrip("\r\n").split(cfg.separator)
                for name, position in positions.items():
                    value = fields[position].strip('"') if position < len(fields) else ""
                    if value and value not in NULL_TEXTS:
                        samples[name].append(value)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError):
        return {}  # the full read reports what is wrong with the file
    types: dict[str, pa.DataType] = {}
    for name, values in samples.items():
        if values:
            zoned = ZONE_SUFFIX.search(values[0]) is not None
            types[name] = pa.timestamp("us", tz="UTC" if zoned else None)
    return types


def _explain_parse_error(
    path: Path, cfg: DatasetConfig, columns: list[str], exc: Exception, block_bytes: int,
    skip_rows: int,
) -> RtbError:
    """Re-read as strings, batch by batch from the one that failed, to name the first value
    that is not a timestamp or a number."""
    message = str(exc).splitlines()[0]
    as_text = pcsv.ConvertOptions(column_types={c: pa.string() for c in columns},
                                  include_columns=columns)
    stamps = [] if cfg.timestamp_format else [cfg.timestamp, *cfg.datetimes]  # else read as text
    numeric = [c for c in cfg.numerical + [cfg.target] if c in columns]
    done = 0
    try:
        for batch in _stream(path, cfg, columns, {}, block_bytes, as_text):
            first_line, done = done + 2, done + batch.num_rows
            if done <= skip_rows:
                continue
            for name in stamps:
                error = _bad_timestamp_error(path, name, batch.column(name), first_line)
                if error is not None:
                    return error
            for name in numeric:
                error = _bad_number_error(path, name, batch.column(name), first_line)
                if error is not None:
                    return error
    except (pa.ArrowInvalid, RtbError) as inner:
        detail = str(inner).splitlines()[0]
        return RtbError(f"{path}: malformed CSV ({detail})")
    return RtbError(f"{path}: malformed CSV ({message})")


def _bad_number_error(path: Path, name: str, column: pa.Array, first_line: int) -> RtbError | None:
    import pandas as pd

    text = column.to_pandas()
    parsed = pd.to_numeric(text, errors="coerce")
    bad = np.flatnonzero(parsed.isna().to_numpy() & ~_is_null_text(text))
    if not bad.size:
        return None
    row = int(bad[0])
    return RtbError(
        f"{path}: column {name!r} line {first_line + row}: expected a number, got {text.iloc[row]!r}"
    )


def _is_null_text(text: pd.Series) -> np.ndarray:
    return text.isna().to_numpy() | text.isin(NULL_TEXTS).to_numpy()


def parse_timestamps(
    path: Path, name: str, column: pa.Array, first_line: int = 2, fmt: str | None = None
) -> pa.Array:
    """ISO timestamps with or without a UTC offset (or, with `fmt`, the config's declared
    `timestamp_format`) -> timestamp[ms, UTC]; a bad one is an error naming its line
    (`first_line` is the file line of the column's first value)."""
    if fmt is not None:
        return parse_formatted(path, name, column, first_line, fmt)
    target = pa.timestamp("ms", tz="UTC")
    for attempt in (pa.timestamp("us", tz="UTC"), pa.timestamp("us")):
        try:
            parsed = pc.cast(column, attempt)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            continue
        if attempt.tz is None:
            parsed = pc.assume_timezone(parsed, "UTC")
        return pc.cast(parsed, target, safe=False)
    error = _bad_timestamp_error(path, name, column, first_line)
    if error is None:  # every value is valid ISO, but offsets and naive values are mixed
        import pandas as pd

        _note_mixed_offsets(path, name)
        text = column.to_pandas()
        parsed = pd.to_datetime(text, utc=True, format="ISO8601")
        return pc.cast(pa.array(parsed), target, safe=False)
    raise error


@functools.cache
def _note_mixed_offsets(path: Path, name: str) -> None:
    """Said once per file and column: the values are right, but the log is inconsistent."""
    log.info("%s: column %r mixes timestamps with a UTC offset and without; those without are "
             "read as UTC", path.name, name)


def _bad_timestamp_error(
    path: Path, name: str, column: pa.Array, first_line: int
) -> RtbError | None:
    import pandas as pd

    text = column.to_pandas()
    parsed = pd.to_datetime(text, errors="coerce", utc=True, format="ISO8601")
    bad = np.flatnonzero(parsed.isna().to_numpy() & ~_is_null_text(text))
    if not bad.size:
        return None
    row = int(bad[0])
    return RtbError(
        f"{path}: column {name!r} line {first_line + row}: expected an ISO timestamp such as "
        f"'2019-01-09 21:20:15.943000+00:00', got {text.iloc[row]!r}"
    )
