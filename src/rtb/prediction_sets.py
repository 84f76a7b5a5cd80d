"""What a prediction set is on disk, and where the sets of a run are found.

`rtb predict` writes each result as three files: the probabilities (`.npy`), the ids with
their probabilities (`.csv`) and a sidecar (`.yaml`, written last: a set whose sidecar exists
is complete). In single-file mode the files are `data/predictions/predictions_<version>.*`;
a request partition has one set, the folder `data/predictions/<partition>/`, replaced as a
whole on a re-run. The monitor and the publisher read sets; this module is the one place that
knows their names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv

from rtb.config import ProjectPaths
from rtb.io_utils import read_yaml

STEM = "predictions"
SUFFIXES = (".npy", ".csv", ".yaml")  # the .yaml sidecar is written last: it marks a complete set


@dataclass(frozen=True)
class PredictionSet:
    """The three files of one set, by where they live."""

    probabilities: Path
    scored_ids: Path
    sidecar: Path

    @classmethod
    def in_folder(cls, folder: Path) -> PredictionSet:
        """A partition's set: `<folder>/predictions.{npy,csv,yaml}`."""
        return cls(*(folder / f"{STEM}{suffix}" for suffix in SUFFIXES))

    @classmethod
    def versioned(cls, paths: ProjectPaths, version: str) -> PredictionSet:
        """A single-file mode set: `data/predictions/predictions_<version>.{npy,csv,yaml}`."""
        return cls(*(paths.predictions(version, suffix) for suffix in SUFFIXES))

    @property
    def files(self) -> list[Path]:
        return [self.probabilities, self.scored_ids, self.sidecar]

    @property
    def complete(self) -> bool:
        return self.sidecar.is_file()

    def read_sidecar(self) -> dict:
        return read_yaml(self.sidecar)

    def read_scored(self) -> pa.Table:
        """The `.csv` as a table of `id` (string) and `probability` (float64)."""
        return pcsv.read_csv(self.scored_ids, convert_options=pcsv.ConvertOptions(
            column_types={"id": pa.string(), "probability": pa.float64()}))

    @property
    def model_version(self) -> str:
        """The version of the model that scored the set, from its sidecar."""
        return str((self.read_sidecar().get("model") or {}).get("version"))


def partition_set(paths: ProjectPaths, name: str) -> PredictionSet | None:
    """The complete prediction set of a request partition, or None."""
    found = PredictionSet.in_folder(paths.prediction_set(name))
    return found if found.complete else None


def latest_test_set(paths: ProjectPaths, model_version: str | None = None) -> PredictionSet | None:
    """Single-file mode: the newest complete `predictions_<v>` set (of the test hand-over), made
    by `model_version` if given; None if there is none."""
    for sidecar in sorted(paths.predictions_dir.glob(f"{STEM}_*{SUFFIXES[2]}"), reverse=True):
        payload = read_yaml(sidecar)
        if payload.get("partition") is not None:
            continue
        if model_version is None or (payload.get("model") or {}).get("version") == model_version:
            return PredictionSet(*(sidecar.with_suffix(suffix) for suffix in SUFFIXES))
    return None
