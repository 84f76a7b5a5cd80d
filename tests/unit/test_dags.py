"""The DAG files parse, and say what the pipeline contract says: tasks, edges, schedules, and
DockerOperator settings that make sibling containers work on the host's engine.

Parses airflow/dags the way the dag-processor does (a bundle DagBag), with the environment
docker-compose.yaml gives the Airflow services. Needs apache-airflow and the docker provider in
the venv; importing Airflow takes a few seconds.
"""

from __future__ import annotations

import ast
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
}

EXPECTED = {
    "train_pipeline": {
        "schedule": "0 6 * * *",
        "commands": {
            "make_dataset": ["make-dataset", "--split", "train"],
            "preprocessing": ["preprocess", "--split", "train"],
            "training": ["train"],
        },
        "edges": {("make_dataset", "preprocessing"), ("preprocessing", "training")},
    },
    "predict_pipeline": {
        "schedule": "@hourly",
        "commands": {
            "check_model": ["check-model"],
            "make_dataset": ["make-dataset", "--split", "test"],
            "preprocessing": ["preprocess", "--split", "test"],
            "predicting": ["predict"],
        },
        "edges": {
            ("check_model", "make_dataset"),
            ("make_dataset", "preprocessing"),
            ("preprocessing", "predicting"),
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
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_HOME", str(tmp_path_factory.mktemp("airflow_home")))
        mp.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "false")
        mp.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(DAGS_DIR))
        for name, value in HOST_ENV.items():
            mp.setenv(name, value)
        # The DAG files read the environment at import; drop a copy cached by another test.
        for module in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
            mp.delitem(sys.modules, module)
        from airflow.dag_processing.dagbag import BundleDagBag

        yield BundleDagBag(dag_folder=DAGS_DIR, bundle_path=DAGS_DIR)


def test_dag_files_import_without_errors(dagbag) -> None:
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == set(EXPECTED)


@pytest.mark.parametrize("dag_id", sorted(EXPECTED))
def test_tasks_and_edges(dagbag, dag_id: str) -> None:
    dag = dagbag.dags[dag_id]
    expected = EXPECTED[dag_id]
    assert set(dag.task_ids) == set(expected["commands"])
    edges = {(task.task_id, down) for task in dag.tasks for down in task.downstream_task_ids}
    assert edges == expected["edges"]


@pytest.mark.parametrize("dag_id", sorted(EXPECTED))
def test_schedule_and_run_settings(dagbag, dag_id: str) -> None:
    dag = dagbag.dags[dag_id]
    assert dag.schedule == EXPECTED[dag_id]["schedule"]
    assert dag.catchup is False
    assert dag.max_active_runs == 1
    assert dag.doc_md and dag_id in dag.doc_md
    assert "rtb" in dag.tags
    for task in dag.tasks:
        assert task.retries == 2
        assert task.retry_delay.total_seconds() == 30


@pytest.mark.parametrize("dag_id", sorted(EXPECTED))
def test_every_task_is_a_sibling_container_of_the_job_image(dagbag, dag_id: str) -> None:
    from airflow.providers.docker.operators.docker import DockerOperator

    dag = dagbag.dags[dag_id]
    for task in dag.tasks:
        assert isinstance(task, DockerOperator), task.task_id
        assert task.image == HOST_ENV["RTB_JOB_IMAGE"]
        assert task.command == [
            *EXPECTED[dag_id]["commands"][task.task_id],
            "--project-dir",
            "/project",
        ]
        assert task.mount_tmp_dir is False
        assert task.auto_remove == "success"
        assert task.network_mode == "none"
        assert task.docker_url == "unix://var/run/docker.sock"
        assert task.user == "1234:5678"
        assert task.environment == {"RTB_PROJECT_DIR": "/project"}
        assert task.do_xcom_push is False
        assert task.labels == {"rtb-pipeline.stack": "rtb-test", "rtb-pipeline.task": task.task_id}


@pytest.mark.parametrize("dag_id", sorted(EXPECTED))
def test_mounts_are_host_paths(dagbag, dag_id: str) -> None:
    """Bind-mount sources are resolved by the host's engine: they must be host paths."""
    dag = dagbag.dags[dag_id]
    host = HOST_ENV["RTB_HOST_PROJECT_DIR"]
    for task in dag.tasks:
        mounts = {m["Target"]: m for m in task.mounts}
        assert set(mounts) == {"/project/data", "/project/models", "/project/reports"}
        for target, mount in mounts.items():
            assert mount["Type"] == "bind"
            assert mount["Source"] == host + target.removeprefix("/project")
        # Predicting must never be able to change a model.
        assert mounts["/project/models"]["ReadOnly"] is (dag_id == "predict_pipeline")


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
