"""Two installs of the project never share state: each clone gets its own compose project (so
its own Airflow database and logs volumes), its own image tags and its own task-container
label, derived from its folder and kept in its .env.local.

Runs run.sh's settings step for real (`sh run.sh compose config`, which writes .env.local and
has compose resolve the whole file) in copies of the repo under tmp; no stack is started. The
two copies have the same folder name, as two clones in different places would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from .conftest import _copy_repo, _require_docker

pytestmark = pytest.mark.system

# What the shell must not decide for these tests: each install derives or keeps its own.
PER_INSTALL = ("COMPOSE_PROJECT_NAME", "AIRFLOW_IMAGE", "RTB_JOB_IMAGE", "AIRFLOW_PORT", "SCORING_PORT")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PER_INSTALL}
    return env | extra


def _run_sh(root: Path, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
    result = subprocess.run(["sh", "run.sh", *args], cwd=root, env=_env(**extra_env),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"sh run.sh {' '.join(args)} in {root}:\n{result.stdout}{result.stderr}"
    return result


def _config(root: Path, **extra_env: str) -> dict:
    """The compose file as this install resolves it, with every profile."""
    out = _run_sh(root, "compose", "--profile", "serving", "--profile", "celery", "config", "--format",
                  "json", **extra_env).stdout
    return json.loads(out)


def _stack(config: dict) -> dict[str, object]:
    """What must differ between two installs."""
    services = config["services"]
    scheduler = services["airflow-scheduler"]
    return {
        "project": config["name"],
        "volumes": sorted(volume["name"] for volume in config["volumes"].values()),
        "airflow image": scheduler["image"],
        "job image": scheduler["environment"]["RTB_JOB_IMAGE"],
        "scoring image": services["scoring"]["image"],
        "task label": scheduler["environment"]["RTB_STACK"],
        "host dir": scheduler["environment"]["RTB_HOST_PROJECT_DIR"],
    }


@pytest.fixture(scope="module")
def two_clones(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    _require_docker()
    parent = tmp_path_factory.mktemp("clones")
    clones = (parent / "one" / "rtb-pipeline", parent / "two" / "rtb-pipeline")
    for root in clones:
        _copy_repo(root)
    return clones


def test_two_clones_get_their_own_project_volumes_images_and_label(two_clones) -> None:
    one, two = (_stack(_config(root)) for root in two_clones)
    for key in one:
        assert one[key] != two[key], f"both installs use the same {key}: {one[key]}"
    for stack, root in zip((one, two), two_clones, strict=True):
        assert stack["host dir"] == str(root.resolve())
        # The label the DAGs put on task containers is what `run.sh down` cleans up by.
        assert stack["task label"] == stack["project"]
        assert all(str(volume).startswith(f"{stack['project']}_") for volume in stack["volumes"])
        assert stack["airflow image"] == f"{stack['project']}-airflow:latest"
        assert stack["job image"] == stack["scoring image"] == f"{stack['project']}-job:latest"


def test_the_name_and_chosen_ports_are_kept_across_commands(two_clones) -> None:
    root = two_clones[0]
    first = _config(root, AIRFLOW_PORT="18123", SCORING_PORT="18124")
    again = _config(root)  # no override this time: the chosen ports stay
    assert again["name"] == first["name"]
    ports = {name: [p["published"] for p in again["services"][name]["ports"]]
             for name in ("airflow-apiserver", "scoring")}
    assert ports == {"airflow-apiserver": ["18123"], "scoring": ["18124"]}
    chosen = f"rtb-chosen-{uuid.uuid4().hex[:8]}"
    assert _config(root, COMPOSE_PROJECT_NAME=chosen)["name"] == chosen
    assert _config(root)["name"] == chosen, "a name given once is kept"


def test_a_copied_folder_with_its_env_local_is_another_install(two_clones, tmp_path: Path) -> None:
    original = two_clones[1]
    name = _config(original)["name"]
    copy = tmp_path / "rtb-pipeline"
    shutil.copytree(original, copy)
    assert (copy / ".env.local").is_file()
    assert _config(copy)["name"] not in (name, "rtb-pipeline")


def test_an_install_from_before_per_install_names_keeps_its_old_name(tmp_path: Path) -> None:
    _require_docker()
    root = tmp_path / "old-clone"
    _copy_repo(root)
    # What run.sh wrote before names were per-install: no COMPOSE_PROJECT_NAME in .env.local.
    (root / ".env.local").write_text(f"RTB_HOST_PROJECT_DIR='{root.resolve()}'\nAIRFLOW_JWT_SECRET=x\n")
    assert _stack(_config(root))["project"] == "rtb-pipeline"


def test_down_removes_only_this_installs_task_containers(two_clones) -> None:
    """The containers failed tasks leave behind carry the install's label; `down` removes
    those of its own install and no other's."""
    image = os.environ.get("BASE_IMAGE", "python:3.11-slim-bookworm")
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode != 0:
        pytest.skip(f"image {image} is not there (set BASE_IMAGE as for run.sh)")
    names = [_config(root)["name"] for root in two_clones]
    left: dict[str, str] = {}
    try:
        for name in names:
            left[name] = subprocess.run(
                ["docker", "create", "--name", f"rtb-isolation-{uuid.uuid4().hex[:8]}",
                 "--label", f"rtb-pipeline.stack={name}", image, "true"],
                capture_output=True, text=True, check=True).stdout.strip()
        _run_sh(two_clones[0], "down")

        def exists(container: str) -> bool:
            return subprocess.run(["docker", "container", "inspect", container],
                                  capture_output=True).returncode == 0

        assert not exists(left[names[0]]), "down left its own install's task container"
        assert exists(left[names[1]]), "down removed another install's task container"
    finally:
        for container in left.values():
            subprocess.run(["docker", "rm", "-f", container], capture_output=True)
