"""Contract of the partitioned raw-log layout (`rtb.partitions`) and of the synthetic stream
`rtb generate --stream` writes into it: one complete partition per hour and per labelled day,
labels that are exactly the day's requests plus `install`, and one planted campaign shift."""

from __future__ import annotations

import gzip
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rtb import partitions
from rtb.data.generate import (
    COLUMNS,
    COUNT_COLUMNS,
    SHIFT_SHARE,
    TEST_COLUMNS,
    StreamSummary,
    generate_stream,
)
from rtb.errors import RtbError

END = datetime(2025, 6, 11, tzinfo=UTC)  # a Wednesday midnight: 5 complete days before it
DAYS = 5
ROWS_PER_DAY = 4_000
SEED = 3


def _read(path: Path) -> pd.DataFrame:
    """Read a partition file as the pipeline should: text stays text, "" is missing."""
    with gzip.open(path, "rt") as handle:
        columns = handle.readline().rstrip("\n").split(";")
    text = {c: "str" for c in columns if c not in COUNT_COLUMNS + ["install"]}
    return pd.read_csv(path, sep=";", dtype=text, keep_default_na=False, na_values=[""])


def _read_partition(partition: Path) -> pd.DataFrame:
    return pd.concat([_read(p) for p in partitions.partition_files(partition)], ignore_index=True)


def _psi(reference: pd.Series, current: pd.Series, top: int = 20, eps: float = 1e-4) -> float:
    """Population stability index over the `top` most frequent values of both plus "other"."""
    both = pd.concat([reference, current])
    keep = set(both.value_counts().index[:top])
    p = reference.where(reference.isin(keep), "<other>").value_counts(normalize=True)
    q = current.where(current.isin(keep), "<other>").value_counts(normalize=True)
    p, q = p.align(q, fill_value=0.0)
    p, q = p.clip(lower=eps), q.clip(lower=eps)
    return float(((q - p) * np.log(q / p)).sum())


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, StreamSummary]:
    raw = tmp_path_factory.mktemp("stream") / "raw"
    return raw, generate_stream(raw, end=END, days=DAYS, rows_per_day=ROWS_PER_DAY, seed=SEED)


@pytest.fixture(scope="module")
def requests(stream: tuple[Path, StreamSummary]) -> dict[datetime, pd.DataFrame]:
    raw, _ = stream
    hours = partitions.hours_between(END - timedelta(days=DAYS), END)
    return {h: _read_partition(partitions.request_partition(raw, h)) for h in hours}


@pytest.fixture(scope="module")
def labelled(stream: tuple[Path, StreamSummary]) -> dict[date, pd.DataFrame]:
    raw, _ = stream
    days = partitions.days_between(END.date() - timedelta(days=DAYS), END.date())
    return {d: _read_partition(partitions.labelled_partition(raw, d)) for d in days}


# ---------------------------------------------------------------------------------------------
# Layout


def test_partition_names_are_hive_style_and_parse_back(tmp_path: Path) -> None:
    hour = datetime(2025, 6, 10, 7, tzinfo=UTC)
    path = partitions.request_partition(tmp_path, hour)
    assert path == tmp_path / "requests" / "date=2025-06-10" / "hour=07"
    assert partitions.parse_partition(path) == ("requests", date(2025, 6, 10), hour)
    day_path = partitions.labelled_partition(tmp_path, date(2025, 6, 10))
    assert day_path == tmp_path / "labelled" / "date=2025-06-10"
    assert partitions.parse_partition(day_path) == ("labelled", date(2025, 6, 10), None)
    # An aware hour in another zone names the same UTC partition.
    from zoneinfo import ZoneInfo

    berlin = hour.astimezone(ZoneInfo("Europe/Berlin"))
    assert partitions.request_partition(tmp_path, berlin) == path
    for start in partitions.hours_between(hour, hour + timedelta(hours=30)):
        key = partitions.parse_partition(partitions.request_partition(Path("data/raw"), start))
        assert key.hour == start and key.day == start.date()


@pytest.mark.parametrize(
    ("moment", "message"),
    [
        (datetime(2025, 6, 10, 7, 30, tzinfo=UTC), "hour boundary"),
        (datetime(2025, 6, 10, 7), "naive"),
    ],
)
def test_request_partition_needs_a_utc_hour_boundary(moment: datetime, message: str) -> None:
    with pytest.raises(RtbError, match=message):
        partitions.request_partition(Path("raw"), moment)


