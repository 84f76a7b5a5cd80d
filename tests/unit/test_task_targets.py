"""Where the stages run (airflow/dags/pipeline/targets.py): the same DAG files emit
KubernetesPodOperator pods with RTB_TASK_TARGET=kubernetes, DockerOperator containers on a
remote engine over TLS with RTB_DOCKER_URL + RTB_DOCKER_TLS_*, and a retry stops the job
container that a dead worker's try left running.

No Kubernetes cluster runs here: the pods are rendered as the operator would send them
(`build_pod_request_obj(dry_run=True)`, `dry_run()`), then checked field by field and
validated offline against the Kubernetes client's models (required fields, and a lossless
round trip through V1Pod, which drops any field the API does not know). What a cluster would
still check (admission, quotas, the PVC existing) cannot be checked without one.

The last test needs the Docker engine (skipped without it).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DAGS_DIR = REPO / "airflow" / "dags"

HOST_ENV = {
    "RTB_JOB_IMAGE": "registry.example.com/rtb/rtb-pipeline-job:1.4.0",
    "RTB_HOST_PROJECT_DIR": "/home/someone/rtb-pipeline",
    "RTB_HOST_UID": "1234",
    "RTB_HOST_GID": "5678",
    "RTB_TASK_RETRIES": "2",
    "RTB_STACK": "rtb-test",
    "RTB_TRAIN_WINDOW_DAYS": "5",
}
K8S_ENV = {**HOST_ENV, "RTB_TASK_TARGET": "kubernetes", "RTB_K8S_NAMESPACE": "rtb-test",
           "RTB_K8S_PROJECT_CLAIM": "rtb-project-nfs"}
SETTINGS = ("RTB_TASK_TARGET", "RTB_DOCKER_URL", "RTB_DOCKER_TLS_CA", "RTB_DOCKER_TLS_CERT",
            "RTB_DOCKER_TLS_KEY", "RTB_DOCKER_TLS_VERIFY", "RTB_K8S_NAMESPACE",
            "RTB_K8S_PROJECT_CLAIM", "RTB_K8S_SERVICE_ACCOUNT")

# Kubernetes' own syntax rules (apimachinery validation): names, label keys and values,
# environment variable names, resource quantities.
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")


def _drop_pipeline_modules(mp: pytest.MonkeyPatch) -> None:
    """The DAG modules read the environment at import: drop copies cached by another test."""
    for module in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
        mp.delitem(sys.modules, module)


def _set_env(mp: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    for name in SETTINGS:
        mp.delenv(name, raising=False)
    for name, value in env.items():
        mp.setenv(name, value)


def _dagbag(mp: pytest.MonkeyPatch, home: Path, env: dict[str, str]):
    mp.setenv("AIRFLOW_HOME", str(home))
    mp.setenv("AIRFLOW__CORE__LOAD_EXAMPLES", "false")
    mp.setenv("AIRFLOW__CORE__DAGS_FOLDER", str(DAGS_DIR))
    _set_env(mp, env)
    _drop_pipeline_modules(mp)
    from airflow.dag_processing.dagbag import BundleDagBag

    return BundleDagBag(dag_folder=DAGS_DIR, bundle_path=DAGS_DIR)


@pytest.fixture(scope="module")
def k8s(tmp_path_factory: pytest.TempPathFactory):
    """The DAG files parsed with RTB_TASK_TARGET=kubernetes, and the modules they imported."""
    with pytest.MonkeyPatch.context() as mp:
        bag = _dagbag(mp, tmp_path_factory.mktemp("airflow_home"), K8S_ENV)
        yield SimpleNamespace(bag=bag, common=sys.modules["pipeline.common"],
                              targets=sys.modules["pipeline.targets"])


@pytest.fixture(scope="module")
def docker_bag(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        yield _dagbag(mp, tmp_path_factory.mktemp("airflow_home"), HOST_ENV)


def _load(mp: pytest.MonkeyPatch, env: dict[str, str]):
    """pipeline.common imported afresh with `env` (as the dag-processor would)."""
    _set_env(mp, env)
    _drop_pipeline_modules(mp)
    mp.syspath_prepend(str(DAGS_DIR))
    import pipeline.common

    return pipeline.common


def _is_mapped(task) -> bool:
    return type(task).__name__ == "MappedOperator"


def _stage_ids(dag, operator_class: type) -> set[str]:
    return {t.task_id for t in dag.tasks if issubclass(getattr(t, "operator_class", type(t)), operator_class)}


def _render(task, command: list[str] | None = None) -> dict:
    """The pod the operator would create, in the API's JSON form, validated offline.

    A mapped task is unmapped with `command` (what .expand() gives one instance); a task whose
    command comes from XCom gets `command` as its rendered arguments."""
    from kubernetes.client import ApiClient

    if _is_mapped(task):
        task = task.unmap({"command": command})
    elif command is not None:
        task = copy.copy(task)
        task.arguments = command
    pod = ApiClient().sanitize_for_serialization(task.build_pod_request_obj(dry_run=True))
    _validate(pod)
    return pod


def _validate(pod: dict) -> None:
    """Offline validation: the client's models accept the pod (required fields present, types
    right) and give it back unchanged (no field the API does not know, e.g. a misspelt key),
    and names, labels, env names and quantities follow Kubernetes' syntax."""
    from kubernetes.client import ApiClient, V1Pod

    client = ApiClient()
    model = client._ApiClient__deserialize(copy.deepcopy(pod), V1Pod)  # the client's own decoder
    assert client.sanitize_for_serialization(model) == pod
    name = pod["metadata"]["name"]
    assert len(name) <= 63 and DNS_LABEL.match(name), name
    assert DNS_LABEL.match(pod["metadata"]["namespace"])
    for key, value in pod["metadata"]["labels"].items():
        assert len(key) <= 63 and LABEL_NAME.match(key), key
        assert len(value) <= 63 and (value == "" or LABEL_NAME.match(value)), (key, value)
    for container in pod["spec"]["containers"]:
        assert DNS_LABEL.match(container["name"])
        assert all(ENV_NAME.match(env["name"]) for env in container.get("env", []))
        for kind in ("requests", "limits"):
            for resource, quantity in container.get("resources", {}).get(kind, {}).items():
                assert QUANTITY.match(quantity), (resource, quantity)
        mounts = {m["name"] for m in container.get("volumeMounts", [])}
        assert mounts <= {v["name"] for v in pod["spec"]["volumes"]}, mounts


