"""Where every stage reads and writes, derived from one project directory.

The project directory is the folder that holds `data/`, `models/` and `reports/`. Inside the
job image it is a bind mount, on a laptop it is the checkout; `RTB_PROJECT_DIR` or
`--project-dir` picks it. Nothing here touches the disk at import.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

from rtb.errors import RtbError
from rtb.io_utils import TMP_PREFIX

PROJECT_DIR_ENV = "RTB_PROJECT_DIR"
DATASET_CONFIG_ENV = "RTB_DATASET_CONFIG"
VERSION_FORMAT = "%Y%m%dT%H%M%SZ"
VERSION_PATTERN = r"\d{8}T\d{6}Z"
MODEL_NAME = re.compile(rf"^pipeline_({VERSION_PATTERN})\.pkl$")
CHAMPION_FILE = "champion.yaml"
PROMOTION_LOCK_FILE = ".promotion.lock"


def default_project_dir() -> Path:
    """`RTB_PROJECT_DIR` if set, else the current directory."""
    return Path(os.environ.get(PROJECT_DIR_ENV, ".")).resolve()


@dataclass(frozen=True)
class ProjectPaths:
    """All artifact locations and names under one project root: the one place that knows how
    a split, a model version or a prediction set maps to a file."""

    root: Path

    @property
    def raw_dir(self) -> Path:
        return self.root / "data" / "raw"

    @property
    def interim_dir(self) -> Path:
        return self.root / "data" / "interim"

    @property
    def processed_dir(self) -> Path:
        return self.root / "data" / "processed"

    @property
    def predictions_dir(self) -> Path:
        return self.root / "data" / "predictions"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    def interim(self, split: str) -> Path:
        return self.interim_dir / f"{split}.arrow"

    def processed(self, split: str) -> Path:
        """The processed CSV: the export users read (stages hand over `processed_arrow`)."""
        return self.processed_dir / f"{split}_df.csv"

    def processed_arrow(self, split: str) -> Path:
        """The typed hand-over from preprocess to train and predict."""
        return self.processed_dir / f"{split}_df.arrow"

    def model(self, version: str) -> Path:
        return self.models_dir / f"pipeline_{version}.pkl"

    def scoring_tables(self, version: str) -> Path:
        """The model's scoring tables, written beside it when it tabulates (`rtb predict`
        scores through them without unpickling the sklearn pipeline)."""
        return self.models_dir / f"scoring_tables_{version}.pkl"

    def report(self, version: str) -> Path:
        return self.reports_dir / f"report_{version}.yaml"

    def report_for_model(self, model_path: Path) -> Path:
        """The training report that records a model file's sha256."""
        return self.report(version_of(model_path))

    def report_plot(self, version: str, kind: str) -> Path:
        """A picture of a training run, beside its report: `report_<version>_<kind>.png`."""
        return self.reports_dir / f"report_{version}_{kind}.png"

    def predictions(self, version: str, suffix: str) -> Path:
        """One file of a prediction set: `.npy` (probabilities), `.csv` (ids) or `.yaml`."""
        return self.predictions_dir / f"predictions_{version}{suffix}"

    def prediction_set(self, partition: str) -> Path:
        """The one prediction set of a request partition (a folder replaced as a whole)."""
        return self.predictions_dir / partition

    def raw_partition(self, partition: str) -> Path:
        return self.raw_dir / partition

    def partition_copies(self, partition: str) -> list[Path]:
        """The files derived from one raw partition that hold its rows (interim, processed)."""
        return [self.interim(partition), self.processed_arrow(partition), self.processed(partition)]

    def profile(self, version: str) -> Path:
        """The reference profile of a model version's training window (what drift is measured from)."""
        return self.reports_dir / f"profile_{version}.yaml"

    @property
    def drift_dir(self) -> Path:
        return self.reports_dir / "drift"

    def drift_report(self, name: str) -> Path:
        """The drift of one request partition (or split) from the champion: replaced on a re-run."""
        return self.drift_dir / f"{name}.yaml"

    def retrain_request(self, version: str) -> Path:
        """The record that a retrain was requested while `version` was the champion (once each)."""
        return self.drift_dir / f"retrain_requested_{version}.yaml"

    def quality_report(self, day: date) -> Path:
        """What the probabilities served on one UTC day were worth once its labels arrived."""
        return self.reports_dir / "quality" / f"date={day.isoformat()}.yaml"

    @property
    def champion_pointer(self) -> Path:
        """A small YAML naming the promoted model; swapped atomically on promotion."""
        return self.models_dir / CHAMPION_FILE

    @property
    def promotion_lock(self) -> Path:
        return self.models_dir / PROMOTION_LOCK_FILE


def version_of(model_path: Path) -> str:
    """The version in a model file's name, or a one-line error for any other name."""
    match = MODEL_NAME.match(Path(model_path).name)
    if not match:
        raise RtbError(f"{model_path}: expected a model file named pipeline_<YYYYMMDDTHHMMSSZ>.pkl")
    return match.group(1)


def new_version(now: datetime | None = None) -> str:
    """A UTC timestamp version such as 20260101T060000Z."""
    return (now or datetime.now(UTC)).strftime(VERSION_FORMAT)


def version_time(version: str) -> datetime | None:
    """When a version was made (versions are UTC timestamps), or None for another name."""
    try:
        return datetime.strptime(version, VERSION_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


@contextlib.contextmanager
def claimed_version(folder: Path, taken: Callable[[str], bool]) -> Iterator[str]:
    """A new version for which `taken(version)` is false and that no other writer in `folder`
    holds, for as long as the block runs.

    Versions have 1 s resolution: two runs started in the same second (a scheduled and a
    manual predict run of one file) would both find a version free and the second would fail
    when it writes. The claim is a file created exclusively in `folder` (a `.tmp-` name, so
    no reader looks at it) and locked; the block's end removes it, and a dead process's
    claim is cleared like its other leftovers (`rtb.io_utils.remove_stale_tmp_files`).
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RtbError(f"{folder}: cannot create output folder ({exc.strerror})") from exc
    while True:
        version = new_version()
        claim = folder / f"{TMP_PREFIX}version-{version}"
        if not taken(version):
            try:
                handle = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                pass
            except OSError as exc:
                raise RtbError(f"{folder}: cannot write ({exc.strerror})") from exc
        time.sleep(0.5)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield version
    finally:
        os.close(handle)
        claim.unlink(missing_ok=True)
