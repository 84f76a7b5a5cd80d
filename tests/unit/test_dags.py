"""The DAG files parse, and say what the pipeline contract says: tasks, edges, schedules, the
plan-driven per-partition tasks, the deferrable partition sensors, and DockerOperator settings
that make sibling containers work on the host's engine.

Parses airflow/dags the way the dag-processor does (a bundle DagBag), with the environment
docker-compose.yaml gives the Airflow services. Needs apache-airflow and the docker provider in
the venv; importing Airflow takes a few seconds.
"""

from __future__ import annotations

import ast
import contextlib
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DAGS_DIR = REPO / "airflow" / "dags"

HOST_ENV = {
    "RTB_JOB_IMAGE": "rtb-pipeline-job:test",
    "RTB_HOST_PROJECT_DIR": "/home/someone/rtb-pipeline",
    "RTB_HOST_UID": "1234",
    "RTB_HOST_GID": "5678",
    "RTB_TASK_RETRIES": "2",
    "RTB_STACK": "rtb-test",
    "RTB_PARTITION_WAIT_SECONDS": "900",
    "RTB_PARTITION_POKE_SECONDS": "15",
    "RTB_TRAIN_WINDOW_DAYS": "5",
}

EXPECTED = {
    "train_pipeline": {
        "cron": "0 6 * * *",
        "max_active_runs": 1,
        "docker": {"plan", "make_dataset", "preprocessing", "training", "retention"},
        "mapped": {"wait_for_labels", "make_dataset", "preprocessing"},
        "edges": {
            ("plan", "units"), ("plan", "commands"), ("plan", "markers"),
            ("units", "wait_for_labels"), ("commands", "wait_for_labels"),
            ("markers", "wait_for_labels"), ("units", "make_dataset"), ("units", "preprocessing"),
            ("commands", "training"), ("commands", "retention"),
            ("wait_for_labels", "make_dataset"), ("make_dataset", "preprocessing"),
            ("preprocessing", "training"), ("training", "retention"),
        },
    },
    "predict_pipeline": {
        "cron": "0 * * * *",
        "max_active_runs": 4,
        "docker": {"check_model", "plan", "make_dataset", "preprocessing", "predicting", "monitor"},
        "mapped": {"wait_for_requests", "make_dataset", "preprocessing", "predicting"},
        "edges": {
            ("check_model", "plan"),
            ("plan", "units"), ("plan", "commands"), ("plan", "markers"),
            ("units", "wait_for_requests"), ("commands", "wait_for_requests"),
            ("markers", "wait_for_requests"), ("units", "make_dataset"),
            ("units", "preprocessing"), ("units", "predicting"), ("commands", "monitor"),
            ("wait_for_requests", "make_dataset"), ("make_dataset", "preprocessing"),
            ("preprocessing", "predicting"), ("predicting", "monitor"),
            ("monitor", "retrain_needed"), ("retrain_needed", "trigger_training"),
        },
    },
}

# DAG files are parsed every few seconds: the ML stack lives in the job image, never here.
FORBIDDEN_IMPORTS = {
    "pandas",
    "numpy",
    "sklearn",
    "scipy",
    "lightgbm",
    "pyarrow",
    "joblib",
    "matplotlib",
    "rtb",
}


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory: pytest.TempPathFactory):
    with _parsed(tmp_path_factory, HOST_ENV) as bag:
        yield bag


@contextlib.contextmanager
def _parsed(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]):
    """The DAG folder as the dag-processor parses it with `env` in the environment."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow_home")))
        mp.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "false")
        mp.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(DAGS_DIR))
        for name, value in env.items():
            mp.setenv(name, value)
        # The DAG files read the environment at import; drop a copy cached by another test.
        for module in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
            mp.delitem(sys.modules, module)
        from airflow.dag_processing.dagbag import BundleDagBag

        yield BundleDagBag(dag_folder=DAGS_DIR, bundle_path=DAGS_DIR)
        for module in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
            mp.delitem(sys.modules, module)


@pytest.fixture(scope="module")
def common(dagbag):
    """The DAGs' shared module, as the dag-processor imported it (with HOST_ENV)."""
    return sys.modules["pipeline.common"]