def _base(pod: dict) -> dict:
    (base,) = [c for c in pod["spec"]["containers"] if c["name"] == "base"]
    return base


def _mounts(container: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in container["volumeMounts"]}


def test_the_dags_emit_pods_with_the_same_tasks_and_edges(k8s, docker_bag) -> None:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from airflow.providers.docker.operators.docker import DockerOperator

    assert k8s.bag.import_errors == {} and docker_bag.import_errors == {}
    assert set(k8s.bag.dag_ids) == set(docker_bag.dag_ids) == {"train_pipeline", "predict_pipeline"}
    for dag_id, dag in k8s.bag.dags.items():
        docker_dag = docker_bag.dags[dag_id]
        edges = {(t.task_id, down) for t in dag.tasks for down in t.downstream_task_ids}
        assert edges == {(t.task_id, down) for t in docker_dag.tasks for down in t.downstream_task_ids}
        stages = _stage_ids(docker_dag, DockerOperator)
        assert stages and _stage_ids(dag, KubernetesPodOperator) == stages
        assert not _stage_ids(dag, DockerOperator)
        mapped = {t.task_id for t in dag.tasks if _is_mapped(t)}
        assert mapped & stages and mapped == {t.task_id for t in docker_dag.tasks if _is_mapped(t)}


def _docker_setting(task, name: str):
    """A DockerOperator task's setting, also for a mapped task (kept in its partial kwargs)."""
    return getattr(task, "partial_kwargs", {}).get(name, getattr(task, name, None))


