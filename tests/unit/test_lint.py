"""ruff and flake8 agree with each other and with the code (configs in pyproject.toml, .flake8)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCES = ["src", "tests", "bench", "airflow"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True)


def test_ruff_passes() -> None:
    result = _run("ruff", "check", *SOURCES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_flake8_passes() -> None:
    result = _run("flake8", *SOURCES)
    assert result.returncode == 0, result.stdout + result.stderr
