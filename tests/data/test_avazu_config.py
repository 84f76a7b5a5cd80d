"""A log we did not design, declared in a config and run: an Avazu-shaped file (every column an
id or a code, the hour written YYMMDDHH) through the builtin `avazu` config, and the
`timestamp_format` key it relies on (strptime patterns, epoch seconds and milliseconds)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pytest
from conftest import small_raw_frame, write_raw

from rtb.data.timestamp_formats import parse_formatted
from rtb.dataset_config import load_dataset_config
from rtb.errors import RtbError
from rtb.models.metrics import probability_metrics

AVAZU = load_dataset_config("avazu")
CODES = ["C1", "banner_pos", "site_category", "app_category", "device_type", "device_conn_type",
         "C15", "C16", "C18"]


def avazu_frame(rows: int, seed: int, days: tuple[str, ...]) -> tuple[pd.DataFrame, pd.Series]:
    """Rows in Avazu's layout (its column names and order, ids as long digit strings, the
    hour as YYMMDDHH) whose clicks depend on the site, the app and the banner position; and
    each row's hour as a UTC timestamp."""
    rng = np.random.default_rng(seed)
    hours = pd.DatetimeIndex([pd.Timestamp(day, tz="UTC") + pd.Timedelta(hours=h)
                              for day in days for h in range(24)])
    when = pd.Series(np.sort(rng.choice(hours, rows)))
    site = rng.integers(0, 40, rows)
    app = rng.integers(0, 60, rows)
    banner = rng.integers(0, 3, rows)
    logit = -1.8 + 0.9 * np.sin(site) + 0.7 * np.cos(app) + 0.5 * (banner == 1)
    frame = pd.DataFrame({
        "id": [str(v) for v in rng.integers(10**18, 9 * 10**18, rows, dtype=np.int64)],
        "click": (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int),
        "hour": when.dt.strftime("%y%m%d%H"),
    })
    for name in ("C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
                 "app_domain", "app_category", "device_id", "device_ip", "device_model",
                 "device_type", "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19",
                 "C20", "C21"):
        frame[name] = [f"{v:x}" for v in rng.integers(0, 30, rows)] if name not in CODES else \
            rng.integers(0, 5, rows)
    frame["site_id"] = [f"s{v:07x}" for v in site]
    frame["app_id"] = [f"a{v:07x}" for v in app]
    frame["banner_pos"] = banner
    frame["device_ip"] = [f"{v:08x}" for v in rng.integers(0, 2000, rows)]
    return frame, when


