"""What both pipeline DAGs share: the job image, the host mounts and the task factory.

Every task runs one `rtb` command in a fresh container of the job image, started by the
host's Docker engine through the mounted socket (a sibling container, not Docker-in-Docker).
So this module holds only Airflow and docker-py constructs; pandas, sklearn and the model code
live in the image.

Settings come from the environment that docker-compose.yaml gives every Airflow service
(run.sh writes the per-install values to .env.local):

- RTB_JOB_IMAGE: the job image's tag.
- RTB_HOST_PROJECT_DIR: the project folder *on the host*. Bind-mount sources are resolved by
  the engine on the host, so a path inside the Airflow container would be wrong.
- RTB_HOST_UID / RTB_HOST_GID: tasks run as the user who started the stack, so the files
  they write in data/, models/ and reports/ belong to that user, not to root.
- RTB_TASK_RETRIES: retries for failures that may be transient (default 2).
- RTB_STACK: the compose project name, put on task containers as a label so that
  `sh run.sh down` can remove the containers that failed tasks leave behind.
- RTB_TASK_TARGET, RTB_DOCKER_URL, RTB_DOCKER_TLS_*, RTB_K8S_*: where the job containers run
  (this host's engine by default; a remote engine; or pods on Kubernetes): see targets.py.
- RTB_PARTITION_WAIT_SECONDS / RTB_PARTITION_POKE_SECONDS: how long a run waits for its raw
  partition's `_SUCCESS` marker (default an hour) and how often it looks (default 30 s).
- RTB_TRAIN_WINDOW_DAYS, RTB_RETENTION_DAYS, RTB_DRIFT_*, RTB_QUALITY_*,
  RTB_EXTRA_CANDIDATES: passed on to the job containers, which read them (see README,
  "Running over time" and "Models").

What a run works on is decided by `rtb plan` inside the job image (which partitions an
interval covers, or the single-file mode): it prints one JSON line, and the DAGs only turn it
into task arguments (`work_from_plan`). The partition layout itself is defined once, in the
image (`rtb.partitions`); the sensor waits for the marker paths the plan names.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any

from airflow.providers.docker.exceptions import DockerContainerFailedException
from airflow.providers.docker.operators.docker import DockerOperator
from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.providers.standard.sensors.filesystem import FileSensor
from airflow.sdk import Asset, ExceptionRetryPolicy, RetryAction, RetryRule, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException
from docker.types import Mount
from pipeline.targets import docker_engine, stage_operator, stage_partial

JOB_IMAGE = os.environ.get("RTB_JOB_IMAGE", "rtb-pipeline-job:latest")
HOST_PROJECT_DIR = os.environ.get("RTB_HOST_PROJECT_DIR", "/opt/rtb-pipeline")
HOST_USER = f"{os.environ.get('RTB_HOST_UID', '1000')}:{os.environ.get('RTB_HOST_GID', '1000')}"
STACK = os.environ.get("RTB_STACK", "rtb-pipeline")
# Publishing prediction sets to Redis is optional: set, predict_pipeline ends with `publish`.
PUBLISH_REDIS_URL = os.environ.get("RTB_PUBLISH_REDIS_URL", "")
PUBLISH_NETWORK = os.environ.get("RTB_PUBLISH_NETWORK", "bridge")
CONTAINER_PROJECT_DIR = "/project"
RAW_CONNECTION = "rtb_raw"  # an fs connection whose path is data/raw as Airflow's services see it
PARTITION_WAIT_SECONDS = int(os.environ.get("RTB_PARTITION_WAIT_SECONDS", "3600"))
PARTITION_POKE_SECONDS = int(os.environ.get("RTB_PARTITION_POKE_SECONDS", "30"))
# Settings the job containers read; the DAGs only pass them through.
JOB_SETTINGS = ("RTB_TRAIN_WINDOW_DAYS", "RTB_RETENTION_DAYS", "RTB_DRIFT_PSI",
                "RTB_DRIFT_UNSEEN_SHARE", "RTB_DRIFT_MIN_ROWS", "RTB_QUALITY_CALIBRATION_LOW",
                "RTB_QUALITY_CALIBRATION_HIGH", "RTB_EXTRA_CANDIDATES")
PUBLISH_SETTINGS = ("RTB_PUBLISH_REDIS_URL", "RTB_PUBLISH_TTL_SECONDS")

# The promoted model: train_pipeline's training task updates it (or leaves it as it was).
MODEL_ASSET = Asset(name="rtb_champion_model", uri="file:///project/models/champion.yaml")

# A run's interval as `rtb plan` takes it. Scheduled and backfilled runs have a data interval;
# a run triggered with no logical date (the UI's default, `sh run.sh train`) has none, and then
# plans from its `run_after`: the schedule period that ended last.
INTERVAL_ARGS = (
    "--start", "{{ data_interval_start if data_interval_start is defined else '' }}",
    "--end", "{{ data_interval_end if data_interval_end is defined else dag_run.run_after }}",
)

# The one line `rtb` prints on stderr for an error that a retry cannot fix (bad input, no
# model): the CLI contract's `rtb: error: ...`.
RTB_ERROR_PREFIX = "rtb: error:"

DEFAULT_ARGS: dict[str, Any] = {
    "owner": "rtb",
    "retries": int(os.environ.get("RTB_TASK_RETRIES", "2")),
    "retry_delay": timedelta(seconds=30),
    "execution_timeout": timedelta(hours=2),
}


class RtbUserError(SystemExit):
    """The container ended with an `rtb: error:` line (bad input, no model): a failure a retry
    cannot fix, whose one line already says which file, which column, what was expected.

    A SystemExit because of how the task runner logs failures: any other exception is logged
    with its traceback (the frames of this operator and the docker provider, below the line the
    user needs); a SystemExit gets one line, `Task exited`.
    """


# Retries are for what may pass (the engine was busy, the container was killed for memory). A
# corrupt input file or a missing model fails the same way on every try, and retrying it would
# only delay the red task by retries x retry_delay.
RTB_ERRORS_ARE_FINAL = ExceptionRetryPolicy(rules=[RetryRule(
    exception=RtbUserError, action=RetryAction.FAIL,
    reason="the container printed an `rtb: error:` line; every retry would fail the same way",
)])

# The level words `rtb` puts in front of its log lines under Airflow (RTB_LOG_FORMAT=airflow),
# and the first line of a Python traceback (a bug), which has none.
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
PYTHON_TRACEBACK = "Traceback (most recent call last):"


def container_line(line: str, previous_level: str) -> tuple[str, str]:
    """The level and the message of one line a job container wrote.

    `rtb` writes `<LEVEL> <message>`; the `rtb: error:` line and a traceback's first line are
    ERROR; any other line (a traceback's frames, a message's second line, the JSON answer on
    stdout) goes on at the level of the line before it, INFO at first.
    """
    word, _, message = line.partition(" ")
    if word in LOG_LEVELS:
        return word, message
    if line.startswith((RTB_ERROR_PREFIX, PYTHON_TRACEBACK)):
        return "ERROR", line
    return previous_level, line


class ContainerLog:
    """The task logger as the docker provider's log loop sees it: each line the container
    wrote becomes a record at that line's own level, its message first (the task log adds the
    time)."""

    def __init__(self, task_log: Any) -> None:
        self.task_log = task_log
        self.level = "INFO"

    def info(self, message: str, *args: Any) -> None:
        self.level, text = container_line(message % args if args else message, self.level)
        getattr(self.task_log, self.level.lower())("%s", text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.task_log, name)


class RtbJobOperator(DockerOperator):
    """A DockerOperator for `rtb` commands: the container's lines at their own levels, no
    retries and no traceback after an `rtb: error:` line, and the container of a failed task
    kept for `docker logs` / `docker inspect`.
    """

    def __init__(self, *, retry_policy: Any = None, **kwargs: Any) -> None:
        # None also when a mapped task's instance is made: `.partial()` passes its default on.
        super().__init__(retry_policy=retry_policy or RTB_ERRORS_ARE_FINAL, **kwargs)

    def execute(self, context: Any) -> Any:
        try:
            result = super().execute(context)
        except DockerContainerFailedException as exc:
            if any(line.startswith(RTB_ERROR_PREFIX) for line in exc.logs or []):
                raise RtbUserError(1) from exc
            raise
        # Provider 4.6.1's auto_remove="success" removes the container whatever the outcome
        # (a plain remove of a container that has exited), so job_settings says "never" and
        # the container of a task that succeeded is removed here; a failed one stays.
        self.cli.remove_container(self.container["Id"])
        return result

    # The provider streams the container's output with `fetch_logs(log_stream, self.log)`,
    # every line at INFO, and has no parameter to change that. Within _run_image_with_mounts
    # that is the only use of `self.log`, so while it runs `self.log` is a ContainerLog.
    _container_log: ContainerLog | None = None

    @property
    def log(self) -> Any:
        return self._container_log if self._container_log is not None else super().log

    def _run_image_with_mounts(self, target_mounts: Any, add_tmp_variable: bool) -> Any:
        self._container_log = ContainerLog(super().log)
        try:
            return super()._run_image_with_mounts(target_mounts, add_tmp_variable)
        finally:
            self._container_log = None


def project_mounts(*, models_read_only: bool = False) -> list[Mount]:
    """Bind mounts of the host's data/, models/ and reports/ under /project."""
    return [
        Mount(
            target=f"{CONTAINER_PROJECT_DIR}/data",
            source=f"{HOST_PROJECT_DIR}/data",
            type="bind",
        ),
        Mount(
            target=f"{CONTAINER_PROJECT_DIR}/models",
            source=f"{HOST_PROJECT_DIR}/models",
            type="bind",
            read_only=models_read_only,
        ),
        Mount(
            target=f"{CONTAINER_PROJECT_DIR}/reports",
            source=f"{HOST_PROJECT_DIR}/reports",
            type="bind",
        ),
    ]


