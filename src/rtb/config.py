"""Where every stage reads and writes, derived from one project directory.

The project directory is the folder that holds `data/`, `models/` and `reports/`. Inside the
job image it is a bind mount, on a laptop it is the checkout; `RTB_PROJECT_DIR` or
`--project-dir` picks it. Nothing here touches the disk at import.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

PROJECT_DIR_ENV = "RTB_PROJECT_DIR"
DATASET_CONFIG_ENV = "RTB_DATASET_CONFIG"
VERSION_FORMAT = "%Y%m%dT%H%M%SZ"
SPLITS = ("train", "test")


def default_project_dir() -> Path:
    """`RTB_PROJECT_DIR` if set, else the current directory."""
    return Path(os.environ.get(PROJECT_DIR_ENV, ".")).resolve()


@dataclass(frozen=True)
class ProjectPaths:
    """All artifact locations under one project root."""

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
        return self.processed_dir / f"{split}_df.csv"

    def model(self, version: str) -> Path:
        return self.models_dir / f"pipeline_{version}.pkl"

    def report(self, version: str) -> Path:
        return self.reports_dir / f"report_{version}.yaml"

    @property
    def champion_pointer(self) -> Path:
        """A small YAML naming the promoted model; swapped atomically on promotion."""
        return self.models_dir / "champion.yaml"


def new_version(now: datetime | None = None) -> str:
    """A UTC timestamp version such as 20260101T060000Z."""
    return (now or datetime.now(UTC)).strftime(VERSION_FORMAT)


def claim_version(taken: Callable[[str], bool]) -> str:
    """A new version for which `taken(version)` is false (versions have 1 s resolution)."""
    while True:
        version = new_version()
        if not taken(version):
            return version
        time.sleep(0.5)