def _write(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as handle:
        frame.to_csv(handle, index=False)


@pytest.fixture
def avazu_project(tmp_path: Path) -> tuple[Path, pd.Series, np.ndarray]:
    root = tmp_path / "project"
    train, when = avazu_frame(6000, seed=3, days=("2014-10-21", "2014-10-22"))
    test, _ = avazu_frame(1500, seed=4, days=("2014-10-23",))
    _write(train, root / "data" / "raw" / "training_data.csv.gz")
    _write(test.drop(columns=["click"]), root / "data" / "raw" / "test_data.csv.gz")
    return root, when, test["click"].to_numpy()


def test_an_avazu_log_runs_through_its_config(avazu_project, run_cli) -> None:
    root, when, labels = avazu_project
    common = ("--project-dir", str(root), "--dataset-config", "avazu")
    for args in (("make-dataset", "--split", "train"), ("preprocess", "--split", "train"),
                 ("train",), ("make-dataset", "--split", "test"), ("preprocess", "--split", "test"),
                 ("predict",)):
        result = run_cli(*args, *common)
        assert result.code == 0, (args, result.stderr)
        assert "mixes timestamps" not in result.log
    processed = feather.read_table(root / "data" / "processed" / "train_df.arrow")
    stamps = pd.Series(processed.column("hour").to_pandas()).dt.tz_localize("UTC")
    assert sorted(stamps) == sorted(when)  # YYMMDDHH read as the UTC hour it names
    probabilities = np.load(next((root / "data" / "predictions").glob("predictions_*.npy")))
    assert probabilities.shape == labels.shape
    assert probability_metrics(labels, probabilities)["normalized_entropy"] < 0.97


def test_a_value_outside_the_declared_format_names_file_column_line_and_format(
    avazu_project, run_cli
) -> None:
    root, _, _ = avazu_project
    path = root / "data" / "raw" / "training_data.csv.gz"
    frame = pd.read_csv(path, dtype=str)
    frame.loc[41, "hour"] = "2014-10-21 05:00:00"
    _write(frame, path)
    result = run_cli("make-dataset", "--split", "train", "--project-dir", str(root),
                     "--dataset-config", "avazu")
    assert result.code != 0
    assert result.stderr.strip().splitlines()[-1] == (
        "rtb: error: data/raw/training_data.csv.gz: column 'hour' line 43: expected a timestamp in "
        "the format '%y%m%d%H' (the config's timestamp_format) such as '14102109', got "
        "'2014-10-21 05:00:00'")
    assert not (root / "data" / "interim").exists() or not any((root / "data" / "interim").iterdir())


def test_a_log_of_another_format_under_iso_gets_the_error_without_a_misleading_line(
    project, run_cli
) -> None:
    """Before, an undeclared format first logged "timestamps mix UTC offsets and naive values"."""
    frame = small_raw_frame(300, seed=1)
    frame["timestamp"] = frame["timestamp"].astype(str)
    frame.loc[5, "timestamp"] = "14102100"
    write_raw(frame, project.raw_dir / "training_data.csv.gz")
    result = run_cli("make-dataset", "--split", "train", "--project-dir", str(project.root))
    assert result.code != 0
    assert "column 'timestamp' line 7: expected an ISO timestamp" in result.stderr
    assert "mix" not in result.log


@pytest.mark.parametrize(("fmt", "values", "expected"), [
    ("epoch_s", ["1413849600", "1413853200.5", None, ""],
     ["2014-10-21 00:00:00", "2014-10-21 01:00:00.500", None, None]),
    ("epoch_ms", ["1413849600123"], ["2014-10-21 00:00:00.123"]),
    ("%d/%m/%Y %H:%M", ["21/10/2014 09:30"], ["2014-10-21 09:30:00"]),
    ("%Y-%m-%dT%H:%M:%S%z", ["2014-10-21T11:30:00+0200"], ["2014-10-21 09:30:00"]),
])
def test_declared_formats_parse_to_utc(fmt, values, expected) -> None:
    parsed = parse_formatted(Path("log.csv"), "ts", pa.array(values, pa.string()), 2, fmt)
    assert parsed.type == pa.timestamp("ms", tz="UTC")
    want = [None if v is None else pd.Timestamp(v, tz="UTC") for v in expected]
    assert [None if v is None else pd.Timestamp(v) for v in parsed.to_pylist()] == want


def test_a_bad_epoch_value_names_its_line() -> None:
    with pytest.raises(RtbError, match=r"log\.csv: column 'ts' line 4: expected seconds since the "
                                       r"epoch \(the config's timestamp_format\) such as "
                                       r"'1413883815', got '14:00'"):
        parse_formatted(Path("log.csv"), "ts", pa.array(["1", "2", "14:00"]), 2, "epoch_s")


@pytest.mark.parametrize(("extra", "message"), [
    ('timestamp_format: "YYMMDDHH"', r"timestamp_format 'YYMMDDHH': expected a strptime pattern"),
    ('timestamp_format: "%Q"', r"timestamp_format '%Q': "),
    ("timestamp_formats: epoch_s", r"unknown keys \['timestamp_formats'\]"),
])
def test_a_config_with_a_bad_format_fails_when_loaded(tmp_path, extra, message) -> None:
    config = tmp_path / "log.yaml"
    config.write_text("name: log\nseparator: ','\nfiles: {train: a.csv.gz, test: b.csv.gz}\n"
                      "timestamp: t\ntarget: y\ncategorical: [c]\nnumerical: []\n" + extra + "\n")
    with pytest.raises(RtbError, match=rf"{config}: .*{message}"):
        load_dataset_config(config)
