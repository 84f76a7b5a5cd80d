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

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class AirflowApi:
    """A small REST API v2 client (stdlib only), logged in as the stack's airflow user."""

    def __init__(self, base_url: str, username: str = "airflow", password: str = "airflow"):
        self.base_url = base_url.rstrip("/")
        self.username = username
        self.password = password
        self._token: str | None = None

    def _send(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        request = urllib.request.Request(
            self.base_url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)

    @property
    def token(self) -> str:
        if self._token is None:
            answer = self._send("POST", "/auth/token", {"username": self.username, "password": self.password})
            self._token = answer["access_token"]
        return self._token

    def request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            return self._send(method, path, body, self.token)
        except urllib.error.HTTPError as exc:
            if exc.code != 401:
                raise
            self._token = None  # expired: log in again once
            return self._send(method, path, body, self.token)

    @staticmethod
    def quote(run_id: str) -> str:
        return urllib.parse.quote(run_id, safe="")

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> dict:
        """A new stack's dag-processor needs a few seconds to parse the files."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.request("GET", f"/api/v2/dags/{dag_id}")
            except urllib.error.HTTPError as exc:
                if exc.code != 404 or time.monotonic() > deadline:
                    raise
            time.sleep(3)

    def trigger(self, dag_id: str) -> str:
        """Unpause (queued runs of a paused DAG never start) and trigger a run; its id."""
        self.wait_for_dag(dag_id)
        self.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        run = self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None})
        return run["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{self.quote(run_id)}")["state"]

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict]:
        answer = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{self.quote(run_id)}/taskInstances")
        return {ti["task_id"]: ti for ti in answer["task_instances"]}

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = RUN_TIMEOUT) -> str:
        deadline = time.monotonic() + timeout
        while True:
            state = self.run_state(dag_id, run_id)
            if state in ("success", "failed"):
                return state
            if time.monotonic() > deadline:
                states = {t: ti["state"] for t, ti in self.task_instances(dag_id, run_id).items()}
                raise TimeoutError(f"{dag_id} {run_id} still {state} after {timeout} s: {states}")
            time.sleep(3)

    def wait_until_idle(self, dag_id: str, timeout: float = RUN_TIMEOUT) -> None:
        """Until no run of the DAG is queued or running (e.g. one its schedule added)."""
        deadline = time.monotonic() + timeout
        while True:
            runs = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]
            active = [r["dag_run_id"] for r in runs if r["state"] in ("queued", "running")]
            if not active:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{dag_id}: runs still active after {timeout} s: {active}")
            time.sleep(3)

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int) -> str:
        """The task's log as text, one line per log event."""
        answer = self.request(
            "GET",
            f"/api/v2/dags/{dag_id}/dagRuns/{self.quote(run_id)}/taskInstances/{task_id}/logs/{try_number}",
        )
        lines = []
        for item in answer["content"]:
            if isinstance(item, dict):
                lines.append(str(item.get("event", item)))
            else:  # older shape: [host, text]
                lines.append(str(item[-1]) if isinstance(item, list) else str(item))
        return "\n".join(lines)


@dataclass
class Stack:
    root: Path
    base_url: str
    env: dict[str, str]

    def run_sh(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["sh", "run.sh", *args],
            cwd=self.root,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory):
    why_not = _docker_available()
    if why_not:
        if IN_CI:
            pytest.fail(f"system tests need Docker: {why_not}")
        pytest.skip(f"system tests need Docker: {why_not}")

    root = tmp_path_factory.mktemp("stack") / "rtb-pipeline"
    _copy_repo(root)
    port = _free_port()
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": f"rtb-e2e-{uuid.uuid4().hex[:8]}",
        "AIRFLOW_PORT": str(port),
        "SCORING_PORT": str(_free_port()),
        "AIRFLOW_IMAGE": "rtb-pipeline-airflow:e2e",
        "RTB_JOB_IMAGE": "rtb-pipeline-job:e2e",
        "RTB_SAMPLE_ROWS": str(SAMPLE_ROWS_TRAIN),
        "RTB_SAMPLE_TEST_ROWS": str(SAMPLE_ROWS_TEST),
    }
    stack = Stack(root=root, base_url=f"http://127.0.0.1:{port}", env=env)
    up_log = root.parent / "run-sh-up.log"
    started = time.monotonic()
    try:
        up = stack.run_sh(timeout=STACK_UP_TIMEOUT)
        up_log.write_text(up.stdout + up.stderr)
        if up.returncode != 0:
            tail = "\n".join((up.stdout + up.stderr).splitlines()[-60:])
            pytest.fail(f"`sh run.sh` exited {up.returncode}:\n{tail}")
        print(f"\nstack up in {time.monotonic() - started:.0f} s at {stack.base_url} ({root})")
        yield stack
    finally:
        logs = stack.run_sh("compose", "logs", "--no-color", "--tail", "300", timeout=120)
        (root.parent / "compose.log").write_text(logs.stdout + logs.stderr)
        down = stack.run_sh("down", "-v", "--remove-orphans", timeout=300)
        if down.returncode != 0:
            print(f"`sh run.sh down -v` failed:\n{down.stdout}{down.stderr}")


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
