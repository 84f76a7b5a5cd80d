"""Contract of the synthetic RTB logs: the schema and formats the pipeline reads, and the
properties (missing values, unseen test categories, a learnable signal) that make the
generated data a fair stand-in for the real logs."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rtb.data.generate import COUNT_COLUMNS, generate_frames, generate_raw
from rtb.errors import RtbError

ROWS_TRAIN = 20_000
ROWS_TEST = 8_000
SEED = 11
HEADER_TRAIN = (
    "id;timestamp;campaignId;platform;softwareVersion;sourceGameId;country;startCount;"
    "viewCount;clickCount;installCount;lastStart;startCount1d;startCount7d;connectionType;"
    "deviceType;install"
)
HEADER_TEST = HEADER_TRAIN.removesuffix(";install")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{6}\+00:00$")


def _read(path: Path) -> pd.DataFrame:
    """Read as the pipeline should: text stays text, only empty fields are missing."""
    with gzip.open(path, "rt") as handle:
        columns = handle.readline().rstrip("\n").split(";")
    text_columns = {c: "str" for c in columns if c not in COUNT_COLUMNS + ["install"]}
    return pd.read_csv(path, sep=";", dtype=text_columns, keep_default_na=False, na_values=[""])


@pytest.fixture(scope="module")
def raw_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("raw")
    return generate_raw(out, rows_train=ROWS_TRAIN, rows_test=ROWS_TEST, seed=SEED)


@pytest.fixture(scope="module")
def raw(raw_paths: tuple[Path, Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    return _read(raw_paths[0]), _read(raw_paths[1])


@pytest.fixture(scope="module")
def frames() -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray]:
    return generate_frames(ROWS_TRAIN, ROWS_TEST, SEED)


def test_files_are_named_gzip_csv_with_exact_header(raw_paths: tuple[Path, Path]) -> None:
    train_path, test_path = raw_paths
    assert (train_path.name, test_path.name) == ("training_data.csv.gz", "test_data.csv.gz")
    for path, header, n_rows in (
        (train_path, HEADER_TRAIN, ROWS_TRAIN),
        (test_path, HEADER_TEST, ROWS_TEST),
    ):
        assert path.read_bytes()[:2] == b"\x1f\x8b"
        with gzip.open(path, "rt", newline="") as handle:
            lines = handle.read().split("\n")
        assert lines[0] == header
        assert lines[-1] == ""  # the file ends with a newline
        body = lines[1:-1]
        assert len(body) == n_rows
        n_fields = header.count(";") + 1
        assert all(line.count(";") == n_fields - 1 for line in body)
        assert not any('"' in line for line in body)


def test_test_file_has_no_target(raw: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    train, test = raw
    assert "install" in train.columns
    assert list(test.columns) == HEADER_TEST.split(";")


def test_ids_are_unique_across_both_files(raw: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    train, test = raw
    ids = pd.concat([train["id"], test["id"]])
    assert ids.notna().all()
    assert ids.is_unique
    assert ids.str.fullmatch(r"[0-9a-f]{24}").all()


def test_timestamps_have_log_format_and_test_window_follows_train(
    raw: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    train, test = raw
    for frame in (train, test):
        assert frame["timestamp"].str.match(TIMESTAMP).all()
        last = frame["lastStart"].dropna()
        assert last.str.match(TIMESTAMP).all()
    train_ts = pd.to_datetime(train["timestamp"], utc=True)
    test_ts = pd.to_datetime(test["timestamp"], utc=True)
    assert train_ts.min() >= pd.Timestamp("2019-01-01", tz="UTC")
    assert train_ts.max() < test_ts.min()
    assert (train_ts.max() - train_ts.min()) > pd.Timedelta(days=10)


def test_last_start_is_never_after_the_request(raw: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    for frame in raw:
        has_last = frame["lastStart"].notna()
        ts = pd.to_datetime(frame.loc[has_last, "timestamp"], utc=True)
        last = pd.to_datetime(frame.loc[has_last, "lastStart"], utc=True)
        assert (last <= ts).all()


def test_base_rate_is_about_one_percent(raw: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    train, _ = raw
    assert set(train["install"].unique()) <= {0, 1}
    assert 0.008 <= train["install"].mean() <= 0.018


@pytest.mark.parametrize(
    ("column", "low", "high"),
    [("country", 0.001, 0.02), ("deviceType", 0.0005, 0.01), ("lastStart", 0.003, 0.03)],
)
def test_missing_values_are_present_but_rare(
    raw: tuple[pd.DataFrame, pd.DataFrame], column: str, low: float, high: float
) -> None:
    share = pd.concat([raw[0][column], raw[1][column]]).isna().mean()
    assert low <= share <= high


def test_categorical_values_look_like_the_real_logs(
    raw: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    train, _ = raw
    assert set(train["platform"]) == {"ios", "android"}
    assert 0.35 <= (train["platform"] == "ios").mean() <= 0.55
    assert set(train["connectionType"]) <= {"wifi", "cellular", "unknown"}
    assert train["country"].dropna().str.fullmatch(r"[A-Z]{2}").all()
    assert train["country"].value_counts().index[0] == "US"
    assert train["sourceGameId"].str.fullmatch(r"\d+").all()
    assert train["campaignId"].str.fullmatch(r"[0-9a-f]{24}").all()
    assert train["softwareVersion"].str.fullmatch(r"\d+(\.\d+){0,2}").all()
    assert train["campaignId"].nunique() > 1000  # Zipf: many campaigns, a few dominant


def test_history_counts_are_consistent(raw: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    for frame in raw:
        counts = frame[COUNT_COLUMNS]
        assert (counts >= 0).all().all()
        assert (frame["startCount"] >= frame["startCount7d"]).all()
        assert (frame["startCount7d"] >= frame["startCount1d"]).all()
        assert (frame["clickCount"] <= frame["viewCount"]).all()
        assert (frame["installCount"] <= frame["clickCount"]).all()
        assert frame["startCount"].quantile(0.99) > 10 * frame["startCount"].median()


def test_some_test_campaigns_never_appear_in_train(
    raw: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    train, test = raw
    unseen = ~test["campaignId"].isin(set(train["campaignId"]))
    assert 0.03 <= unseen.mean() <= 0.20


def test_frames_hold_exactly_what_the_files_hold(
    raw: tuple[pd.DataFrame, pd.DataFrame],
    frames: tuple[pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray],
) -> None:
    train, test, p_train, p_test = frames
    pd.testing.assert_frame_equal(raw[0], train, check_dtype=False)
    pd.testing.assert_frame_equal(raw[1], test, check_dtype=False)
    assert p_train.shape == (ROWS_TRAIN,) and p_test.shape == (ROWS_TEST,)
    assert ((p_train > 0) & (p_train < 1)).all() and ((p_test > 0) & (p_test < 1)).all()


def test_same_seed_gives_same_data(
    frames: tuple[pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray],
) -> None:
    again = generate_frames(ROWS_TRAIN, ROWS_TEST, SEED)
    for first, second in zip(frames[:2], again[:2], strict=True):
        pd.testing.assert_frame_equal(first, second)
    np.testing.assert_array_equal(frames[2], again[2])
    np.testing.assert_array_equal(frames[3], again[3])


def test_same_seed_gives_same_file_bytes(tmp_path: Path) -> None:
    first = generate_raw(tmp_path / "a", rows_train=3_000, rows_test=1_000, seed=5)
    second = generate_raw(tmp_path / "b", rows_train=3_000, rows_test=1_000, seed=5)
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_other_seed_gives_other_data(
    frames: tuple[pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray],
) -> None:
    other_train, _, other_p, _ = generate_frames(ROWS_TRAIN, ROWS_TEST, SEED + 1)
    assert not other_train["campaignId"].equals(frames[0]["campaignId"])
    assert not np.array_equal(other_p, frames[2])


def test_planted_signal_is_learnable(
    frames: tuple[pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray],
) -> None:
    train, _, p_train, _ = frames
    y = train["install"].to_numpy()
    top = p_train >= np.quantile(p_train, 0.9)
    bottom = p_train <= np.quantile(p_train, 0.5)
    assert y[top].mean() > 3 * y[bottom].mean()

    def log_loss(p: np.ndarray) -> float:
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))

    assert log_loss(p_train) < 0.97 * log_loss(np.full(len(y), y.mean()))


@pytest.mark.parametrize(
    ("rows_train", "rows_test", "name"),
    [(0, 10, "rows_train"), (10, 0, "rows_test"), (-5, 10, "rows_train")],
)
def test_rejects_non_positive_row_counts(
    tmp_path: Path, rows_train: int, rows_test: int, name: str
) -> None:
    with pytest.raises(RtbError, match=f"^{name}: expected a positive integer"):
        generate_raw(tmp_path, rows_train=rows_train, rows_test=rows_test)
    with pytest.raises(RtbError, match=f"^{name}: expected a positive integer"):
        generate_frames(rows_train, rows_test)
    assert not list(tmp_path.iterdir())


def test_refuses_to_overwrite_existing_files(tmp_path: Path) -> None:
    train_path, test_path = generate_raw(tmp_path, rows_train=500, rows_test=200, seed=1)
    before = train_path.read_bytes(), test_path.read_bytes()
    with pytest.raises(RtbError, match="already exists"):
        generate_raw(tmp_path, rows_train=500, rows_test=200, seed=2)
    assert (train_path.read_bytes(), test_path.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [test_path.name, train_path.name]


def test_unusable_output_folder_is_a_one_line_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(RtbError, match="not-a-folder") as excinfo:
        generate_raw(blocker / "out", rows_train=100, rows_test=100)
    assert "\n" not in str(excinfo.value)


def test_cli_generate_writes_both_files(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from rtb.cli import app

    result = CliRunner().invoke(
        app, ["generate", "--out", str(tmp_path), "--rows-train", "300", "--rows-test", "100"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "training_data.csv.gz").exists()
    assert (tmp_path / "test_data.csv.gz").exists()