@pytest.mark.parametrize(
    "path",
    ["raw/requests/date=2025-06-10", "raw/requests/date=2025-13-01/hour=01",
     "raw/requests/date=2025-06-10/hour=24", "raw/labelled/day=2025-06-10", "raw/other/date=2025-06-10"],
)
def test_parse_partition_rejects_other_folders(path: str) -> None:
    with pytest.raises(RtbError, match="^raw/"):
        partitions.parse_partition(Path(path))


def test_hours_and_days_between_are_half_open() -> None:
    start = datetime(2025, 6, 9, 22, tzinfo=UTC)
    hours = partitions.hours_between(start, start + timedelta(hours=3))
    assert [h.hour for h in hours] == [22, 23, 0]
    assert partitions.hours_between(start, start) == []
    days = partitions.days_between(date(2025, 6, 30), date(2025, 7, 2))
    assert days == [date(2025, 6, 30), date(2025, 7, 1)]
    assert partitions.parse_hour("2025-06-10T13") == datetime(2025, 6, 10, 13, tzinfo=UTC)
    assert partitions.parse_hour("2025-06-10T15:00+02:00") == datetime(2025, 6, 10, 13, tzinfo=UTC)


def test_incomplete_partition_is_refused(tmp_path: Path) -> None:
    partition = partitions.request_partition(tmp_path, datetime(2025, 6, 10, 7, tzinfo=UTC))
    partition.mkdir(parents=True)
    (partition / "part-00001.csv.gz").write_bytes(b"")
    (partition / "part-00000.csv.gz").write_bytes(b"")
    (partition / ".tmp-part-00002.csv.gz.x").write_bytes(b"")
    assert not partitions.is_complete(partition)
    with pytest.raises(RtbError, match="no _SUCCESS marker: partition is incomplete") as excinfo:
        partitions.partition_files(partition)
    assert str(excinfo.value).startswith(str(partition))
    (partition / "_SUCCESS").touch()
    assert partitions.is_complete(partition)
    names = [p.name for p in partitions.partition_files(partition)]
    assert names == ["part-00000.csv.gz", "part-00001.csv.gz"]
    with pytest.raises(RtbError, match="partition folder not found"):
        partitions.partition_files(tmp_path / "requests" / "date=2025-06-10" / "hour=08")


# ---------------------------------------------------------------------------------------------
# The stream


def test_one_complete_partition_per_hour_and_per_labelled_day(stream: tuple[Path, StreamSummary]) -> None:
    raw, summary = stream
    hours = partitions.hours_between(END - timedelta(days=DAYS), END)
    assert len(hours) == DAYS * 24
    found = sorted(raw.glob("requests/date=*/hour=*"))
    assert found == sorted(partitions.request_partition(raw, h) for h in hours)
    assert summary.requests == [partitions.request_partition(raw, h) for h in hours]
    days = partitions.days_between(END.date() - timedelta(days=DAYS), END.date())
    assert sorted(raw.glob("labelled/date=*")) == [partitions.labelled_partition(raw, d) for d in days]
    assert sorted(p.name for p in raw.iterdir()) == ["labelled", "requests"]
    for partition in found + summary.labelled:
        assert partitions.is_complete(partition)
        assert sorted(p.name for p in partition.iterdir()) == ["_SUCCESS", "part-00000.csv.gz"]


def test_partial_first_day_gets_requests_but_no_labels(tmp_path: Path) -> None:
    end = datetime(2025, 6, 11, 5, tzinfo=UTC)
    summary = generate_stream(tmp_path, end=end, days=2, rows_per_day=500, seed=1)
    assert [partitions.parse_partition(p).hour for p in summary.requests] == partitions.hours_between(
        end - timedelta(days=2), end
    )
    # 2025-06-09 from 05:00 and 2025-06-11 until 05:00 are partial; only 2025-06-10 is whole.
    assert summary.labelled == [partitions.labelled_partition(tmp_path, date(2025, 6, 10))]
    assert summary.shift_day == date(2025, 6, 10)


def test_files_have_the_raw_headers(stream: tuple[Path, StreamSummary]) -> None:
    raw, summary = stream
    for partition, columns in ((summary.requests[0], TEST_COLUMNS), (summary.labelled[0], COLUMNS)):
        (path,) = partitions.partition_files(partition)
        with gzip.open(path, "rt") as handle:
            assert handle.readline() == ";".join(columns) + "\n"