def test_a_stage_pod_runs_the_job_image_as_the_host_user_on_the_project_claim(k8s, docker_bag) -> None:
    pod = _render(k8s.bag.dags["predict_pipeline"].get_task("check_model"))
    docker_task = docker_bag.dags["predict_pipeline"].get_task("check_model")
    assert pod["metadata"]["namespace"] == "rtb-test"
    assert pod["metadata"]["name"].startswith("check-model-")
    assert {"rtb-pipeline.stack": "rtb-test", "rtb-pipeline.task": "check_model"}.items() \
        <= pod["metadata"]["labels"].items()
    spec = pod["spec"]
    assert spec["restartPolicy"] == "Never"
    assert [c["name"] for c in spec["containers"]] == ["base"]  # no XCom: no sidecar
    base = _base(pod)
    assert base["image"] == HOST_ENV["RTB_JOB_IMAGE"]
    assert base["imagePullPolicy"] == "IfNotPresent"
    # The image's entrypoint (`rtb`) with the stage's arguments.
    assert not base.get("command")
    assert base["args"] == ["check-model", "--project-dir", "/project"]
    # The environment the Docker target gives the same stage.
    env = {e["name"]: e["value"] for e in base["env"]}
    assert env == _docker_setting(docker_task, "environment")
    assert {"RTB_PROJECT_DIR": "/project", "RTB_TRAIN_WINDOW_DAYS": "5"}.items() <= env.items()
    assert base["resources"] == {"requests": {"cpu": "500m", "memory": "512Mi"},
                                 "limits": {"memory": "2Gi"}}
    # The host's uid and gid, as with `docker run --user 1234:5678`, and no privileges.
    assert spec["securityContext"] == {"runAsUser": 1234, "runAsGroup": 5678, "runAsNonRoot": True}
    assert base["securityContext"] == {"allowPrivilegeEscalation": False,
                                       "capabilities": {"drop": ["ALL"]}}
    # data/, models/ and reports/ of one claim where the bind mounts were; predicting never
    # writes a model.
    assert spec["volumes"] == [{"name": "project",
                                "persistentVolumeClaim": {"claimName": "rtb-project-nfs"}}]
    assert _mounts(base) == {
        f"/project/{sub}": {"name": "project", "mountPath": f"/project/{sub}", "subPath": sub,
                            "readOnly": sub == "models"}
        for sub in ("data", "models", "reports")
    }


def test_a_mapped_stage_renders_one_pod_per_unit_of_the_plan(k8s) -> None:
    dag = k8s.bag.dags["predict_pipeline"]
    name = "requests/date=2026-11-30/hour=21"
    plan = {"mode": "partitions", "kind": "predict", "units": [{"name": name, "args": ["--partition", name]}],
            "predict_args": [["--partition", name, "--interval-start", "2026-11-30T21:00:00+00:00"]]}
    (unit,) = k8s.common.units_from_plan(plan, run_id="backfill__2026-11-30T21:00:00+00:00")
    for task_id, resources in (("make_dataset", None), ("predicting", "1536Mi")):
        pod = _render(dag.get_task(task_id), unit[task_id])
        base = _base(pod)
        assert base["args"] == unit[task_id]
        assert base["args"][1:3] == ["--partition", name]
        assert base["image"] == HOST_ENV["RTB_JOB_IMAGE"]
        assert pod["spec"]["securityContext"]["runAsUser"] == 1234
        assert _mounts(base)["/project/models"]["readOnly"] is True
        if resources:
            assert base["resources"]["requests"]["memory"] == resources


def test_training_gets_its_measured_resources_and_a_writable_models_folder(k8s) -> None:
    train = k8s.bag.dags["train_pipeline"]
    command = k8s.common.with_project("train", "--partition", "labelled/date=2026-11-29")
    base = _base(_render(train.get_task("training"), command))
    assert base["resources"] == {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"memory": "4Gi"}}
    assert base["args"] == command
    assert _mounts(base)["/project/models"]["readOnly"] is False


def test_the_plan_answers_through_the_xcom_sidecar(k8s) -> None:
    task = k8s.bag.dags["predict_pipeline"].get_task("plan")
    assert task.do_xcom_push is True
    pod = _render(task)
    base = _base(pod)
    assert base["command"] == ["sh", "-c", k8s.targets.XCOM_SCRIPT, "rtb"]
    assert base["args"][:2] == ["plan", "predict"] and base["args"][-2:] == ["--project-dir", "/project"]
    # The interval is still a template here; Airflow renders it when the try starts.
    assert "data_interval_start" in base["args"][base["args"].index("--start") + 1]
    assert "/airflow/xcom" in _mounts(base)
    assert "airflow-xcom-sidecar" in [c["name"] for c in pod["spec"]["containers"]]


def test_dry_run_prints_the_pod_without_a_cluster(k8s, capsys: pytest.CaptureFixture) -> None:
    k8s.bag.dags["train_pipeline"].get_task("plan").dry_run()
    out = capsys.readouterr().out  # after the operator's own log line
    printed = yaml.safe_load(out[out.index("api_version:"):])
    container = printed["spec"]["containers"][0]
    assert container["args"][:2] == ["plan", "train"]
    assert container["image"] == HOST_ENV["RTB_JOB_IMAGE"]
    volumes = {v["name"]: v for v in printed["spec"]["volumes"]}
    assert volumes["project"]["persistent_volume_claim"]["claim_name"] == "rtb-project-nfs"
    assert printed["spec"]["security_context"]["run_as_user"] == 1234


