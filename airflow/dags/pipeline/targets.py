"""Where a stage's container runs: on a Docker engine, or as a pod on Kubernetes.

common.py describes a stage once, as DockerOperator settings (image, command, environment,
mounts, user, labels); this module turns that description into the operator of the chosen
target, so the DAG files are the same whichever it is. Settings, from the environment of the
Airflow services (docker-compose.yaml passes on the Docker ones; where Airflow itself runs on
Kubernetes, its deployment sets the others, e.g. the Helm chart's `env`):

- RTB_TASK_TARGET: `docker` (default) or `kubernetes`.
- RTB_DOCKER_URL: the engine DockerOperator talks to (default the host's, through the mounted
  socket, `unix://var/run/docker.sock`). A remote engine is `tcp://host:2376`, with
  RTB_DOCKER_TLS_CA / RTB_DOCKER_TLS_CERT / RTB_DOCKER_TLS_KEY (PEM files as the Airflow
  services see them; all three or none, since the provider silently drops TLS when one is
  missing) and RTB_DOCKER_TLS_VERIFY (default true: the engine's certificate must be signed
  by the CA). Bind-mount sources are then paths on *that* engine's host, so
  RTB_HOST_PROJECT_DIR must name the shared project folder as it is mounted there.
- RTB_K8S_NAMESPACE (default `rtb`), RTB_K8S_PROJECT_CLAIM (default `rtb-project`: the
  PersistentVolumeClaim that holds data/, models/ and reports/ at its root, e.g. on NFS),
  RTB_K8S_SERVICE_ACCOUNT (optional): for the `kubernetes` target. Its provider,
  apache-airflow-providers-cncf-kubernetes, is imported only when that target is chosen, so
  the docker target works without it.

A Celery worker that dies leaves its task's job container running on the engine. The next
try of that task instance stops it before starting its own (`stop_earlier_tries`), so two
containers of one task never write side by side. Pods need no such step: the
KubernetesPodOperator labels each pod with its task instance and, on the next try, reattaches
to a pod an earlier try left running instead of starting a second one (`durable`, its
default on Airflow 3.3).

Only Airflow, provider and docker-py constructs live here (DAG-folder rules).
"""

from __future__ import annotations

import json
import os
from typing import Any

TASK_TARGET = os.environ.get("RTB_TASK_TARGET", "docker")
TARGETS = ("docker", "kubernetes")
if TASK_TARGET not in TARGETS:
    raise ValueError(f"RTB_TASK_TARGET={TASK_TARGET!r}: expected one of {', '.join(TARGETS)}")

DOCKER_URL = os.environ.get("RTB_DOCKER_URL", "unix://var/run/docker.sock")
TLS_FILES = {"tls_ca_cert": "RTB_DOCKER_TLS_CA", "tls_client_cert": "RTB_DOCKER_TLS_CERT",
             "tls_client_key": "RTB_DOCKER_TLS_KEY"}

K8S_NAMESPACE = os.environ.get("RTB_K8S_NAMESPACE", "rtb")
K8S_PROJECT_CLAIM = os.environ.get("RTB_K8S_PROJECT_CLAIM", "rtb-project")
K8S_SERVICE_ACCOUNT = os.environ.get("RTB_K8S_SERVICE_ACCOUNT") or None
PROJECT_VOLUME = "project"

# Labels that tie a job container to its task instance and try (set when the try starts).
TASK_INSTANCE_LABEL = "rtb-pipeline.task-instance"
TRY_LABEL = "rtb-pipeline.try"

# Requests and limits per stage on Kubernetes, from what the stages peaked at on the full
# 3.7M-row files (README, "Measured"): training 1.5 GB on 2 cores, predicting 1.2 GB; the
# per-partition stages and the plan far less. A limit is set on memory only: a CPU limit
# throttles, a memory overrun should fail the try visibly (OOMKilled) and be retried.
STAGE_RESOURCES: dict[str, dict[str, dict[str, str]]] = {
    "training": {"requests": {"cpu": "2", "memory": "2Gi"}, "limits": {"memory": "4Gi"}},
    "predicting": {"requests": {"cpu": "1", "memory": "1536Mi"}, "limits": {"memory": "3Gi"}},
}
DEFAULT_RESOURCES = {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}