def job_settings(task_id: str, *, models_read_only: bool = False, xcom: bool = False) -> dict[str, Any]:
    """What every job container of the pipeline shares: image, host mounts, user, isolation.

    The container's stdout and stderr are streamed into the task log line by line, so the
    stage's own log (rows read, seconds, metrics) reads in the Airflow UI: RTB_LOG_FORMAT=airflow
    makes `rtb` write each line as `<LEVEL> <message>`, and RtbJobOperator logs it at that level
    (Airflow adds the time). Containers are removed when they succeed and kept when they fail,
    for `docker logs` / `docker inspect` (until `sh run.sh down`).
    """
    environment = {"RTB_PROJECT_DIR": CONTAINER_PROJECT_DIR, "RTB_LOG_FORMAT": "airflow"}
    environment |= {name: os.environ[name] for name in JOB_SETTINGS if os.environ.get(name)}
    return {
        "image": JOB_IMAGE,
        "environment": environment,
        "mounts": project_mounts(models_read_only=models_read_only),
        "user": HOST_USER,
        # The host's engine through the mounted socket, or RTB_DOCKER_URL (+ TLS): targets.py.
        **docker_engine(),
        "network_mode": "none",
        "mount_tmp_dir": False,
        "auto_remove": "never",  # RtbJobOperator removes the container of a task that succeeded
        "labels": {"rtb-pipeline.stack": STACK, "rtb-pipeline.task": task_id},
        # A stage's output is files; only `rtb plan` and `rtb monitor` answer through XCom
        # (their JSON line: every line is pushed and the reader takes the last JSON one).
        "do_xcom_push": xcom,
        "xcom_all": xcom,
        # Never pull: the image is built locally by run.sh / `docker compose build`.
        "force_pull": False,
    }


