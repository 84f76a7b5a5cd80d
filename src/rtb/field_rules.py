"""What a raw field must hold, per column role: written once for log files and for requests.

`rtb make-dataset` checks whole Arrow columns of a raw log; `rtb serve` checks one JSON
request at a time. Both get their rules from here, so that a value a log file may not hold
is never priced when a bidder sends it, and the other way round. Each rule has two forms
built from the same constants:

- `FieldRule.request_type()`: a pydantic type whose constraints pydantic checks in Rust and
  the OpenAPI document shows (a schema fuzzer generates requests from it, so the schema must
  say exactly what is accepted);
- `FieldRule.violations(column)` / `first_violation(column)`: the same rule over an Arrow
  column, as a row mask, for the batch stage.

The rules, by role:

- counts (`non_negative` numerical columns): finite, >= 0 and at most `COUNT_MAXIMUM`;
  other numerical columns: finite in float32 (the processed frame is float32);
- timestamps (the request timestamp and every extra datetime): ISO 8601 date and time,
  written in the years `FIRST_YEAR`..`LAST_YEAR`, optional fraction and UTC offset (none
  means UTC); over Arrow, the parsed UTC instant between `EARLIEST` and `LATEST`;
- categoricals and the id: text of at most `TEXT_MAX_LENGTH` characters without control
  characters (tab, LF and CR are allowed); a request may send an integer instead (ids the
  log writes as digits), never a boolean or a fraction;
- the target: 0 or 1.

Gaps (an empty cell, a JSON null or an absent key) are allowed everywhere but in the
timestamp and the id of a log file. Unknown fields: a request naming a field that is not a
column of the dataset config is rejected (422): every field of a request is optional, so a
misspelled name would otherwise score as a silent gap. A log file may carry extra columns
(they are logged and ignored): every role column of a file is required, so a misspelling
there already fails as a missing column.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from rtb.dataset_config import DatasetConfig

if TYPE_CHECKING:
    import pyarrow as pa

Role = Literal["id", "timestamp", "categorical", "count", "number", "datetime", "target"]

# Largest float64 that still rounds to a finite float32 (the processed frame is float32).
FLOAT32_LIMIT = 3.4028235677973366e38
# More app starts, views or installs than seconds in 30 years: a corrupt field, not a user.
COUNT_MAXIMUM = 1e9
TEXT_MAX_LENGTH = 256
# Integers a request may send for a categorical: 15 digits, exact in a JSON parser's float64
# (longer ids can be sent as text).
INTEGER_DIGITS = 15
INTEGER_LIMIT = 10**INTEGER_DIGITS - 1
# C0 control characters but tab, LF and CR: in a text field they mean a corrupt value.
CONTROL_CHARACTERS = r"[\x00-\x08\x0b\x0c\x0e-\x1f]"
TEXT_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f]*$"

# Timestamps are written in the years 2000..2099. The pattern holds the calendar exactly
# (month lengths, leap days), so every text it admits parses; a log's timestamps are parsed
# by Arrow to UTC instants, which may lie up to a day (the largest UTC offset) outside those
# years, hence EARLIEST and LATEST.
FIRST_YEAR, LAST_YEAR = 2000, 2099
MAX_UTC_OFFSET = timedelta(hours=23, minutes=59)
EARLIEST = datetime(FIRST_YEAR, 1, 1, tzinfo=UTC) - MAX_UTC_OFFSET
LATEST = datetime(LAST_YEAR + 1, 1, 1, tzinfo=UTC) + MAX_UTC_OFFSET
_LONG_MONTHS = r"(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])"
_SHORT_MONTHS = r"(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)"
_FEBRUARY = r"02-(?:0[1-9]|1[0-9]|2[0-8])"
_LEAP_DAY = r"20(?:[02468][048]|[13579][26])-02-29"  # every 4th year; 2000 is a leap year
_DATE = rf"(?:20[0-9][0-9]-(?:{_LONG_MONTHS}|{_SHORT_MONTHS}|{_FEBRUARY})|{_LEAP_DAY})"
_TIME = r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?"
_OFFSET = r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])?"
TIMESTAMP_PATTERN = rf"^{_DATE}[T ]{_TIME}{_OFFSET}$"
TIMESTAMP_EXAMPLE = "2019-01-09 21:20:15.943000+00:00"


@dataclass(frozen=True)
class FieldRule:
    """The rule of one raw column: its role, whether a value is required, and number bounds."""

    name: str
    role: Role
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None

    @property
    def expected(self) -> str:
        """What a valid value is, in the words both error messages use ("expected ...")."""
        if self.role == "count":
            return f"a count >= 0 and at most {COUNT_MAXIMUM:g}"
        if self.role == "number":
            return "a finite number"
        if self.role in ("timestamp", "datetime"):
            return (f"an ISO timestamp such as '{TIMESTAMP_EXAMPLE}' in the years "
                    f"{FIRST_YEAR}-{LAST_YEAR}")
        if self.role == "target":
            return "0 or 1"
        return f"text of at most {TEXT_MAX_LENGTH} characters without control characters"

    @property
    def request_expected(self) -> str:
        """`expected` for a JSON request, where a categorical or id may also be an integer."""
        if self.role in ("id", "categorical"):
            return f"{self.expected}, or an integer of at most {INTEGER_DIGITS} digits"
        return self.expected

    @property
    def pattern_message(self) -> str:
        """What a text failing this rule's pattern lacks, in words rather than the regex."""
        if self.role in ("timestamp", "datetime"):
            return f"String should be {self.expected}"
        return "String should hold no control characters (tab, LF and CR are allowed)"

    # ----------------------------------------------------------------------- one request
    def request_type(self) -> Any:
        """The pydantic type of this field in a request (Optional unless required)."""
        from typing import Annotated

        from pydantic import Field, PlainValidator, Strict, StringConstraints, WithJsonSchema

        if self.role in ("count", "number"):
            value: Any = Annotated[float, Strict(), Field(
                ge=self.minimum, le=self.maximum, allow_inf_nan=False,
                description=f"Expected {self.expected}; null or absent when unknown.",
            )]
        elif self.role in ("timestamp", "datetime"):
            value = Annotated[str, StringConstraints(strict=True, pattern=TIMESTAMP_PATTERN),
                              Field(description=f"Expected {self.expected}; without an offset "
                                    "it is UTC.", examples=[TIMESTAMP_EXAMPLE])]
        elif self.role == "target":
            value = Annotated[int, Strict(), Field(ge=0, le=1)]
        else:
            text = Annotated[str, StringConstraints(
                strict=True, max_length=TEXT_MAX_LENGTH, pattern=TEXT_PATTERN)]
            digits = Annotated[int, PlainValidator(integral), WithJsonSchema(
                {"type": "integer", "minimum": -INTEGER_LIMIT, "maximum": INTEGER_LIMIT})]
            # Left to right: text first, so a string never reaches the Python integer check
            # (pydantic's smart mode would try every branch on every string).
            value = Annotated[text | digits, Field(
                union_mode="left_to_right",
                description=f"Expected {self.request_expected} (read as its digits).")]
        return value if self.required else value | None

    # ----------------------------------------------------------------------- Arrow column
    def violations(self, column: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Boolean mask of the rows that break the rule; gaps (nulls) never do.

        Counts and numbers may be numeric or float columns, timestamps zone-aware timestamp
        columns (as `raw_reader.parse_timestamps` returns them), text string or dictionary
        columns (the few levels are checked first; rows are found only when one is bad).
        """
        import pyarrow as pa
        import pyarrow.compute as pc

        if self.role in ("count", "number", "target"):
            values = _as_float64(column)
            with np.errstate(invalid="ignore"):
                if self.role == "target":
                    return ~np.isnan(values) & (values != 0.0) & (values != 1.0)
                bad = np.isinf(values)
                if self.minimum is not None:
                    bad |= values < self.minimum
                if self.maximum is not None:
                    bad |= values > self.maximum
            return bad
        if self.role in ("timestamp", "datetime"):
            unit = pa.timestamp("us", tz="UTC")
            stamps = pc.cast(column, unit)
            outside = pc.or_(pc.less(stamps, pa.scalar(EARLIEST, unit)),
                             pc.greater_equal(stamps, pa.scalar(LATEST, unit)))
            return _filled_mask(outside)
        return text_violations(column)

    def first_violation(self, column: pa.Array | pa.ChunkedArray) -> tuple[int, str] | None:
        """(row index, "expected ..., got ...") of the first row breaking the rule, or None."""
        bad = np.flatnonzero(self.violations(column))
        if not bad.size:
            return None
        row = int(bad[0])
        value = column[row].as_py()
        if isinstance(value, float):
            shown = f"{value:g}"
        elif isinstance(value, datetime):
            shown = repr(value.isoformat())
        else:
            shown = repr(value)
        return row, f"expected {self.expected}, got {shown}"


def integral(value: object) -> int:
    """A request's integer for a categorical: a JSON integer, or a number with no fraction
    (JSON Schema counts 5.0 as an integer) of at most `INTEGER_DIGITS` digits; never a boolean."""
    if value.__class__ is int or (isinstance(value, float) and value.is_integer()):
        number = int(value)
        if -INTEGER_LIMIT <= number <= INTEGER_LIMIT:
            return number
        raise ValueError(f"Input should be an integer of at most {INTEGER_DIGITS} digits")
    raise ValueError("Input should be a valid integer")


def text_violations(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Rows whose text is too long or holds a control character (the text rule over Arrow)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    masks = []
    for chunk in chunks:
        if pa.types.is_dictionary(chunk.type):
            levels = _bad_text(pc.cast(chunk.dictionary, pa.string()))
            if not levels.any():
                masks.append(np.zeros(len(chunk), dtype=bool))
                continue
            codes = chunk.indices.to_numpy(zero_copy_only=False)
            valid = chunk.is_valid().to_numpy(zero_copy_only=False)
            masks.append(valid & levels[np.where(valid, codes, 0).astype(np.int64)])
        elif _surely_clean(chunk):
            masks.append(np.zeros(len(chunk), dtype=bool))
        else:
            masks.append(_bad_text(pc.cast(chunk, pa.string())))
    return np.concatenate(masks) if masks else np.zeros(0, dtype=bool)


def _surely_clean(chunk: pa.Array) -> bool:
    """Whether a plain string chunk certainly passes the text rule, from its raw buffers.

    No byte below 0x20 and no value longer than `TEXT_MAX_LENGTH` bytes (a character is at
    least a byte) proves it without the regex, which on millions of ids costs ~0.1 s per
    1M rows; any such byte (tab, LF and CR included) leaves the decision to the regex.
    """
    import pyarrow as pa

    if not (pa.types.is_string(chunk.type) or pa.types.is_large_string(chunk.type)):
        return False
    if not len(chunk) or chunk.buffers()[2] is None:
        return True
    width = np.int64 if pa.types.is_large_string(chunk.type) else np.int32
    offsets = np.frombuffer(chunk.buffers()[1], width)[chunk.offset : chunk.offset + len(chunk) + 1]
    if (np.diff(offsets) > TEXT_MAX_LENGTH).any():
        return False
    data = np.frombuffer(chunk.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]
    return not (data < 0x20).any()


def _bad_text(strings: pa.Array) -> np.ndarray:
    import pyarrow.compute as pc

    bad = pc.or_(pc.match_substring_regex(strings, CONTROL_CHARACTERS),
                 pc.greater(pc.utf8_length(strings), TEXT_MAX_LENGTH))
    return _filled_mask(bad)


def _filled_mask(mask: pa.Array | pa.ChunkedArray) -> np.ndarray:
    import pyarrow.compute as pc

    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


def _as_float64(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Numbers as float64 with gaps as NaN (nulls never break a number rule)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    return np.asarray(pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False),
                      dtype=np.float64)


def field_rules(cfg: DatasetConfig, *, split: str = "test") -> dict[str, FieldRule]:
    """Every raw column's rule, from the dataset config's roles, in `raw_columns` order.

    `split="test"` describes a request (and a test log): no target. The timestamp is the one
    field a request must send; a log file must also have an id on every row, but a request
    is scored by position and needs none.
    """
    rules: dict[str, FieldRule] = {}
    for name in cfg.raw_columns(split):
        if name == cfg.id:
            rules[name] = FieldRule(name, "id")
        elif name == cfg.timestamp:
            rules[name] = FieldRule(name, "timestamp", required=True)
        elif name in cfg.categorical:
            rules[name] = FieldRule(name, "categorical")
        elif name in cfg.datetimes:
            rules[name] = FieldRule(name, "datetime")
        elif name == cfg.target:
            rules[name] = FieldRule(name, "target", required=True)
        elif name in cfg.non_negative:
            rules[name] = FieldRule(name, "count", minimum=0.0, maximum=COUNT_MAXIMUM)
        else:
            rules[name] = FieldRule(name, "number", minimum=-FLOAT32_LIMIT,
                                    maximum=FLOAT32_LIMIT)
    return rules