def test_the_xcom_script_hands_the_plan_on_whole(k8s, tmp_path: Path) -> None:
    """The pod's XCom script with the real `rtb plan`: the file holds the plan, which reaches
    read_plan in the shape DockerOperator gives; a failing command leaves no file."""
    rtb = shutil.which("rtb", path=str(Path(sys.executable).parent))
    assert rtb, "the rtb CLI is not installed in this venv"
    out = tmp_path / "xcom" / "return.json"
    out.parent.mkdir()
    (tmp_path / "project" / "data" / "raw").mkdir(parents=True)
    script = k8s.targets.XCOM_SCRIPT.replace(k8s.targets.XCOM_FILE, str(out))
    env = {**os.environ, "PATH": f"{Path(rtb).parent}:{os.environ['PATH']}"}
    args = ["plan", "predict", "--start", "", "--end", "2026-12-01T06:00:00+00:00",
            "--project-dir", str(tmp_path / "project")]
    done = subprocess.run(["sh", "-c", script, "rtb", *args], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    plan = json.loads(out.read_text())
    assert json.loads(done.stdout) == plan  # the line still reaches the task log
    assert plan["kind"] == "predict" and plan["units"]

    operator = k8s.targets.RtbPodOperator(task_id="probe", image="x", command=["plan"])
    operator.pod_manager = SimpleNamespace(extract_xcom=lambda pod, **_: out.read_text())
    assert k8s.common.read_plan(operator.extract_xcom(None)) == plan

    out.unlink()
    failed = subprocess.run(["sh", "-c", script, "rtb", "plan", "predict", "--project-dir", str(tmp_path)],
                            env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and not out.exists()


def test_a_remote_engine_over_tls(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    files = {}
    for name in ("ca", "cert", "key"):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_text("PEM\n")
    common = _load(monkeypatch, {**HOST_ENV, "RTB_DOCKER_URL": "tcp://docker.example.com:2376",
                                 "RTB_DOCKER_TLS_CA": str(files["ca"]),
                                 "RTB_DOCKER_TLS_CERT": str(files["cert"]),
                                 "RTB_DOCKER_TLS_KEY": str(files["key"])})
    task = common.rtb_task("check_model", "check-model")
    assert task.docker_url == "tcp://docker.example.com:2376"
    assert (task.tls_ca_cert, task.tls_client_cert, task.tls_client_key) == tuple(
        str(files[n]) for n in ("ca", "cert", "key"))
    assert task.tls_verify is True
    from airflow.providers.docker.hooks.docker import DockerHook

    tls = DockerHook.construct_tls_config(ca_cert=task.tls_ca_cert, client_cert=task.tls_client_cert,
                                          client_key=task.tls_client_key, verify=task.tls_verify)
    assert tls.cert == (str(files["cert"]), str(files["key"]))
    assert tls.ca_cert == str(files["ca"]) and tls.verify is True
    # The engine's own host resolves the bind mounts: still the (shared) project folder.
    assert {m["Source"] for m in task.mounts} == {f"{HOST_ENV['RTB_HOST_PROJECT_DIR']}/{sub}"
                                                  for sub in ("data", "models", "reports")}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"RTB_DOCKER_URL": "tcp://h:2376", "RTB_DOCKER_TLS_CA": "/ca.pem"},
         "RTB_DOCKER_TLS_CERT, RTB_DOCKER_TLS_KEY not set"),
        ({"RTB_DOCKER_TLS_CA": "/ca.pem", "RTB_DOCKER_TLS_CERT": "/c.pem", "RTB_DOCKER_TLS_KEY": "/k.pem"},
         "TLS settings need a tcp:// or https:// URL"),
        ({"RTB_DOCKER_URL": "tcp://h:2376", "RTB_DOCKER_TLS_CA": "/ca.pem", "RTB_DOCKER_TLS_CERT": "/c.pem",
          "RTB_DOCKER_TLS_KEY": "/k.pem", "RTB_DOCKER_TLS_VERIFY": "maybe"},
         "RTB_DOCKER_TLS_VERIFY='maybe': expected true or false"),
        ({"RTB_TASK_TARGET": "swarm"}, "RTB_TASK_TARGET='swarm': expected one of docker, kubernetes"),
    ],
)
def test_settings_that_cannot_work_fail_the_dag_import(monkeypatch, env, message) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        common = _load(monkeypatch, {**HOST_ENV, **env})
        common.rtb_task("check_model", "check-model")