def test_dag_files_import_without_errors(dagbag) -> None:
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == set(EXPECTED)


@pytest.mark.parametrize("dag_id", sorted(EXPECTED))
def test_tasks_and_edges(dagbag, dag_id: str) -> None:
    dag = dagbag.dags[dag_id]
    edges = {(task.task_id, down) for task in dag.tasks for down in task.downstream_task_ids}
    assert edges == EXPECTED[dag_id]["edges"]
    assert set(dag.task_ids) == {task for edge in edges for task in edge}
    mapped = {task.task_id for task in dag.tasks if type(task).__name__ == "MappedOperator"}
    assert mapped == EXPECTED[dag_id]["mapped"]


@pytest.mark.parametrize("dag_id", sorted(EXPECTED))
def test_schedule_and_run_settings(dagbag, dag_id: str) -> None:
    dag = dagbag.dags[dag_id]
    # A data-interval timetable: each run covers the period before it, in UTC (a plain cron
    # string would give runs whose interval is a single instant).
    assert type(dag.timetable).__name__ == "CronDataIntervalTimetable"
    assert dag.schedule.expression == EXPECTED[dag_id]["cron"] and str(dag.schedule.timezone) == "UTC"
    assert dag.catchup is False
    assert dag.max_active_runs == EXPECTED[dag_id]["max_active_runs"]
    assert dag.doc_md and dag_id in dag.doc_md
    assert "rtb" in dag.tags
    for task in dag.tasks:
        if "wait_for" in task.task_id:
            continue  # a missing partition is waited for, never retried (see below)
        assert _setting(task, "retries") == 2, task.task_id
        assert _setting(task, "retry_delay").total_seconds() == 30


def _setting(task, name: str):
    """A task's setting, also for a mapped task (whose settings live in its partial kwargs)."""
    partial = getattr(task, "partial_kwargs", None)
    if partial is not None and name in partial:
        return partial[name]
    return getattr(task, name)


def _docker_tasks(dag) -> list:
    from airflow.providers.docker.operators.docker import DockerOperator

    return [t for t in dag.tasks if issubclass(getattr(t, "operator_class", type(t)), DockerOperator)]


@pytest.mark.parametrize("dag_id", sorted(EXPECTED))
def test_every_stage_is_a_sibling_container_of_the_job_image(dagbag, dag_id: str) -> None:
    dag = dagbag.dags[dag_id]
    tasks = _docker_tasks(dag)
    assert {t.task_id for t in tasks} == EXPECTED[dag_id]["docker"]
    for task in tasks:
        get = lambda name, task=task: _setting(task, name)  # noqa: E731
        assert get("image") == HOST_ENV["RTB_JOB_IMAGE"]
        assert get("mount_tmp_dir") is False
        # Kept when the task fails (for `docker logs`); RtbJobOperator removes it on success.
        assert get("auto_remove") == "never"
        assert get("network_mode") == "none"
        assert get("docker_url") == "unix://var/run/docker.sock"
        assert get("user") == "1234:5678"
        assert get("environment") == {"RTB_PROJECT_DIR": "/project", "RTB_LOG_FORMAT": "airflow",
                                      "RTB_TRAIN_WINDOW_DAYS": "5"}
        # Only the plan and the monitor answer through XCom (their JSON line).
        assert get("do_xcom_push") is (task.task_id in ("plan", "monitor")), task.task_id
        assert get("labels") == {"rtb-pipeline.stack": "rtb-test", "rtb-pipeline.task": task.task_id}