def rtb_task(
    task_id: str, *rtb_args: str, models_read_only: bool = False, xcom: bool = False, **extra: Any
) -> RtbJobOperator:
    """One pipeline stage: `rtb <rtb_args> --project-dir /project` in the job image."""
    return rtb_command_task(task_id, with_project(*rtb_args), models_read_only=models_read_only,
                            xcom=xcom, **extra)


def rtb_command_task(task_id: str, command: Any, *, models_read_only: bool = False,
                     xcom: bool = False, **extra: Any) -> RtbJobOperator:
    """A stage whose whole command may come from an upstream task (the plan's commands)."""
    return stage_operator(RtbJobOperator, task_id=task_id, command=command,
                          settings=job_settings(task_id, models_read_only=models_read_only, xcom=xcom),
                          **extra)


def rtb_publish_task(task_id: str, command: Any) -> RtbJobOperator:
    """`rtb publish`: the one stage that needs a network (the Redis at RTB_PUBLISH_REDIS_URL),
    so its container joins this stack's network; it reads predictions, never models."""
    settings = job_settings(task_id, models_read_only=True)
    settings["environment"] |= {name: os.environ[name] for name in PUBLISH_SETTINGS
                                if os.environ.get(name)}
    settings["network_mode"] = PUBLISH_NETWORK
    return stage_operator(RtbJobOperator, task_id=task_id, command=command, settings=settings)


def trigger_training(task_id: str, *, reason_from: str) -> TriggerDagRunOperator:
    """Start a train_pipeline run now, with the reason (the XCom of `reason_from`) in its conf,
    which the run passes to `rtb train --trigger-reason` for its report."""
    return TriggerDagRunOperator(
        task_id=task_id,
        trigger_dag_id="train_pipeline",
        conf={"reason": f"{{{{ ti.xcom_pull(task_ids='{reason_from}') }}}}"},
    )


def rtb_mapped(task_id: str, *, models_read_only: bool = False) -> Any:
    """A stage run once per unit of a plan: `.expand(command=...)` with the plan's commands."""
    return stage_partial(RtbJobOperator, task_id=task_id,
                         settings=job_settings(task_id, models_read_only=models_read_only))


