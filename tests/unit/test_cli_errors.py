"""How `rtb` ends and what its log lines look like, from real `rtb` subprocesses.

A user error is one `rtb: error:` line that names the file relative to the project folder
(data/raw/..., as the README does, not the job container's /project/data/raw/...) and comes
without a traceback; any other exception is a bug and keeps its traceback. Under Airflow
(RTB_LOG_FORMAT=airflow) each log line starts with its level and then the message, since the
task log adds the time itself (tests/system/test_job_container.py: how the operator reads it).
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
from pathlib import Path

import pytest
from faults.faultkit import rtb_command

NOT_GZIP = b"this is not a gzip file\n" * 10
PLAIN_LINE = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} (INFO|WARNING|ERROR) rtb[\w.]*: \S")
AIRFLOW_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S")
A_TIME = re.compile(r"\d{2}:\d{2}:\d{2}")


def _rtb(*args: str, cwd: Path, env: dict[str, str] | None = None, **popen) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("RTB_PROJECT_DIR", "RTB_LOG_FORMAT")}
    return subprocess.run(rtb_command(*args), cwd=cwd, env=environment | (env or {}), capture_output=True,
                          text=True, timeout=120, **popen)


@pytest.fixture
def corrupt_project(tmp_path: Path) -> Path:
    """A project folder whose raw training file is not gzip, and a folder elsewhere to run in."""
    root = tmp_path / "my project"
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "training_data.csv.gz").write_bytes(NOT_GZIP)
    (tmp_path / "elsewhere").mkdir()
    return root


def _the_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rtb: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("given_as", ["--project-dir X", "--project-dir=X", "RTB_PROJECT_DIR", "a symlink"])
def test_a_user_error_names_the_file_relative_to_the_project_folder(corrupt_project, given_as) -> None:
    root, elsewhere = corrupt_project, corrupt_project.parent / "elsewhere"
    if given_as == "a symlink":
        (elsewhere / "link").symlink_to(root)
        root = elsewhere / "link"
    args, env = {
        "--project-dir X": (["--project-dir", str(root)], {}),
        "--project-dir=X": ([f"--project-dir={root}"], {}),
        "RTB_PROJECT_DIR": ([], {"RTB_PROJECT_DIR": str(root)}),
        "a symlink": (["--project-dir", str(root)], {}),
    }[given_as]

    line = _the_error_line(_rtb("make-dataset", "--split", "train", *args, cwd=elsewhere, env=env))

    assert line.startswith("rtb: error: data/raw/training_data.csv.gz: "), line
    assert str(corrupt_project) not in line and str(elsewhere) not in line, line


def test_the_error_line_is_the_same_under_airflow(corrupt_project) -> None:
    """The job container's project folder is /project: the user's folder is named the same way."""
    plain = _rtb("make-dataset", "--project-dir", str(corrupt_project), cwd=corrupt_project)
    airflow = _rtb("make-dataset", "--project-dir", str(corrupt_project), cwd=corrupt_project,
                   env={"RTB_LOG_FORMAT": "airflow"})
    assert _the_error_line(airflow) == _the_error_line(plain)


def test_log_lines_say_when_and_where_in_a_terminal_and_start_with_the_level_under_airflow(
    tmp_path: Path,
) -> None:
    args = ("plan", "predict", "--end", "2026-01-01T00:00:00+00:00", "--project-dir", str(tmp_path))
    plain = _rtb(*args, cwd=tmp_path)
    airflow = _rtb(*args, cwd=tmp_path, env={"RTB_LOG_FORMAT": "airflow"})

    for result in (plain, airflow):
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1].startswith('{"mode": "files"'), result.stdout
    assert plain.stderr and all(PLAIN_LINE.match(line) for line in plain.stderr.splitlines()), plain.stderr
    lines = airflow.stderr.splitlines()
    assert lines and all(AIRFLOW_LINE.match(line) for line in lines), airflow.stderr
    assert not any(A_TIME.search(line) for line in lines), airflow.stderr
    assert "INFO plan predict (files mode): 1 unit(s), waiting for 1 marker(s)" in lines, lines


def test_an_unknown_log_format_is_a_one_line_error(tmp_path: Path) -> None:
    result = _rtb("check-model", "--project-dir", str(tmp_path), cwd=tmp_path, env={"RTB_LOG_FORMAT": "json"})
    assert _the_error_line(result) == "rtb: error: $RTB_LOG_FORMAT: expected 'plain' or 'airflow', got 'json'"


def _one_gib_of_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def test_an_exception_that_is_not_an_rtb_error_keeps_its_traceback(tmp_path: Path) -> None:
    """Out of memory is no input the user can fix: the process says where it happened."""
    result = _rtb("generate", "--out", str(tmp_path / "raw"), "--rows-train", "500000000",
                  "--rows-test", "10", cwd=tmp_path, env={"RTB_LOG_FORMAT": "airflow"},
                  preexec_fn=_one_gib_of_memory)

    assert result.returncode == 1, result.stderr
    assert "Traceback (most recent call last):" in result.stderr
    assert re.search(r"^\S*MemoryError\b", result.stderr, re.MULTILINE), result.stderr[-2000:]
    assert "rtb: error:" not in result.stderr
