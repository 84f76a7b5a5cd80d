"""The field rules: one verdict per value, whether it arrives in a log column or a request.

The request form is exercised through the service's own request adapter (pydantic, the
same object `rtb serve` validates with); the column form on Arrow arrays as make-dataset
holds them (float32 counts, dictionary-encoded text, timestamps parsed by the raw reader).
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from rtb.data.raw_reader import parse_timestamps
from rtb.dataset_config import load_dataset_config
from rtb.field_rules import (
    COUNT_MAXIMUM,
    EARLIEST,
    LATEST,
    TEXT_MAX_LENGTH,
    TIMESTAMP_PATTERN,
    FieldRule,
    field_rules,
    text_violations,
)
from rtb.serving.schema import adapters

CFG = load_dataset_config("rtb")
RULES = field_rules(CFG)
ONE_ROW, _, _ = adapters(CFG, 10)
STAMP = "2019-01-09 21:20:15.943000+00:00"


def accepted(field: str, value: object) -> bool:
    """Whether a request with this one field (beside a valid timestamp) validates."""
    row = {"timestamp": STAMP, field: value} if field != "timestamp" else {field: value}
    try:
        ONE_ROW.validate_python(row)
    except ValidationError:
        return False
    return True


def test_roles_come_from_the_dataset_config() -> None:
    assert {name: rule.role for name, rule in RULES.items()} == {
        "id": "id", "timestamp": "timestamp", "lastStart": "datetime",
        **{name: "categorical" for name in CFG.categorical},
        **{name: "count" for name in CFG.numerical},
    }
    assert [name for name, rule in RULES.items() if rule.required] == ["timestamp"]
    train = field_rules(CFG, split="train")
    assert train["install"].role == "target" and train["install"].required
    talking = field_rules(load_dataset_config("talkingdata"))
    assert talking["click_time"].role == "timestamp"
    assert {talking[name].role for name in ("ip", "app", "device", "os", "channel")} == {"categorical"}


COUNT_CASES = [  # value, valid (None is a gap)
    (0, True), (25, True), (2.5, True), (COUNT_MAXIMUM, True), (None, True),
    (-25, False), (-1e16, False), (-0.5, False), (COUNT_MAXIMUM * 1.5, False),
    (math.inf, False), (-math.inf, False),
]


@pytest.mark.parametrize(("value", "valid"), COUNT_CASES)
def test_counts_agree_between_column_and_request(value, valid) -> None:
    rule = RULES["startCount"]
    column = pa.chunked_array([pa.array([1.0, value], type=pa.float32())])
    assert not rule.violations(column)[0]
    assert bool(rule.violations(column)[1]) is not valid
    if not math.isinf(value or 0.0):  # JSON has no infinity; its request form is tested below
        assert accepted("startCount", value) is valid


def test_count_requests_refuse_text_booleans_and_non_finite_json() -> None:
    for value in ("25", True, "NaN"):
        assert not accepted("viewCount", value)
    with pytest.raises(ValidationError):
        ONE_ROW.validate_json(b'{"timestamp": "2019-01-09 21:20:15", "viewCount": Infinity}')


def test_first_violation_reads_like_make_dataset() -> None:
    column = pa.chunked_array([pa.array([3.0, None, -3.0, 5e9], type=pa.float32())])
    row, message = RULES["clickCount"].first_violation(column)
    assert row == 2
    assert message == "expected a count >= 0 and at most 1e+09, got -3"
    assert RULES["clickCount"].first_violation(pa.chunked_array([pa.array([0.0, None])])) is None


TEXT_CASES = [
    ("US", True), ("", True), ("iPhone8,1", True), ("tab\tand\r\nnewline", True), (None, True),
    ("x" * TEXT_MAX_LENGTH, True), ("é" * TEXT_MAX_LENGTH, True),
    ("x" * (TEXT_MAX_LENGTH + 1), False), ("nul\x00byte", False), ("bell\x07", False),
    ("esc\x1b[0m", False),
]


@pytest.mark.parametrize(("value", "valid"), TEXT_CASES)
def test_text_agrees_between_dictionary_column_and_request(value, valid) -> None:
    plain = pa.chunked_array([pa.array(["ok", value, "ok"])])
    encoded = pa.chunked_array([pa.array(["ok", value, "ok"]).dictionary_encode()])
    for column in (plain, encoded):
        assert text_violations(column).tolist() == [False, not valid, False]
    assert accepted("country", value) is valid
    assert accepted("id", value) is valid


@pytest.mark.parametrize(("value", "valid"), [
    (3, True), (-3, True), (3.0, True), (10**15 - 1, True),
    (True, False), (False, False), (11.4, False), (10**15, False), (1e300, False),
])
def test_categorical_integers_are_whole_numbers_never_booleans(value, valid) -> None:
    assert accepted("softwareVersion", value) is valid
    if valid:
        assert ONE_ROW.validate_python({"timestamp": STAMP, "sourceGameId": value})[
            "sourceGameId"] == int(value)


TIMESTAMP_CASES = [
    (STAMP, True), ("2019-01-09T21:20:15Z", True), ("2019-01-09 21:20:15", True),
    ("2019-01-09 21:20:15.5-05:30", True), ("2000-01-01 00:00:00", True),
    ("2099-12-31 23:59:59.999999+00:00", True), ("2000-02-29 12:00:00", True),
    ("0227-05-01T00:00:00-00:58", False), ("1999-06-01 00:00:00+00:00", False),
    ("2150-01-01 00:00:00+00:00", False), ("1970-01-01 00:00:00", False),
]


@pytest.mark.parametrize(("text", "valid"), TIMESTAMP_CASES)
def test_timestamps_agree_between_parsed_column_and_request(text, valid) -> None:
    parsed = parse_timestamps(Path("raw.csv.gz"), "timestamp", pa.chunked_array([pa.array([text])]))
    assert bool(RULES["timestamp"].violations(parsed)[0]) is not valid
    assert accepted("timestamp", text) is valid
    assert accepted("lastStart", text) is valid


@pytest.mark.parametrize("text", [
    "2019-02-29 00:00:00", "2019-04-31 00:00:00", "2019-13-01 00:00:00", "2019-01-09 24:00:00",
    "2019-01-09", "yesterday", "2019-01-09 21:20:15.1234567", "2019-01-09 21:20:15+24:00",
    "2019-01-09t21:20:15z", "２０１９-01-09 21:20:15",
])
def test_request_timestamps_are_calendar_dates_in_one_format(text) -> None:
    assert not accepted("timestamp", text)


@pytest.mark.parametrize("value", [1547510413, 1547510413.5, True, None])
def test_request_timestamps_are_text_not_epoch_numbers(value) -> None:
    assert not accepted("timestamp", value)
    assert accepted("lastStart", value) is (value is None)  # lastStart may be a gap


@settings(max_examples=300, deadline=None, database=None)
@given(st.from_regex(TIMESTAMP_PATTERN, fullmatch=True))
def test_every_text_the_pattern_admits_parses_within_the_column_bounds(text: str) -> None:
    """The pattern is the request form of the column rule's bounds: never wider."""
    moment = datetime.fromisoformat(text)
    instant = moment if moment.tzinfo else moment.replace(tzinfo=EARLIEST.tzinfo)
    assert EARLIEST <= instant < LATEST


