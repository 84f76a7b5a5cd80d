"""Shared fixtures: project folders, small raw RTB logs, and a way to run the real CLI in-process."""

from __future__ import annotations

import gzip
import io
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rtb.config import ProjectPaths

REPO_ROOT = Path(__file__).resolve().parents[1]
RAW_COLUMNS = (
    "id;timestamp;campaignId;platform;softwareVersion;sourceGameId;country;startCount;viewCount;"
    "clickCount;installCount;lastStart;startCount1d;startCount7d;connectionType;deviceType;install"
).split(";")


def small_raw_frame(rows: int = 400, seed: int = 0, *, start: str = "2019-01-01") -> pd.DataFrame:
    """A valid raw RTB frame with a learnable signal, independent of the generator under test."""
    rng = np.random.default_rng(seed)
    stamp = pd.Timestamp(start, tz="UTC") + pd.to_timedelta(
        np.sort(rng.uniform(0, 7 * 86400, rows)), unit="s"
    )
    last = stamp - pd.to_timedelta(rng.exponential(30, rows), unit="h")
    campaign = rng.choice([f"c{i:03d}" for i in range(20)], rows)
    views = rng.poisson(5, rows)
    logit = -3.5 + 1.5 * np.isin(campaign, ["c001", "c002", "c003"]) + 0.1 * views
    install = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(int)
    frame = pd.DataFrame(
        {
            "id": [f"{seed:04x}{i:08x}" for i in range(rows)],
            "timestamp": stamp.strftime("%Y-%m-%d %H:%M:%S.%f+00:00"),
            "campaignId": campaign,
            "platform": rng.choice(["ios", "android"], rows),
            "softwareVersion": rng.choice(["11.4.1", "12.1", "9.0"], rows),
            "sourceGameId": rng.integers(1000, 1050, rows).astype(str),
            "country": rng.choice(["US", "GB", "DE", None], rows, p=[0.5, 0.2, 0.25, 0.05]),
            "startCount": rng.poisson(20, rows),
            "viewCount": views,
            "clickCount": rng.poisson(1, rows),
            "installCount": rng.poisson(0.2, rows),
            "lastStart": np.where(
                rng.random(rows) < 0.05, None, last.strftime("%Y-%m-%d %H:%M:%S.%f+00:00")
            ),
            "startCount1d": rng.poisson(2, rows),
            "startCount7d": rng.poisson(8, rows),
            "connectionType": rng.choice(["wifi", "cellular"], rows),
            "deviceType": rng.choice(["iPhone8,1", "SM-G950F", "Pixel 3", None], rows),
            "install": install,
        }
    )
    return frame[RAW_COLUMNS]


def write_raw(frame: pd.DataFrame, path: Path, *, sep: str = ";") -> Path:
    """Write a raw frame the way the real logs come: separator, gzip, no index."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    frame.to_csv(buffer, sep=sep, index=False)
    with gzip.open(path, "wt") as handle:
        handle.write(buffer.getvalue())
    return path


@pytest.fixture(autouse=True, scope="session")
def _single_threaded_blas():
    """The same BLAS setting `rtb` uses (see rtb.cli.main): small solves, no thread spinning."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


@dataclass
class CliResult:
    code: int
    stderr: str
    log: str
    stdout: str = ""


@pytest.fixture
def run_cli(
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> Callable:
    """Run `rtb ...` through the real entry point in-process: exit code, stderr, log lines."""
    from rtb.cli import main

    def _run(*args: str) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["rtb", *args])
        capsys.readouterr()
        caplog.clear()
        with caplog.at_level(logging.INFO):
            try:
                main()
                code = 0
            except SystemExit as exc:
                code = int(exc.code or 0)
        captured = capsys.readouterr()
        return CliResult(code, captured.err, caplog.text, captured.out)

    return _run


@pytest.fixture
def project(tmp_path: Path) -> ProjectPaths:
    """An empty project folder with the raw-data folder in place."""
    paths = ProjectPaths(tmp_path / "project")
    paths.raw_dir.mkdir(parents=True)
    return paths


def write_small_logs(raw_dir: Path) -> None:
    """A small valid train log (600 rows) and test log (200 rows, the week after) in `raw_dir`."""
    write_raw(small_raw_frame(600, seed=1), raw_dir / "training_data.csv.gz")
    test = small_raw_frame(200, seed=2, start="2019-01-08").drop(columns=["install"])
    write_raw(test, raw_dir / "test_data.csv.gz")


def prepared_project(root: Path) -> ProjectPaths:
    """A project at `root` whose small logs went through make-dataset and preprocess (both
    splits, in-process): ready for `rtb train` and, once trained, `rtb predict`."""
    from rtb.data.make_dataset import run_make_dataset
    from rtb.data.preprocessing import run_preprocess
    from rtb.dataset_config import load_dataset_config

    cfg, paths = load_dataset_config("rtb"), ProjectPaths(root)
    write_small_logs(paths.raw_dir)
    for split in ("train", "test"):
        run_make_dataset(paths, split, cfg)
        run_preprocess(paths, split, cfg)
    return paths


@pytest.fixture
def raw_project(project: ProjectPaths) -> ProjectPaths:
    """A project whose data/raw holds a small valid train and test log."""
    write_small_logs(project.raw_dir)
    return project


# The public TalkingData click sample, shipped with the tests (see its SOURCE.md); gzip CSV,
# which pandas reads directly.
TALKINGDATA_SAMPLE: Path = REPO_ROOT / "tests" / "data" / "talkingdata" / "train_sample.csv.gz"


def rewrite_hand_over(paths: ProjectPaths, split: str, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    """Change the processed hand-over that training and prediction read (`<split>_df.arrow`),
    keeping its typed layout: how a test puts different data in front of those stages."""
    import pyarrow as pa
    import pyarrow.feather as feather

    path = paths.processed_arrow(split)
    frame = edit(feather.read_table(path).to_pandas())
    feather.write_feather(pa.Table.from_pandas(frame, preserve_index=False), path,
                          compression="uncompressed")