# DockerOperator settings that have no per-pod meaning: the engine, its tmp mount, container
# removal (pods are deleted by the operator), pulling (the pod's pull policy), and the network
# (`none` on Docker; on Kubernetes a NetworkPolicy of the namespace denies the pods' egress).
DOCKER_ONLY = {"docker_url", *TLS_FILES, "tls_verify", "network_mode", "mount_tmp_dir",
               "auto_remove", "force_pull", "xcom_all"}

# A stage that answers through XCom prints one JSON line on stdout (logs go to stderr). A pod's
# XCom is the file /airflow/xcom/return.json, read by the operator's sidecar: written whole
# (temp name, then rename) and only if the command succeeded; its stdout still reaches the log.
XCOM_FILE = "/airflow/xcom/return.json"
XCOM_SCRIPT = f'set -e; out={XCOM_FILE}; rtb "$@" > "$out.tmp"; cat "$out.tmp"; mv "$out.tmp" "$out"'


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no"):
        return False
    raise ValueError(f"{name}={value!r}: expected true or false")


def docker_engine() -> dict[str, Any]:
    """DockerOperator's engine settings: the URL and, for a remote engine, its TLS files."""
    files = {arg: os.environ.get(name) or None for arg, name in TLS_FILES.items()}
    settings: dict[str, Any] = {"docker_url": DOCKER_URL}
    if not any(files.values()):
        return settings
    missing = [TLS_FILES[arg] for arg, path in files.items() if path is None]
    if missing:
        raise ValueError(f"TLS to the Docker engine needs {', '.join(TLS_FILES.values())}; "
                         f"{', '.join(missing)} not set (the provider would connect without TLS)")
    if not DOCKER_URL.startswith(("tcp://", "https://")):
        raise ValueError(f"RTB_DOCKER_URL={DOCKER_URL!r}: TLS settings need a tcp:// or https:// URL")
    return settings | files | {"tls_verify": _flag("RTB_DOCKER_TLS_VERIFY", True)}


def task_instance_key(ti: Any) -> str:
    """One value per task instance (all its tries): DAG, task, run and map index (-1 when the
    task is not mapped, as the REST API reports it)."""
    map_index = -1 if ti.map_index is None else ti.map_index
    return f"{ti.dag_id}.{ti.task_id}.{ti.run_id}.{map_index}"


def stop_earlier_tries(context: Any) -> None:
    """Before a try's container starts: label it with its task instance and try, and stop any
    container of an earlier try of the same task instance that is still running.

    Such a container outlived its try: the worker that ran it died (the scheduler failed the
    try after its heartbeat timeout), so nothing waits for it, yet it would go on writing
    beside this try. It is stopped, not removed: `docker logs` still show what it did, and
    `sh run.sh down` removes it with the other containers of failed tries.
    """
    task, ti = context["task"], context["ti"]
    key = task_instance_key(ti)
    task.labels = {**(task.labels or {}), TASK_INSTANCE_LABEL: key, TRY_LABEL: str(ti.try_number)}
    if ti.try_number <= 1:
        return
    running = task.cli.containers(filters={"label": f"{TASK_INSTANCE_LABEL}={key}", "status": "running"})
    for container in running:
        task.cli.stop(container["Id"], timeout=10)
        task.log.warning("stopped container %s of try %s of this task, still running from a worker "
                         "that died (it is kept for docker logs until `sh run.sh down`)",
                         container["Id"][:12], container.get("Labels", {}).get(TRY_LABEL, "?"))