def test_unknown_fields_are_rejected_by_name() -> None:
    with pytest.raises(ValidationError) as caught:
        ONE_ROW.validate_python({"timestamp": STAMP, "startcount": 3, "install": 1})
    assert {error["loc"] for error in caught.value.errors()} == {("startcount",), ("install",)}


def test_target_rule() -> None:
    rule = field_rules(CFG, split="train")["install"]
    column = pa.chunked_array([pa.array([0.0, 1.0, 2.0, None, -1.0])])
    assert rule.violations(column).tolist() == [False, False, True, False, True]
    assert rule.first_violation(column) == (2, "expected 0 or 1, got 2")


def test_numbers_without_a_sign_rule_need_only_be_finite_in_float32() -> None:
    rule = FieldRule("score", "number", minimum=-3.4028235677973366e38, maximum=3.4028235677973366e38)
    column = pa.chunked_array([pa.array(np.array([-5.0, np.inf, 1e30], dtype=np.float32))])
    assert rule.violations(column).tolist() == [False, True, False]
    assert rule.expected == "a finite number"


def test_column_messages_name_the_value_as_a_log_holds_it() -> None:
    stamps = parse_timestamps(Path("raw.csv.gz"), "lastStart",
                              pa.chunked_array([pa.array([STAMP, None, "0227-05-01T00:00:00-00:58"])]))
    row, message = RULES["lastStart"].first_violation(stamps)
    assert row == 2
    assert message.startswith("expected an ISO timestamp such as '2019-01-09 21:20:15.943000+00:00' in "
                              "the years 2000-2099, got '0227-05-01T00:58:00")
    levels = pa.chunked_array([pa.array(["US", "D\x00E", "US"]).dictionary_encode()])
    assert RULES["country"].first_violation(levels) == (
        1, "expected text of at most 256 characters without control characters, got 'D\\x00E'")
    assert RULES["country"].request_expected.endswith(", or an integer of at most 15 digits")
    assert RULES["startCount"].request_expected == RULES["startCount"].expected


@pytest.mark.parametrize("config", ["rtb", "talkingdata"])
def test_logs_make_dataset_accepts_today_break_no_rule(tmp_path: Path, config: str) -> None:
    """The rules tighten make-dataset only where stated (ranges, length), not on real logs."""
    from conftest import TALKINGDATA_SAMPLE, small_raw_frame, write_raw

    from rtb.data.make_dataset import make_dataset

    cfg = load_dataset_config(config)
    raw = TALKINGDATA_SAMPLE if config == "talkingdata" else write_raw(
        small_raw_frame(400, seed=3), tmp_path / "training_data.csv.gz")
    table = make_dataset(raw, cfg, "train")
    for name, rule in field_rules(cfg, split="train").items():
        if name in table.column_names:
            assert rule.first_violation(table.column(name)) is None, name


def test_text_rule_reads_sliced_and_large_string_columns() -> None:
    values = ["ok", "x" * (TEXT_MAX_LENGTH + 1), "nul\x00", "ok", "tab\tok", None]
    expected = [False, True, True, False, False, False]
    for kind in (pa.string(), pa.large_string()):
        whole = pa.array(values, type=kind)
        assert text_violations(whole).tolist() == expected
        assert text_violations(whole.slice(3)).tolist() == expected[3:]  # clean: no regex
        assert text_violations(whole.slice(1, 2)).tolist() == expected[1:3]
