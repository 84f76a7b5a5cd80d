"""Timestamps in a declared format: what a dataset config's `timestamp_format` means.

Our own logs write ISO 8601 (with or without a UTC offset) and need no declaration. Other
ad logs do not: Avazu writes the hour as `YYMMDDHH` (14102100), others count seconds or
milliseconds since the epoch. A config declares one format for its timestamp and datetime
columns:

- a strptime pattern (it holds at least one `%` directive), e.g. `"%y%m%d%H"`; without `%z`
  the values are UTC;
- `epoch_s` or `epoch_ms`: numbers of seconds or milliseconds since 1970-01-01 UTC.

The columns are then read as text and parsed here, batch by batch, into the timestamp[ms,
UTC] column every later stage expects; a value that does not fit is an error naming file,
column, line, the format and an example of it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rtb.errors import RtbError

EPOCH_UNITS = {"epoch_s": 1000, "epoch_ms": 1}  # -> milliseconds
EXAMPLE_MOMENT = datetime(2014, 10, 21, 9, 30, 15, tzinfo=UTC)
TARGET = pa.timestamp("ms", tz="UTC")


def check_format(fmt: str, source: str) -> None:
    """A config's `timestamp_format` must be an epoch unit or a pattern that reads back what
    it writes; anything else is an error at load time, not on the first row."""
    if fmt in EPOCH_UNITS:
        return
    if "%" not in fmt:
        raise RtbError(f"{source}: timestamp_format {fmt!r}: expected a strptime pattern such as "
                       f"'%y%m%d%H', or one of {sorted(EPOCH_UNITS)}")
    text = EXAMPLE_MOMENT.strftime(fmt)
    try:
        parsed = pc.strptime(pa.array([text]), format=fmt, unit="ms", error_is_null=True)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise RtbError(f"{source}: timestamp_format {fmt!r}: not a pattern Arrow can parse "
                       f"({str(exc).splitlines()[0]})") from exc
    if parsed.null_count:
        raise RtbError(f"{source}: timestamp_format {fmt!r}: does not read back its own output "
                       f"{text!r}")


def example(fmt: str) -> str:
    """A value in the format, for error messages."""
    if fmt in EPOCH_UNITS:
        return str(int(EXAMPLE_MOMENT.timestamp() * 1000 // EPOCH_UNITS[fmt]))
    return EXAMPLE_MOMENT.strftime(fmt)


def parse_formatted(path: Path, name: str, column: pa.Array, first_line: int, fmt: str) -> pa.Array:
    """Text in the declared format -> timestamp[ms, UTC]; gaps stay gaps, a value that does
    not fit is an error naming its line (`first_line`: the file line of the first value)."""
    text = column.cast(pa.string()) if pa.types.is_dictionary(column.type) else column
    if not pa.types.is_string(text.type) and not pa.types.is_large_string(text.type):
        text = pc.cast(text, pa.string())
    text = pc.utf8_trim_whitespace(text)
    gaps = pc.or_kleene(pc.is_null(text), pc.equal(text, ""))
    text = pc.if_else(gaps, pa.scalar(None, pa.string()), text)
    if fmt in EPOCH_UNITS:
        numbers = pc.cast(text, pa.float64(), safe=False) if _all_numbers(text) else None
        if numbers is None:
            _raise_first_bad(path, name, text, first_line, fmt, _number_or_null(text))
        millis = pc.cast(pc.floor(pc.multiply(numbers, float(EPOCH_UNITS[fmt]))), pa.int64())
        return pc.cast(millis, pa.timestamp("ms")).cast(TARGET)
    parsed = pc.strptime(text, format=fmt, unit="ms", error_is_null=True)
    bad = pc.and_(pc.is_null(parsed), pc.invert(pc.is_null(text)))
    if pc.any(bad).as_py():
        _raise_first_bad(path, name, text, first_line, fmt, pc.invert(bad))
    if parsed.type.tz is None:
        parsed = pc.assume_timezone(parsed, "UTC")
    return pc.cast(parsed, TARGET)


def _all_numbers(text: pa.Array) -> bool:
    return bool(pc.all(_number_or_null(text)).as_py() is not False)


def _number_or_null(text: pa.Array) -> pa.Array:
    """Per value: a gap, or text that reads as a (possibly fractional, signed) number."""
    number = pc.match_substring_regex(text, r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$")
    return pc.fill_null(number, True)


def _raise_first_bad(path: Path, name: str, text: pa.Array, first_line: int, fmt: str,
                     good: pa.Array) -> None:
    row = int(np.flatnonzero(~good.to_numpy(zero_copy_only=False))[0])
    what = {"epoch_s": "seconds since the epoch", "epoch_ms": "milliseconds since the epoch"}.get(
        fmt, f"a timestamp in the format {fmt!r}")
    raise RtbError(f"{path}: column {name!r} line {first_line + row}: expected {what} (the "
                   f"config's timestamp_format) such as {example(fmt)!r}, got {text[row].as_py()!r}")