@pytest.mark.parametrize("dag_id", sorted(EXPECTED))
def test_an_rtb_error_is_not_retried_by_any_stage(dagbag, common, dag_id: str) -> None:
    """Every stage's operator as the worker runs it (a mapped stage's instance made by
    `unmap`, as on the worker) fails an `rtb: error:` at once and retries anything else."""
    from airflow.sdk import RetryAction

    for task in _docker_tasks(dagbag.dags[dag_id]):
        operator = task.unmap({"command": ["check-model"]}) if hasattr(task, "unmap") else task
        policy = operator.retry_policy
        assert policy.evaluate(common.RtbUserError(1), 1, 3).action is RetryAction.FAIL, task.task_id
        assert policy.evaluate(RuntimeError("engine busy"), 1, 3).action is RetryAction.DEFAULT


@pytest.mark.parametrize("dag_id", sorted(EXPECTED))
def test_mounts_are_host_paths(dagbag, dag_id: str) -> None:
    """Bind-mount sources are resolved by the host's engine: they must be host paths."""
    host = HOST_ENV["RTB_HOST_PROJECT_DIR"]
    for task in _docker_tasks(dagbag.dags[dag_id]):
        mounts = {m["Target"]: m for m in _setting(task, "mounts")}
        assert set(mounts) == {"/project/data", "/project/models", "/project/reports"}
        for target, mount in mounts.items():
            assert mount["Type"] == "bind"
            assert mount["Source"] == host + target.removeprefix("/project")
        # Predicting must never be able to change a model.
        assert mounts["/project/models"]["ReadOnly"] is (dag_id == "predict_pipeline")


def test_fixed_commands_and_the_run_interval(dagbag) -> None:
    predict, train = dagbag.dags["predict_pipeline"], dagbag.dags["train_pipeline"]
    assert predict.get_task("check_model").command == ["check-model", "--project-dir", "/project"]
    for dag, kind in ((predict, "predict"), (train, "train")):
        command = dag.get_task("plan").command
        assert command[:2] == ["plan", kind] and command[-2:] == ["--project-dir", "/project"]
        # Scheduled and backfilled runs plan their data interval; a run without a logical
        # date plans from its run_after.
        assert "data_interval_start" in command[command.index("--start") + 1]
        assert "dag_run.run_after" in command[command.index("--end") + 1]


@pytest.mark.parametrize(
    ("dag_id", "sensor"),
    [("predict_pipeline", "wait_for_requests"), ("train_pipeline", "wait_for_labels")],
)
def test_partitions_are_awaited_by_a_deferrable_sensor_that_skips(dagbag, dag_id, sensor) -> None:
    task = dagbag.dags[dag_id].get_task(sensor)
    assert task.operator_class.__name__ == "PartitionSensor"
    # The sensor's defaults are set in its constructor; build one as the mapped task will.
    from pipeline.common import PartitionSensor

    built = PartitionSensor(task_id="probe", filepath="x/_SUCCESS")
    assert built.deferrable is True and built.soft_fail is True
    assert built.timeout == 900 and built.poke_interval == 15
    assert built.fs_conn_id == "rtb_raw" and built.retries == 0


def test_training_publishes_the_model_asset(dagbag) -> None:
    outlets = dagbag.dags["train_pipeline"].get_task("training").outlets
    assert [asset.name for asset in outlets] == ["rtb_champion_model"]


START, END = "2026-11-30T21:00:00+00:00", "2026-11-30T23:00:00+00:00"
HOURS = [f"requests/date=2026-11-30/hour={h}" for h in (21, 22)]
PREDICT_PLAN = {
    "mode": "partitions",
    "kind": "predict",
    "interval": {"start": START, "end": END},
    "window_days": None,
    "wait_for": [f"{name}/_SUCCESS" for name in HOURS],
    "units": [{"name": name, "args": ["--partition", name]} for name in HOURS],
    "predict_args": [
        ["--partition", name, "--interval-start", START, "--interval-end", END] for name in HOURS
    ],
    "monitor_args": ["--interval-start", START, "--interval-end", END],
    "publish_args": ["--interval-start", START, "--interval-end", END],
}


