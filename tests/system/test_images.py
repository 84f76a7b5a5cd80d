"""The images the stack runs are the ones the repo pins: the Airflow image holds exactly the
packages of airflow/constraints.txt, and the job image knows the commit it was built from, which
training reports record. Checked on the images the system tests' stack built anyway.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from .conftest import IN_CI, REPO, git_sha

pytestmark = pytest.mark.system


def _pins(text: str) -> dict[str, str]:
    """name -> version of `name==version` lines (pip's normalised, lower-case names)."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"not pinned: {line!r}"
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def _image_env(image: str) -> dict[str, str]:
    env_lines = "{{range .Config.Env}}{{println .}}{{end}}"
    out = subprocess.run(["docker", "image", "inspect", "--format", env_lines, image],
                         capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_airflow_image_holds_exactly_the_pinned_packages(stack) -> None:
    image = stack.env["AIRFLOW_IMAGE"]
    frozen = subprocess.run(["docker", "run", "--rm", "--entrypoint", "pip", image, "freeze"],
                            capture_output=True, text=True, check=True).stdout
    pinned = _pins((REPO / "airflow" / "constraints.txt").read_text())
    installed = _pins(frozen)
    assert installed == pinned, (
        f"not pinned: {sorted(set(installed) - set(pinned))}; "
        f"pinned but missing: {sorted(set(pinned) - set(installed))}; "
        f"other version: {sorted(n for n in set(pinned) & set(installed) if pinned[n] != installed[n])}")
    # What the image is for, as airflow/requirements.in asks for it.
    wanted = _pins((REPO / "airflow" / "requirements.in").read_text().replace("[redis]", ""))
    for name, version in wanted.items():
        assert installed[name] == version, name


def test_job_image_and_training_report_carry_the_commit(stack, trained_run) -> None:
    sha = git_sha()
    if not sha:  # a copy without .git (an unpacked archive); CI always runs a clone
        (pytest.fail if IN_CI else pytest.skip)(f"{REPO} is not a git checkout")
    assert _image_env(stack.env["RTB_JOB_IMAGE"]).get("RTB_GIT_SHA") == sha
    assert trained_run.state == "success"
    reports = sorted(Path(stack.root, "reports").glob("report_*.yaml"))
    assert reports, "training wrote no report"
    assert yaml.safe_load(reports[-1].read_text())["environment"]["git_sha"] == sha