def test_the_docker_target_needs_no_kubernetes_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = [m for m in sys.modules if m.startswith("airflow.providers.cncf")]
    for name in {*provider, "airflow.providers.cncf"}:
        monkeypatch.setitem(sys.modules, name, None)  # importing it now fails
    with pytest.raises(ImportError):
        import airflow.providers.cncf.kubernetes.operators.pod  # noqa: F401
    common = _load(monkeypatch, HOST_ENV)
    task = common.rtb_task("check_model", "check-model")
    assert type(task).__name__ == "RtbJobOperator" and task.docker_url == "unix://var/run/docker.sock"
    assert not hasattr(sys.modules["pipeline.targets"], "RtbPodOperator")


def _docker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)


def test_a_retry_stops_the_container_an_earlier_try_left_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real engine: a container of try 1 still runs (its worker died); try 2's pre-execute step
    stops it and labels its own, and leaves another task instance's container alone."""
    image = os.environ.get("BASE_IMAGE", "python:3.11-slim-bookworm")
    # Outside CI a machine without Docker skips this test; CI must run it.
    give_up = pytest.fail if os.environ.get("CI", "").lower() in ("1", "true", "yes") else pytest.skip
    if shutil.which("docker") is None or _docker("info").returncode != 0:
        give_up("needs the Docker engine")
    if _docker("image", "inspect", image).returncode != 0:
        give_up(f"needs the image {image} (BASE_IMAGE)")
    common = _load(monkeypatch, {**HOST_ENV, "RTB_STACK": f"rtb-targets-{uuid.uuid4().hex[:8]}"})
    targets = sys.modules["pipeline.targets"]
    task = common.rtb_task("make_dataset", "make-dataset")
    run_id = f"manual__{uuid.uuid4().hex[:8]}"
    ti = SimpleNamespace(dag_id="predict_pipeline", task_id="make_dataset", run_id=run_id, map_index=3,
                         try_number=1)
    other = SimpleNamespace(**{**vars(ti), "map_index": 4})
    started = []
    try:
        for instance in (ti, other):
            key = targets.task_instance_key(instance)
            labels = {targets.TASK_INSTANCE_LABEL: key, targets.TRY_LABEL: "1",
                      "rtb-pipeline.stack": common.STACK}
            done = _docker("run", "-d", *[f"--label={k}={v}" for k, v in labels.items()],
                           "--network", "none", image, "sleep", "300")
            assert done.returncode == 0, done.stderr
            started.append(done.stdout.strip())

        def running(container: str) -> bool:
            return _docker("inspect", "-f", "{{.State.Running}}", container).stdout.strip() == "true"

        task._pre_execute_hook({"task": task, "ti": ti})  # try 1: nothing earlier to stop
        assert running(started[0]) and running(started[1])
        ti.try_number = 2
        task._pre_execute_hook({"task": task, "ti": ti})
        assert not running(started[0]), "try 1's container still runs beside try 2"
        assert running(started[1]), "another map index's container was stopped"
        assert task.labels[targets.TASK_INSTANCE_LABEL] == f"predict_pipeline.make_dataset.{run_id}.3"
        assert task.labels[targets.TRY_LABEL] == "2"
        assert task.labels["rtb-pipeline.task"] == "make_dataset"
    finally:
        if started:
            _docker("rm", "-f", *started)


def test_an_unmapped_task_instance_key_matches_the_rest_apis_map_index(monkeypatch) -> None:
    """The task runner may give an unmapped task map_index None, the REST API says -1: the
    label must be the same either way, or a retry would not find the earlier try's container."""
    _load(monkeypatch, HOST_ENV)
    targets = sys.modules["pipeline.targets"]
    ti = SimpleNamespace(dag_id="train_pipeline", task_id="training", run_id="manual__x", map_index=None)
    assert targets.task_instance_key(ti) == "train_pipeline.training.manual__x.-1"
    assert targets.task_instance_key(SimpleNamespace(**{**vars(ti), "map_index": -1})) == \
        targets.task_instance_key(ti)