def test_labelled_day_is_exactly_the_days_requests_plus_install(
    requests: dict[datetime, pd.DataFrame], labelled: dict[date, pd.DataFrame]
) -> None:
    for day, labels in labelled.items():
        day_requests = pd.concat(
            [frame for hour, frame in requests.items() if hour.date() == day], ignore_index=True
        )
        assert len(day_requests) > 0
        assert list(labels.columns) == COLUMNS
        pd.testing.assert_frame_equal(labels.drop(columns="install"), day_requests)
        assert set(labels["install"]) <= {0, 1}


def test_install_rate_is_about_the_base_rate(labelled: dict[date, pd.DataFrame]) -> None:
    installs = pd.concat([frame["install"] for frame in labelled.values()])
    assert 0.007 <= installs.mean() <= 0.02


def test_timestamps_are_inside_their_partition(
    requests: dict[datetime, pd.DataFrame], labelled: dict[date, pd.DataFrame]
) -> None:
    for hour, frame in requests.items():
        ts = pd.to_datetime(frame["timestamp"], utc=True)
        assert (ts >= hour).all() and (ts < hour + timedelta(hours=1)).all(), hour
    for day, frame in labelled.items():
        ts = pd.to_datetime(frame["timestamp"], utc=True)
        midnight = pd.Timestamp(day, tz="UTC")
        assert (ts >= midnight).all() and (ts < midnight + pd.Timedelta(days=1)).all(), day


def test_ids_are_unique_over_the_whole_stream(requests: dict[datetime, pd.DataFrame]) -> None:
    ids = pd.concat([frame["id"] for frame in requests.values()])
    assert len(ids) == DAYS * ROWS_PER_DAY
    assert ids.is_unique
    assert ids.str.fullmatch(r"[0-9a-f]{24}").all()


def test_hourly_volume_follows_the_daily_cycle(requests: dict[datetime, pd.DataFrame]) -> None:
    per_hour = pd.Series({hour: len(frame) for hour, frame in requests.items()})
    by_hour_of_day = per_hour.groupby([h.hour for h in per_hour.index]).mean()
    assert by_hour_of_day.idxmax() == 20 and by_hour_of_day.idxmin() == 8
    assert by_hour_of_day.max() > 1.8 * by_hour_of_day.min()


def test_the_shift_day_has_the_planted_campaign_and_no_other_day_does(
    stream: tuple[Path, StreamSummary], labelled: dict[date, pd.DataFrame]
) -> None:
    _, summary = stream
    assert summary.shift_day == END.date() - timedelta(days=3)  # the third-last complete day
    share = {day: (frame["campaignId"] == summary.shift_campaign).mean() for day, frame in labelled.items()}
    assert share[summary.shift_day] == pytest.approx(SHIFT_SHARE, abs=0.03)
    assert all(value == 0 for day, value in share.items() if day != summary.shift_day)
    assert summary.shift_rows == (labelled[summary.shift_day]["campaignId"] == summary.shift_campaign).sum()
    # Against the earlier regular days, the shift day's campaign mix moves well past a PSI of
    # 0.2; a regular day against the earlier regular days stays far below it.
    days = sorted(labelled)
    for day in days[1:]:
        earlier = pd.concat([labelled[d]["campaignId"] for d in days if d < day and d != summary.shift_day])
        psi = _psi(earlier, labelled[day]["campaignId"])
        if day == summary.shift_day:
            assert psi > 0.5, (day, psi)
        else:
            assert psi < 0.1, (day, psi)


def test_later_days_bring_new_campaigns(tmp_path: Path) -> None:
    """Over a 14-day stream the world's new campaigns appear in the later days, growing."""
    end = datetime(2025, 6, 11, tzinfo=UTC)
    summary = generate_stream(tmp_path, end=end, days=14, rows_per_day=3_000, seed=2)
    frames = {partitions.parse_partition(p).day: _read_partition(p) for p in summary.labelled}
    days = sorted(frames)
    first_week = set(pd.concat([frames[d]["campaignId"] for d in days[:6]]))
    unseen = []
    for day in days[7:]:
        campaign = frames[day]["campaignId"]
        unseen.append((~campaign.isin(first_week) & (campaign != summary.shift_campaign)).mean())
    assert unseen[-1] > 0.03
    assert unseen[-1] > unseen[0] + 0.01


