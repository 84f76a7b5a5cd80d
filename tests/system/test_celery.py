"""The stack scaled out: `sh run.sh up --workers 2` runs the CeleryExecutor with a Redis broker
and two Celery workers. The DAGs are the same; every worker starts its task containers on the
host's engine, so a run's tasks may land on either worker and the files still end up in the
(copied) project's data/, models/ and reports/. Faults: the broker restarted mid-run, and a
worker killed mid-task.

Its own stack (project `rtb-celery-*`, image tags `:e2e-celery`), torn down at the end.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import yaml

from .conftest import AirflowApi, Stack, running_stack

pytestmark = pytest.mark.system

WORKERS = 2
PUBLISH_URL = "redis://redis:6379/1"


@pytest.fixture(scope="module")
def celery_stack(tmp_path_factory: pytest.TempPathFactory):
    with running_stack(
        tmp_path_factory.mktemp("celery"), "up", "--workers", str(WORKERS),
        name="rtb-celery", image_tag="e2e-celery",
        # Files mode: the predict runs score the test split, one run after the other.
        # A dead worker's task fails after 30 s without heartbeats (default 300 s).
        # Predictions are published to the stack's own Redis (db 1; the broker uses db 0).
        extra_env={"RTB_SAMPLE": "files", "AIRFLOW_TASK_HEARTBEAT_TIMEOUT": "30",
                   "RTB_PUBLISH_REDIS_URL": PUBLISH_URL},
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def celery_api(celery_stack: Stack) -> AirflowApi:
    return AirflowApi(celery_stack.base_url)


def _containers(stack: Stack, service: str) -> dict[str, dict]:
    """The service's running containers of this stack: hostname -> docker inspect."""
    ids = subprocess.run(
        ["docker", "ps", "-q",
         "--filter", f"label=com.docker.compose.project={stack.env['COMPOSE_PROJECT_NAME']}",
         "--filter", f"label=com.docker.compose.service={service}"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    return {c["Config"]["Hostname"]: c for c in _inspect(ids)}


def _inspect(ids: list[str]) -> list[dict]:
    """`docker inspect` of containers just listed; one removed in between (a job container
    whose task ended) is left out instead of failing the call."""
    if not ids:
        return []
    done = subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True)
    errors = done.stderr.strip().splitlines()
    vanished = bool(errors) and all("no such object" in line.lower() for line in errors)
    if done.returncode != 0 and not vanished:
        raise RuntimeError(f"docker inspect failed: {done.stderr.strip()}")
    return json.loads(done.stdout or "[]")


@dataclass
class Ran:
    dag_id: str
    run_id: str
    state: str
    seconds: float
    hosts: dict[str, str]  # task id (with map index) -> hostname
    failures: dict[str, str]  # failed task id -> its state history and the end of its log


def _failures(api: AirflowApi, dag_id: str, run_id: str, task_instances: list[dict]) -> dict[str, str]:
    """What a failed run's failed tasks say: try, hostname and their log's last lines."""
    found = {}
    for ti in task_instances:
        if ti["state"] not in ("failed", "upstream_failed"):
            continue
        try:
            lines = api.task_log_lines(dag_id, run_id, ti["task_id"], max(ti["try_number"], 1),
                                       ti.get("map_index", -1))
        except Exception as error:  # the log itself may be what is missing
            lines = [f"(no log: {error!r})"]
        found[f"{ti['task_id']}[{ti.get('map_index', -1)}]"] = (
            f"{ti['state']} try {ti['try_number']} on {ti.get('hostname')}:\n" + "\n".join(lines[-25:])
        )
    return found


def _run(api: AirflowApi, dag_id: str) -> Ran:
    started = time.monotonic()
    run_id = api.trigger(dag_id)
    state = api.wait_for_run(dag_id, run_id)
    seconds = time.monotonic() - started
    answer = api.request(
        "GET", f"/api/v2/dags/{dag_id}/dagRuns/{api.quote(run_id)}/taskInstances?limit=100"
    )
    hosts = {
        f"{ti['task_id']}[{ti['map_index']}]" if ti.get("map_index", -1) >= 0 else ti["task_id"]:
        ti.get("hostname") or ""
        for ti in answer["task_instances"]
        if ti["state"] in ("success", "failed", "up_for_retry")
    }
    failures = {} if state == "success" else _failures(api, dag_id, run_id, answer["task_instances"])
    # Unpausing may also have queued a scheduled run: let it end before the next run.
    api.wait_until_idle(dag_id)
    return Ran(dag_id, run_id, state, seconds, hosts, failures)


@pytest.fixture(scope="module")
def celery_runs(celery_api: AirflowApi, celery_stack: Stack) -> list[Ran]:
    """train_pipeline once, then predict_pipeline twice, one after the other."""
    runs = [_run(celery_api, "train_pipeline")]
    print(f"\ntrain_pipeline: {runs[0].state} in {runs[0].seconds:.0f} s")
    if runs[0].state == "success":
        for _ in range(2):
            runs.append(_run(celery_api, "predict_pipeline"))
            print(f"predict_pipeline: {runs[-1].state} in {runs[-1].seconds:.0f} s")
    return runs


def test_up_with_workers_runs_redis_and_the_workers_and_keeps_the_executor(celery_stack) -> None:
    settings = (celery_stack.root / ".env.local").read_text().splitlines()
    assert "AIRFLOW_EXECUTOR=CeleryExecutor" in settings
    assert f"AIRFLOW_WORKERS={WORKERS}" in settings
    workers = _containers(celery_stack, "airflow-worker")
    assert len(workers) == WORKERS
    for worker in workers.values():
        assert worker["State"]["Health"]["Status"] == "healthy", worker["Name"]
        assert "AIRFLOW__CORE__EXECUTOR=CeleryExecutor" in worker["Config"]["Env"]
    assert len(_containers(celery_stack, "redis")) == 1
    # Later run.sh commands of this install keep the profile: compose sees redis and workers.
    ps = celery_stack.run_sh("compose", "ps", "--services", "--status", "running", timeout=120)
    assert ps.returncode == 0, ps.stderr
    assert {"redis", "airflow-worker", "airflow-scheduler"} <= set(ps.stdout.split())
    print(f"\nstack with {WORKERS} workers up in {celery_stack.up_seconds:.0f} s")


def test_train_pipeline_succeeds_on_the_celery_workers(celery_stack, celery_runs) -> None:
    train = celery_runs[0]
    assert train.state == "success", train.failures
    assert (celery_stack.root / "models/champion.yaml").is_file()
    workers = _containers(celery_stack, "airflow-worker")
    assert set(train.hosts.values()) <= set(workers), (train.hosts, sorted(workers))


def test_tasks_spread_over_both_workers_and_predictions_are_written(
    celery_stack, celery_runs
) -> None:
    outcomes = [(r.dag_id, r.state, r.failures) for r in celery_runs]
    assert [r.state for r in celery_runs] == ["success"] * 3, outcomes
    workers = _containers(celery_stack, "airflow-worker")
    names = {host: c["Name"].lstrip("/") for host, c in workers.items()}
    used = Counter(host for run in celery_runs for host in run.hosts.values())
    for run in celery_runs:
        print(f"\n{run.dag_id} {run.run_id} ({run.seconds:.0f} s):")
        for task, host in run.hosts.items():
            print(f"  {task:<28} {names.get(host, host)}")
    assert set(used) <= set(workers), (used, sorted(workers))
    assert len(used) == WORKERS, f"tasks ran on {dict(used)} only"

    root = celery_stack.root
    test_df = pd.read_csv(root / "data/processed/test_df.csv")
    predictions = sorted((root / "data/predictions").glob("predictions_*.npy"))
    assert predictions, "no predictions_*.npy written"
    proba = np.load(predictions[-1])
    assert len(proba) == len(test_df) > 0
    assert np.isfinite(proba).all() and ((proba >= 0.0) & (proba <= 1.0)).all()
    assert predictions[-1].with_suffix(".csv").is_file()


def _redis_cli(stack: Stack, *args: str) -> str:
    (redis,) = _containers(stack, "redis").values()
    return subprocess.run(["docker", "exec", redis["Id"], "redis-cli", "-n", "1", *args],
                          capture_output=True, text=True, check=True, timeout=120).stdout


def test_the_predict_runs_publish_their_scores_to_the_stacks_redis(celery_stack, celery_runs) -> None:
    """With RTB_PUBLISH_REDIS_URL set, predict_pipeline ends with `publish` (on the stack's
    network): every id of the newest prediction set is a key holding its score and model, once."""
    predict_runs = [run for run in celery_runs if run.dag_id == "predict_pipeline"]
    assert predict_runs and all("publish" in run.hosts for run in predict_runs), predict_runs
    newest = sorted((celery_stack.root / "data/predictions").glob("predictions_*.csv"))[-1]
    scored = pd.read_csv(newest, dtype={"id": str})
    keys = _redis_cli(celery_stack, "--scan", "--pattern", "rtb:score:*").split()
    assert len(keys) == len(set(keys)) == scored["id"].nunique() == len(scored)
    sidecar = yaml.safe_load(newest.with_suffix(".yaml").read_text())
    for row in scored.sample(5, random_state=0).itertuples():
        value = json.loads(_redis_cli(celery_stack, "GET", f"rtb:score:{row.id}"))
        assert value["p"] == pytest.approx(row.probability, rel=1e-6)
        assert value["model"] == sidecar["model"]["version"]
    assert 0 < int(_redis_cli(celery_stack, "TTL", keys[0])) <= 2 * 86400


def _predictions(stack: Stack) -> set[str]:
    return {p.name for p in (stack.root / "data/predictions").glob("predictions_*.npy")}


def _sidecar(stack: Stack, npy_name: str) -> dict:
    return yaml.safe_load((stack.root / "data/predictions" / npy_name).with_suffix(".yaml").read_text())


def test_a_redis_restart_mid_run_loses_nothing(celery_api, celery_stack, celery_runs) -> None:
    """`docker restart` of the broker while a predict_pipeline run is in flight (a task
    running, the rest still to be sent): the scheduler and the workers reconnect, messages
    queued before the restart are still there (Redis saves its data on shutdown; Celery acks a
    task only when it has ended), and the run completes with a whole prediction set."""
    api = celery_api
    (redis,) = _containers(celery_stack, "redis").values()
    before = _predictions(celery_stack)
    run_id = api.trigger("predict_pipeline")
    deadline = time.monotonic() + 300
    while not any(ti["state"] == "running" for ti in api.task_instances("predict_pipeline", run_id).values()):
        assert time.monotonic() < deadline, "no task of the run started"
        assert api.run_state("predict_pipeline", run_id) in ("queued", "running")
        time.sleep(0.5)
    states = {t: ti["state"] for t, ti in api.task_instances("predict_pipeline", run_id).items()}
    started = time.monotonic()
    subprocess.run(["docker", "restart", redis["Id"]], check=True, capture_output=True, timeout=120)
    restarted = time.monotonic() - started
    state = api.wait_for_run("predict_pipeline", run_id)
    seconds = time.monotonic() - started
    tis = api.task_instances("predict_pipeline", run_id)
    tries = {t: ti["try_number"] for t, ti in tis.items()}
    print(f"\nrestarted redis ({restarted:.1f} s) with the run's tasks at {states}; run {state} "
          f"{seconds:.0f} s later; tries {tries}")
    assert state == "success", {t: ti["state"] for t, ti in tis.items()}
    assert {ti["state"] for ti in tis.values()} <= {"success", "skipped"}
    (after,) = _containers(celery_stack, "redis").values()
    assert after["State"]["StartedAt"] != redis["State"]["StartedAt"], "redis was not restarted"
    # Outputs intact: this run's prediction set, whole. The hourly schedule may have started
    # a run beside it (an hour boundary passed), which writes a set of its own.
    new = sorted(name for name in _predictions(celery_stack) - before
                 if _sidecar(celery_stack, name).get("run_id") == run_id)
    assert len(new) == 1, (new, sorted(_predictions(celery_stack) - before))
    proba = np.load(celery_stack.root / "data/predictions" / new[0])
    test_df = pd.read_csv(celery_stack.root / "data/processed/test_df.csv")
    assert len(proba) == len(test_df) > 0 and np.isfinite(proba).all()
    # Both workers answer a ping through the restarted broker (their health check's command).
    for host, worker in _containers(celery_stack, "airflow-worker").items():
        ping = subprocess.run(
            ["docker", "exec", worker["Id"], "celery", "--app",
             "airflow.providers.celery.executors.celery_executor.app",
             "inspect", "ping", "-d", f"celery@{host}"],
            capture_output=True, text=True, timeout=120,
        )
        assert ping.returncode == 0, (worker["Name"], ping.stdout, ping.stderr)


def _job_containers(key: str) -> list[dict]:
    """The job containers of one task instance (every try), by their targets.py label."""
    ids = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=rtb-pipeline.task-instance={key}"],
                         capture_output=True, text=True, check=True).stdout.split()
    return _inspect(ids)


