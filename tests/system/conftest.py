"""The real stack for the system tests: `sh run.sh` in a copy of the repo, torn down after.

The copy holds the files git knows about (tracked, plus untracked ones not ignored), so its
data/ is empty: run.sh generates a small synthetic sample there and your own data, models and
reports are never touched. The stack gets its own compose project name, free host ports and
its own image tags (`:e2e`, sharing the layer cache with the normal ones), so it can run
beside a stack you have up.

Needs Docker with the compose plugin and BASE_IMAGE / POSTGRES_IMAGE as for run.sh. Outside
CI, the system tests are skipped when the Docker engine cannot be reached; in CI (CI=true)
that is an error.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SAMPLE_ROWS_TRAIN = 20_000
SAMPLE_ROWS_TEST = 5_000
STACK_UP_TIMEOUT = 1800  # cold image builds included
RUN_TIMEOUT = 600


def _docker_available() -> str | None:
    """None if docker + compose work, else why not."""
    if shutil.which("docker") is None:
        return "docker is not installed"
    for cmd in (["docker", "info"], ["docker", "compose", "version"]):
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            return f"`{' '.join(cmd)}` failed: {result.stderr.strip()[:300]}"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _copy_repo(dest: Path) -> None:
    """Copy what git knows about (not data/, models/, reports/ contents, venvs, secrets)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for raw in filter(None, listed):
        rel = raw.decode()
        src = REPO / rel
        if not src.is_file():  # deleted in the work tree but still in the index
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def git_sha() -> str:
    """The commit of this checkout ('' outside one). The copy has no .git, so the suite passes
    it to run.sh (RTB_GIT_SHA), which bakes it into the job image for the reports' git_sha."""
    if shutil.which("git") is None:
        return ""
    result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def _load_rest_client() -> ModuleType:
    """airflow/rest_client.py, the client run.sh also uses. Loaded from its file: it is no
    package (run.sh feeds it to the api-server's python on stdin), and `airflow` is taken."""
    path = REPO / "airflow" / "rest_client.py"
    spec = importlib.util.spec_from_file_location("rtb_airflow_rest_client", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


rest_client = _load_rest_client()


class AirflowApi(rest_client.AirflowClient):
    """The REST API v2 client, logged in as the stack's airflow user, with the suite's timeouts."""

    def __init__(self, base_url: str, username: str = "airflow", password: str = "airflow") -> None:
        super().__init__(base_url, username, password, request_timeout=60)

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = RUN_TIMEOUT) -> str:
        return super().wait_for_run(dag_id, run_id, timeout)

    def wait_until_idle(self, dag_id: str, timeout: float = RUN_TIMEOUT) -> None:
        super().wait_until_idle(dag_id, timeout)