def pod_settings(task_id: str, docker: dict[str, Any]) -> dict[str, Any]:
    """KubernetesPodOperator settings for the stage that `docker` describes for DockerOperator.

    The same image, command, environment and labels; the host's bind mounts become sub-paths of
    one PersistentVolumeClaim, the `uid:gid` user the pod's security context, and XCom the
    operator's sidecar. Pod-level fields are written as a pod template in the API's own
    (camelCase) form, which the operator merges with what it sets itself.
    """
    unknown = set(docker) - DOCKER_ONLY - {"image", "environment", "mounts", "user", "labels",
                                           "do_xcom_push"}
    if unknown:
        raise ValueError(f"{task_id}: no Kubernetes translation for {sorted(unknown)} "
                         "(add one in pipeline/targets.py)")
    uid, _, gid = str(docker["user"]).partition(":")
    volume_mounts = [
        {"name": PROJECT_VOLUME, "mountPath": mount["Target"],
         "subPath": mount["Target"].rsplit("/", 1)[-1], "readOnly": bool(mount.get("ReadOnly"))}
        for mount in docker["mounts"]
    ]
    template = {
        "apiVersion": "v1",
        "kind": "Pod",
        "spec": {
            "securityContext": {"runAsUser": int(uid), "runAsGroup": int(gid or uid),
                                "runAsNonRoot": int(uid) != 0},
            "containers": [{
                "name": "base",
                "resources": STAGE_RESOURCES.get(task_id, DEFAULT_RESOURCES),
                "volumeMounts": volume_mounts,
                "securityContext": {"allowPrivilegeEscalation": False,
                                    "capabilities": {"drop": ["ALL"]}},
            }],
            "volumes": [{"name": PROJECT_VOLUME,
                         "persistentVolumeClaim": {"claimName": K8S_PROJECT_CLAIM}}],
        },
    }
    xcom = bool(docker.get("do_xcom_push"))
    return {
        "image": docker["image"],
        # The image's entrypoint is `rtb`; an XCom stage runs it through the script above.
        "cmds": ["sh", "-c", XCOM_SCRIPT, "rtb"] if xcom else None,
        "env_vars": dict(docker.get("environment") or {}),
        "labels": dict(docker.get("labels") or {}),
        "namespace": K8S_NAMESPACE,
        "service_account_name": K8S_SERVICE_ACCOUNT,
        "pod_template_dict": template,
        "image_pull_policy": "IfNotPresent",
        "do_xcom_push": xcom,
        "get_logs": True,
        "on_finish_action": "delete_succeeded_pod",
    }


if TASK_TARGET == "kubernetes":
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    class RtbPodOperator(KubernetesPodOperator):
        """A KubernetesPodOperator that takes the stage's `rtb` arguments as `command`, as the
        DockerOperator does (the DAGs expand `command=`), and hands its XCom on in the shape
        DockerOperator's `xcom_all` gives: a list of lines, of which the reader takes the
        last JSON one."""

        def __init__(self, *, command: Any = None, **kwargs: Any) -> None:
            super().__init__(arguments=command, **kwargs)

        def extract_xcom(self, pod: Any, **kwargs: Any) -> Any:
            value = super().extract_xcom(pod, **kwargs)
            return None if value is None else [json.dumps(value)]


def stage_operator(docker_class: type, *, task_id: str, settings: dict[str, Any], **extra: Any) -> Any:
    """The stage's operator on the chosen target: `docker_class` (common.py's DockerOperator)
    with the try cleanup, or a pod. `settings` is the stage as job_settings() describes it;
    `extra` (command, outlets, retries...) goes to the operator as it is."""
    if TASK_TARGET == "kubernetes":
        return RtbPodOperator(task_id=task_id, **pod_settings(task_id, settings), **extra)
    return docker_class(task_id=task_id, pre_execute=stop_earlier_tries, **settings, **extra)


def stage_partial(docker_class: type, *, task_id: str, settings: dict[str, Any]) -> Any:
    """`stage_operator` for a mapped stage: the operator's `.partial()`, to `.expand(command=)`."""
    if TASK_TARGET == "kubernetes":
        return RtbPodOperator.partial(task_id=task_id, **pod_settings(task_id, settings))
    return docker_class.partial(task_id=task_id, pre_execute=stop_earlier_tries, **settings)