# Last in this file: it leaves the stack with one worker.
def test_a_killed_workers_task_is_retried_on_the_other_worker(
    celery_api, celery_stack, celery_runs
) -> None:
    """`docker kill` of the worker running a train_pipeline task while its job container runs:
    its heartbeats stop, the scheduler fails the try after AIRFLOW_TASK_HEARTBEAT_TIMEOUT (30 s
    here) and the retry runs on the worker that is left; the run succeeds, every task ends in
    one successful try, and the dead try's container is not left running beside the retry."""
    api = celery_api
    workers = _containers(celery_stack, "airflow-worker")
    assert len(workers) == WORKERS
    run_id = api.trigger("train_pipeline")
    deadline = time.monotonic() + 300
    victim = task = key = None
    while victim is None:
        # A task whose job container runs, found by the labels targets.py puts on it.
        for ti in api.task_instances("train_pipeline", run_id).values():
            if ti["state"] == "running" and ti.get("hostname") in workers:
                key = f"train_pipeline.{ti['task_id']}.{run_id}.{ti.get('map_index', -1)}"
                if any(c["State"]["Running"] for c in _job_containers(key)):
                    victim, task = ti["hostname"], ti["task_id"]
                    break
        else:
            assert time.monotonic() < deadline, "no job container of the run started on a worker"
            assert api.run_state("train_pipeline", run_id) in ("queued", "running")
            time.sleep(0.5)
    started = time.monotonic()
    subprocess.run(["docker", "kill", workers[victim]["Id"]], check=True, capture_output=True)
    state = api.wait_for_run("train_pipeline", run_id)
    seconds = time.monotonic() - started
    tis = api.task_instances("train_pipeline", run_id)
    retried = tis[task]
    print(f"\nkilled {workers[victim]['Name'].lstrip('/')} during {task} (try 1); run {state}"
          f" {seconds:.0f} s later; {task} try {retried['try_number']} on "
          f"{workers.get(retried.get('hostname'), {}).get('Name', retried.get('hostname'))}")
    assert state == "success", {t: ti["state"] for t, ti in tis.items()}
    assert retried["try_number"] >= 2
    assert retried["hostname"] in workers and retried["hostname"] != victim
    # Nothing lost: every task of the run succeeded (or was skipped by design) in its last try.
    assert {ti["state"] for ti in tis.values()} <= {"success", "skipped"}
    champion = yaml.safe_load((celery_stack.root / "models/champion.yaml").read_text())
    assert (celery_stack.root / "models" / champion["model"]).is_file(), champion
    # The killed worker's job container carries its task instance and try (targets.py): the
    # retry stops it if it still runs then; either way none is left running beside the retry.
    # The dead try's operator could not remove it, so it stays (exited) for `docker logs`.
    containers = _job_containers(key)
    found = {(c["Config"]["Labels"]["rtb-pipeline.try"], c["State"]["Status"], c["State"]["ExitCode"])
             for c in containers}
    models = sorted(p.name for p in (celery_stack.root / "models").glob("pipeline_*.pkl"))
    print(f"job containers of {task} (try, state, exit code): {sorted(found)}; models after the "
          f"fault: {models}; champion {champion['model']}")
    assert any(try_ == "1" for try_, _, _ in found), found
    assert all(status != "running" for _, status, _ in found), found