def test_same_seed_and_end_give_the_same_bytes(tmp_path: Path) -> None:
    kwargs = {"end": datetime(2025, 6, 11, tzinfo=UTC), "days": 1, "rows_per_day": 2_000, "seed": 4}
    first = generate_stream(tmp_path / "a", **kwargs)
    second = generate_stream(tmp_path / "b", **kwargs)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert len(files) == 2 * (24 + 1)  # a file and a marker per hour and for the day
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    assert first.shift_campaign == second.shift_campaign
    other = generate_stream(tmp_path / "c", **{**kwargs, "seed": 5})
    assert (other.requests[0] / "part-00000.csv.gz").read_bytes() != (
        first.requests[0] / "part-00000.csv.gz"
    ).read_bytes()


def test_refuses_to_overwrite_an_existing_partition(tmp_path: Path) -> None:
    end = datetime(2025, 6, 11, tzinfo=UTC)
    existing = partitions.request_partition(tmp_path, end - timedelta(hours=1))
    existing.mkdir(parents=True)
    with pytest.raises(RtbError, match=r"hour=23: partition already exists.*nothing was written"):
        generate_stream(tmp_path, end=end, days=1, rows_per_day=500)
    assert list(tmp_path.rglob("*.csv.gz")) == [] and list(tmp_path.rglob("_SUCCESS")) == []
    assert sorted(tmp_path.rglob("*")) == sorted([existing, existing.parent, existing.parent.parent])


def test_an_earlier_stream_is_not_overwritten_by_a_later_one(tmp_path: Path) -> None:
    end = datetime(2025, 6, 11, tzinfo=UTC)
    generate_stream(tmp_path, end=end, days=1, rows_per_day=500)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(RtbError, match="already exists"):
        generate_stream(tmp_path, end=end + timedelta(hours=1), days=1, rows_per_day=500, seed=9)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"days": 0}, "^days: expected a positive integer"),
        ({"rows_per_day": -1}, "^rows_per_day: expected a positive integer"),
        ({"shift_day": date(2020, 1, 1)}, "^shift_day: expected a day of the stream"),
        ({"end": datetime(2025, 6, 11, 0, 30, tzinfo=UTC)}, "^end: expected a UTC hour boundary"),
    ],
)
def test_rejects_bad_arguments_before_writing(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"end": datetime(2025, 6, 11, tzinfo=UTC), "days": 1, "rows_per_day": 100, **kwargs}
    with pytest.raises(RtbError, match=message):
        generate_stream(tmp_path / "raw", **args)
    assert not (tmp_path / "raw").exists()


def test_cli_generate_stream(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "raw"
    result = run_cli(
        "generate", "--stream", "--out", str(out), "--days", "2", "--end", "2025-06-11T00:00Z",
        "--rows-per-day", "600", "--shift-day", "2025-06-09", "--seed", "1",
    )
    assert result.code == 0, result.stderr
    assert len(list(out.glob("requests/date=*/hour=*/_SUCCESS"))) == 48
    assert sorted(p.parent.name for p in out.glob("labelled/date=*/_SUCCESS")) == [
        "date=2025-06-09", "date=2025-06-10"
    ]
    assert "wrote 48 request partitions (1200 rows" in result.log
    assert "shift on 2025-06-09" in result.log
    assert not (out / "training_data.csv.gz").exists()

    again = run_cli("generate", "--stream", "--out", str(out), "--days", "2", "--end", "2025-06-11T00:00Z")
    assert again.code == 1
    assert again.stderr.startswith("rtb: error: ") and "partition already exists" in again.stderr
    assert again.stderr.count("\n") == 1

    bad = run_cli("generate", "--stream", "--out", str(tmp_path / "x"), "--end", "2025-06-11T00:30")
    assert bad.code == 1 and "--end: expected a UTC hour boundary" in bad.stderr


def test_cli_default_end_is_the_current_utc_hour(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "raw"
    before = partitions.floor_hour(datetime.now(UTC))
    result = run_cli("generate", "--stream", "--out", str(out), "--days", "1", "--rows-per-day", "240")
    after = partitions.floor_hour(datetime.now(UTC))
    assert result.code == 0, result.stderr
    last = max(partitions.parse_partition(p.parent).hour for p in out.glob("requests/*/*/_SUCCESS"))
    assert last + timedelta(hours=1) in (before, after)  # the running hour has no partition