@dataclass
class Stack:
    root: Path
    base_url: str
    env: dict[str, str]
    up_seconds: float = 0.0

    def run_sh(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["sh", "run.sh", *args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


def _require_docker() -> None:
    why_not = _docker_available()
    if why_not:
        if IN_CI:
            pytest.fail(f"system tests need Docker: {why_not}")
        pytest.skip(f"system tests need Docker: {why_not}")


@contextlib.contextmanager
def running_stack(
    parent: Path,
    *up_args: str,
    name: str = "rtb-e2e",
    image_tag: str = "e2e",
    extra_env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """A copy of the repo in `parent`/rtb-pipeline, up with `sh run.sh [up_args...]`, its own
    compose project (`name`-<random>), free ports and image tags `:image_tag`; on exit the
    compose logs go to `parent`/compose.log and `sh run.sh down -v` removes it all. Skips (or,
    in CI, fails) when Docker is not there."""
    _require_docker()
    root = parent / "rtb-pipeline"
    _copy_repo(root)
    port = _free_port()
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": f"{name}-{uuid.uuid4().hex[:8]}",
        "AIRFLOW_PORT": str(port),
        "SCORING_PORT": str(_free_port()),
        "AIRFLOW_IMAGE": f"rtb-pipeline-airflow:{image_tag}",
        "RTB_JOB_IMAGE": f"rtb-pipeline-job:{image_tag}",
        "RTB_GIT_SHA": git_sha(),
        "RTB_SAMPLE_ROWS": str(SAMPLE_ROWS_TRAIN),
        "RTB_SAMPLE_TEST_ROWS": str(SAMPLE_ROWS_TEST),
        # The single-file tests run first on the two files; test_over_time.py then writes a
        # partitioned stream itself.
        "RTB_SAMPLE": "files",
        # Running over time (tests/system/test_over_time.py): short waits, a two-day window.
        "RTB_PARTITION_WAIT_SECONDS": "25",
        "RTB_PARTITION_POKE_SECONDS": "5",
        "RTB_TRAIN_WINDOW_DAYS": "2",
        "RTB_RETENTION_DAYS": "5",
        **(extra_env or {}),
    }
    stack = Stack(root=root, base_url=f"http://127.0.0.1:{port}", env=env)
    up_log = root.parent / "run-sh-up.log"
    started = time.monotonic()
    try:
        up = stack.run_sh(*up_args, timeout=STACK_UP_TIMEOUT)
        up_log.write_text(up.stdout + up.stderr)
        if up.returncode != 0:
            tail = "\n".join((up.stdout + up.stderr).splitlines()[-60:])
            pytest.fail(f"`{' '.join(('sh', 'run.sh', *up_args))}` exited {up.returncode}:\n{tail}")
        stack.up_seconds = time.monotonic() - started
        print(f"\nstack up in {stack.up_seconds:.0f} s at {stack.base_url} ({root})")
        yield stack
    finally:
        logs = stack.run_sh("compose", "logs", "--no-color", "--tail", "300", timeout=120)
        (root.parent / "compose.log").write_text(logs.stdout + logs.stderr)
        down = stack.run_sh("down", "-v", "--remove-orphans", timeout=300)
        if down.returncode != 0:
            print(f"`sh run.sh down -v` failed:\n{down.stdout}{down.stderr}")


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory):
    _require_docker()
    with running_stack(tmp_path_factory.mktemp("stack")) as stack:
        yield stack


@pytest.fixture(scope="session")
def api(stack: Stack) -> AirflowApi:
    return AirflowApi(stack.base_url)


@dataclass
class Run:
    dag_id: str
    run_id: str
    state: str
    seconds: float


@pytest.fixture(scope="session")
def untrained_predict_run(api: AirflowApi) -> Run:
    """predict_pipeline before any model exists: check_model must stop it."""
    started = time.monotonic()
    run_id = api.trigger("predict_pipeline")
    state = api.wait_for_run("predict_pipeline", run_id)
    return Run("predict_pipeline", run_id, state, time.monotonic() - started)


@pytest.fixture(scope="session")
def trained_run(api: AirflowApi, untrained_predict_run: Run) -> Run:
    """One successful train_pipeline run, shared by the tests that need a model."""
    started = time.monotonic()
    run_id = api.trigger("train_pipeline")
    state = api.wait_for_run("train_pipeline", run_id)
    run = Run("train_pipeline", run_id, state, time.monotonic() - started)
    print(f"\ntrain_pipeline {run_id}: {state} in {run.seconds:.0f} s")
    # Unpausing may also have queued a scheduled run (catchup=False runs the latest tick when
    # it is recent): let it finish so that later tests see a quiet DAG.
    api.wait_until_idle("train_pipeline")
    return run


@pytest.fixture(scope="session")
def predicted_run(api: AirflowApi, trained_run: Run) -> Run:
    """One predict_pipeline run after training: the champion scores the test split."""
    started = time.monotonic()
    run_id = api.trigger("predict_pipeline")
    state = api.wait_for_run("predict_pipeline", run_id)
    run = Run("predict_pipeline", run_id, state, time.monotonic() - started)
    print(f"\npredict_pipeline {run_id}: {state} in {run.seconds:.0f} s")
    return run