class PartitionSensor(FileSensor):
    """Wait for a raw partition's `_SUCCESS` marker, deferred to the triggerer.

    A partition that is still missing when the wait ends is not an error of the pipeline: the
    interval is skipped (the run ends green with its tasks skipped) and the log says which
    marker was missing and for how long it was awaited.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("fs_conn_id", RAW_CONNECTION)
        kwargs.setdefault("deferrable", True)
        kwargs.setdefault("soft_fail", True)
        kwargs.setdefault("timeout", PARTITION_WAIT_SECONDS)
        kwargs.setdefault("poke_interval", PARTITION_POKE_SECONDS)
        kwargs.setdefault("retries", 0)
        super().__init__(**kwargs)

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None, context: Any) -> Any:
        try:
            return super().resume_execution(next_method, next_kwargs, context)
        except AirflowSkipException:
            message = (f"rtb: skipped: {self.filepath} did not appear within {self.timeout:.0f} s; "
                       "this interval is skipped and nothing was written for it")
            self.log.warning(message)
            raise AirflowSkipException(message) from None


def read_plan(lines: list[str] | str | None) -> dict[str, Any]:
    """The JSON object `rtb plan` printed last (the pushed XCom holds every log line)."""
    if isinstance(lines, str):
        lines = [lines]
    for line in reversed(lines or []):
        text = line.strip()
        if text.startswith("{"):
            return json.loads(text)
    raise AirflowFailException("rtb plan printed no plan (see the plan task's log)")


def with_project(*args: str) -> list[str]:
    return [*args, "--project-dir", CONTAINER_PROJECT_DIR]


def units_from_plan(plan: dict[str, Any], *, run_id: str) -> list[dict[str, Any]]:
    """One entry per unit of the plan (a partition, or the single file): the marker to wait
    for and the command of each per-unit stage. Mapped tasks take one field each."""
    units = []
    predict_args = plan.get("predict_args") or [[] for _ in plan["units"]]
    for unit, predict in zip(plan["units"], predict_args, strict=True):
        units.append({
            "name": unit["name"],
            "make_dataset": with_project("make-dataset", *unit["args"]),
            "preprocessing": with_project("preprocess", *unit["args"]),
            # The prediction set's sidecar names the Airflow run that wrote it.
            "predicting": with_project("predict", *predict, "--run-id", run_id),
        })
    return units


def run_commands_from_plan(
    plan: dict[str, Any], *, run_id: str, trigger_reason: str | None = None
) -> dict[str, list[str]]:
    """The commands of the run's single tasks (monitor; training and retention)."""
    if plan["kind"] == "predict":
        return {"monitor": with_project("monitor", *plan["monitor_args"], "--run-id", run_id),
                "publish": with_project("publish", *plan["publish_args"])}
    reason = ["--trigger-reason", trigger_reason] if trigger_reason else []
    return {
        "training": with_project("train", *plan["train_args"], *reason),
        "retention": with_project("retention", "--now", plan["interval"]["end"]),
    }


def plan_driven_stages(
    plan: RtbJobOperator, *, sensor_id: str, models_read_only: bool = False
) -> dict[str, Any]:
    """The tasks both DAGs build from their plan: the plan's units, its single commands and
    its markers; the partition sensor; make_dataset and preprocessing once per unit.

    Called inside a DAG's context, so the tasks belong to that DAG. A run triggered with a
    reason in its conf (drift) passes it on to its training command.
    """
    read_only = {"models_read_only": models_read_only}

    @task
    def units(plan_lines: list[str], run_id: str) -> list[dict]:
        """One entry per unit of the plan (a partition, or the single file): the command of
        each per-unit stage."""
        return units_from_plan(read_plan(plan_lines), run_id=run_id)

    @task(multiple_outputs=True)
    def commands(plan_lines: list[str], run_id: str) -> dict:
        """The commands of the run's single tasks."""
        conf = get_current_context()["dag_run"].conf or {}
        return run_commands_from_plan(read_plan(plan_lines), run_id=run_id,
                                      trigger_reason=conf.get("reason"))

    @task
    def markers(plan_lines: list[str]) -> list[str]:
        """The `_SUCCESS` markers (paths under data/raw) this run waits for."""
        return read_plan(plan_lines)["wait_for"]

    per_unit = units(plan.output, run_id="{{ run_id }}")
    single = commands(plan.output, run_id="{{ run_id }}")
    wait = PartitionSensor.partial(task_id=sensor_id).expand(filepath=markers(plan.output))
    make_dataset = rtb_mapped("make_dataset", **read_only).expand(
        command=per_unit.map(lambda unit: unit["make_dataset"])
    )
    preprocessing = rtb_mapped("preprocessing", **read_only).expand(
        command=per_unit.map(lambda unit: unit["preprocessing"])
    )
    [per_unit, single] >> wait >> make_dataset >> preprocessing
    return {"units": per_unit, "commands": single, "preprocessing": preprocessing}
