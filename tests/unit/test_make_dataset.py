"""make-dataset: a valid log becomes a typed Arrow table; every bad input is one clear line, exit 1,
and the previous artifact stays byte-identical."""

from __future__ import annotations

import gzip
from pathlib import Path

import pandas as pd
import pyarrow.feather as feather
import pytest
from conftest import small_raw_frame, write_raw

from rtb.io_utils import sha256_file


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("rtb: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_valid_train_log_becomes_typed_arrow(raw_project, run_cli) -> None:
    result = run_cli("make-dataset", "--split", "train", "--project-dir", str(raw_project.root))
    assert result.code == 0, result.stderr
    table = feather.read_table(raw_project.interim("train"))
    assert table.num_rows == 600
    frame = table.to_pandas()
    assert str(frame["timestamp"].dtype) == "datetime64[ms, UTC]"
    assert isinstance(frame["campaignId"].dtype, pd.CategoricalDtype)
    assert set(frame["install"].unique()) == {0, 1}
    assert table.schema.metadata[b"rtb.source_sha256"].decode() == sha256_file(
        raw_project.raw_dir / "training_data.csv.gz"
    )
    assert "read 600 rows" in result.log


def test_test_split_has_no_target(raw_project, run_cli) -> None:
    result = run_cli("make-dataset", "--split", "test", "--project-dir", str(raw_project.root))
    assert result.code == 0, result.stderr
    assert "install" not in feather.read_table(raw_project.interim("test")).column_names


def test_extra_columns_are_ignored_and_logged(project, run_cli) -> None:
    frame = small_raw_frame(300).assign(bidFloor=1.5)
    write_raw(frame, project.raw_dir / "training_data.csv.gz")
    result = run_cli("make-dataset", "--split", "train", "--project-dir", str(project.root))
    assert result.code == 0, result.stderr
    assert "ignoring extra column(s) ['bidFloor']" in result.log
    assert "bidFloor" not in feather.read_table(project.interim("train")).column_names


def _corrupt_cases() -> dict[str, tuple]:
    def frame_with(**changes):
        def build(path: Path) -> None:
            frame = small_raw_frame(300)
            for column, (row, value) in changes.items():
                frame[column] = frame[column].astype(object)
                frame.loc[row, column] = value
            write_raw(frame, path)

        return build

    def raw_bytes(data: bytes):
        return lambda path: path.write_bytes(data)

    def gz_text(text: str):
        return lambda path: path.write_bytes(gzip.compress(text.encode()))

    return {
        "missing file": (None, ["file not found"]),
        "empty file": (raw_bytes(b""), ["file is empty"]),
        "not gzip": (raw_bytes(b"id;timestamp\n1;2\n"), ["not gzip-compressed"]),
        "truncated gzip": (
            lambda p: p.write_bytes(gzip.compress(small_raw_frame(300).to_csv(sep=";").encode())[:-400]),
            ["training_data.csv.gz"],
        ),
        "wrong separator": (
            lambda p: write_raw(small_raw_frame(50), p, sep=","),
            ["expected ';'-separated", "looks ','-separated"],
        ),
        "missing column": (
            lambda p: write_raw(small_raw_frame(50).drop(columns=["viewCount"]), p),
            ["missing required column(s) ['viewCount']"],
        ),
        "header only": (gz_text(";".join(small_raw_frame(1).columns) + "\n"), ["no data rows"]),
        "non-numeric count": (
            frame_with(viewCount=(17, "many")),
            ["column 'viewCount' line 19", "expected a number", "'many'"],
        ),
        "unparsable timestamp": (
            frame_with(timestamp=(5, "yesterday")),
            ["column 'timestamp' line 7", "expected an ISO timestamp", "'yesterday'"],
        ),
        "target not binary": (
            frame_with(install=(9, 2)),
            ["column 'install' line 11", "expected 0 or 1, got 2"],
        ),
        "single class": (
            lambda p: write_raw(small_raw_frame(50).assign(install=0), p),
            ["column 'install'", "every row is 0", "both classes"],
        ),
        "duplicate ids": (
            frame_with(id=(4, "0000" + "00000000")),
            ["column 'id'", "duplicated id", "'000000000000'", "expected unique ids"],
        ),
        "duplicate ids of varying length": (
            lambda p: write_raw(
                small_raw_frame(300).assign(id=lambda f: [f"u{i}" for i in range(len(f))]).assign(
                    id=lambda f: f["id"].where(f.index != 7, "u12")
                ),
                p,
            ),
            ["column 'id'", "duplicated id", "'u12'", "appears 2 times"],
        ),
        "infinite count": (frame_with(startCount=(3, "inf")), ["column 'startCount' line 5"]),
        "negative count": (
            frame_with(clickCount=(8, -3)),
            ["column 'clickCount' line 10", "expected a count >= 0", "got -3"],
        ),
    }


@pytest.mark.parametrize("case", list(_corrupt_cases()))
def test_bad_train_input_is_one_clear_line_and_nothing_is_lost(case, raw_project, run_cli) -> None:
    args = ("make-dataset", "--split", "train", "--project-dir", str(raw_project.root))
    assert run_cli(*args).code == 0
    previous = raw_project.interim("train")
    before = sha256_file(previous)
    build, expected = _corrupt_cases()[case]
    raw = raw_project.raw_dir / "training_data.csv.gz"
    raw.unlink()
    if build is not None:
        build(raw)

    result = run_cli(*args)

    assert result.code == 1
    line = error_line(result.stderr)
    assert "training_data.csv.gz" in line
    for fragment in expected:
        assert fragment in line, line
    assert sha256_file(previous) == before
    assert not list(raw_project.interim_dir.glob(".tmp-*"))


def test_test_file_with_a_different_column_set_is_rejected(raw_project, run_cli) -> None:
    other = small_raw_frame(50).drop(columns=["install", "deviceType", "country"])
    write_raw(other, raw_project.raw_dir / "test_data.csv.gz")
    result = run_cli("make-dataset", "--split", "test", "--project-dir", str(raw_project.root))
    assert result.code == 1
    line = error_line(result.stderr)
    assert "test_data.csv.gz" in line and "['country', 'deviceType']" in line


def test_unknown_split_is_rejected(raw_project, run_cli) -> None:
    result = run_cli("make-dataset", "--split", "validation", "--project-dir", str(raw_project.root))
    assert result.code == 1
    assert "expected 'train' or 'test'" in error_line(result.stderr)


def test_timestamps_with_and_without_offset_in_one_file_are_both_utc(project, run_cli) -> None:
    frame = small_raw_frame(300)
    naive = frame["timestamp"].str.replace("+00:00", "", regex=False)
    frame["timestamp"] = naive.where(frame.index % 2 == 0, frame["timestamp"])
    write_raw(frame, project.raw_dir / "training_data.csv.gz")
    result = run_cli("make-dataset", "--split", "train", "--project-dir", str(project.root))
    assert result.code == 0, result.stderr
    stamps = feather.read_table(project.interim("train")).column("timestamp").to_pandas()
    expected = pd.to_datetime(small_raw_frame(300)["timestamp"], utc=True).dt.floor("ms")
    assert (stamps == expected).all()