def test_a_plan_becomes_one_command_per_partition(common) -> None:
    lines = ["2026-11-30 21:00:01,000 INFO rtb: planning", json.dumps(PREDICT_PLAN)]
    plan = common.read_plan(lines)
    units = common.units_from_plan(plan, run_id="scheduled__x")
    assert [u["make_dataset"] for u in units] == [
        ["make-dataset", "--partition", f"requests/date=2026-11-30/hour={h}", "--project-dir", "/project"]
        for h in (21, 22)
    ]
    assert units[1]["predicting"][:3] == ["predict", "--partition", "requests/date=2026-11-30/hour=22"]
    assert units[1]["predicting"][-4:] == ["--run-id", "scheduled__x", "--project-dir", "/project"]
    single = common.run_commands_from_plan(plan, run_id="scheduled__x")
    assert single["monitor"][0] == "monitor" and "--run-id" in single["monitor"]
    assert single["publish"] == ["publish", "--interval-start", START, "--interval-end", END,
                                 "--project-dir", "/project"]


def test_publishing_adds_a_networked_task_after_predicting(tmp_path_factory) -> None:
    """Only with RTB_PUBLISH_REDIS_URL set: `publish` after `predicting`, the one container on
    a network (the stack's, where its Redis is), with the URL, and models/ read-only."""
    env = HOST_ENV | {"RTB_PUBLISH_REDIS_URL": "redis://redis:6379/1",
                      "RTB_PUBLISH_TTL_SECONDS": "3600", "RTB_PUBLISH_NETWORK": "rtb-test_default"}
    with _parsed(tmp_path_factory, env) as bag:
        assert bag.import_errors == {}
        dag = bag.dags["predict_pipeline"]
        edges = {(task.task_id, down) for task in dag.tasks for down in task.downstream_task_ids}
        added = {("predicting", "publish"), ("commands", "publish")}
        assert edges == EXPECTED["predict_pipeline"]["edges"] | added
        publish = dag.get_task("publish")
        assert publish.network_mode == "rtb-test_default"
        assert publish.environment["RTB_PUBLISH_REDIS_URL"] == "redis://redis:6379/1"
        assert publish.environment["RTB_PUBLISH_TTL_SECONDS"] == "3600"
        assert [m["ReadOnly"] for m in publish.mounts if m["Target"].endswith("/models")] == [True]
        others = [task for task in _docker_tasks(dag) if task.task_id != "publish"]
        assert {task.task_id for task in others} == EXPECTED["predict_pipeline"]["docker"]
        for task in others:
            assert _setting(task, "network_mode") == "none", task.task_id
            assert "RTB_PUBLISH_REDIS_URL" not in _setting(task, "environment"), task.task_id


def test_the_single_file_mode_keeps_todays_commands(common) -> None:
    plan = {
        "mode": "files", "kind": "train", "interval": {"start": "", "end": "2026-12-01T06:00:00+00:00"},
        "window_days": None, "wait_for": ["training_data.csv.gz"],
        "units": [{"name": "train", "args": ["--split", "train"]}], "train_args": [],
    }
    (unit,) = common.units_from_plan(plan, run_id="manual__x")
    assert unit["make_dataset"] == ["make-dataset", "--split", "train", "--project-dir", "/project"]
    # The scored set's sidecar names its run (a scheduled run may score beside a manual one).
    assert unit["predicting"] == ["predict", "--run-id", "manual__x", "--project-dir", "/project"]
    single = common.run_commands_from_plan(plan, run_id="manual__x", trigger_reason="drift: campaignId")
    assert single["training"] == [
        "train", "--trigger-reason", "drift: campaignId", "--project-dir", "/project"
    ]
    with pytest.raises(Exception, match="printed no plan"):
        common.read_plan(["no json here"])


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_dag_files_import_only_airflow_docker_and_stdlib() -> None:
    files = sorted(DAGS_DIR.rglob("*.py"))
    assert files, f"no .py files under {DAGS_DIR}"
    allowed = {"airflow", "docker", "pipeline"} | set(sys.stdlib_module_names)
    for path in files:
        imported = _imported_modules(path)
        heavy = imported & FORBIDDEN_IMPORTS
        assert not heavy, f"{path.name} imports {heavy}"
        assert imported <= allowed, f"{path.name} imports {imported - allowed}"
