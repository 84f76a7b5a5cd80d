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
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

from airflow.providers.docker.exceptions import DockerContainerFailedException
from airflow.providers.docker.operators.docker import DockerOperator
from airflow.sdk.exceptions import AirflowFailException
from docker.types import Mount

JOB_IMAGE = os.environ.get("RTB_JOB_IMAGE", "rtb-pipeline-job:latest")
HOST_PROJECT_DIR = os.environ.get("RTB_HOST_PROJECT_DIR", "/opt/rtb-pipeline")
HOST_USER = f"{os.environ.get('RTB_HOST_UID', '1000')}:{os.environ.get('RTB_HOST_GID', '1000')}"
STACK = os.environ.get("RTB_STACK", "rtb-pipeline")
CONTAINER_PROJECT_DIR = "/project"
DOCKER_URL = "unix://var/run/docker.sock"

# The one line `rtb` prints on stderr for an error that a retry cannot fix (bad input, no
# model): the CLI contract's `rtb: error: ...`.
RTB_ERROR_PREFIX = "rtb: error:"

DEFAULT_ARGS: dict[str, Any] = {
    "owner": "rtb",
    "retries": int(os.environ.get("RTB_TASK_RETRIES", "2")),
    "retry_delay": timedelta(seconds=30),
    "execution_timeout": timedelta(hours=2),
}


class RtbJobOperator(DockerOperator):
    """A DockerOperator that fails at once, without retries, on an `rtb: error:` line.

    Retries are for what may pass (the engine was busy, the container was killed for memory).
    A corrupt input file or a missing model fails the same way on every try, and retrying it
    would only delay the red task by retries x retry_delay.
    """

    def execute(self, context: Any) -> Any:
        try:
            return super().execute(context)
        except DockerContainerFailedException as exc:
            for line in exc.logs or []:
                text = line.decode(errors="replace") if isinstance(line, bytes) else line
                if text.startswith(RTB_ERROR_PREFIX):
                    raise AirflowFailException(f"{self.task_id} failed; not retrying: {text}") from exc
            raise


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


def rtb_task(task_id: str, *rtb_args: str, models_read_only: bool = False) -> RtbJobOperator:
    """One pipeline stage: `rtb <rtb_args> --project-dir /project` in the job image.

        The container's stdout and stderr are streamed into the task log line by line, so the
        stage's own log (rows read, seconds, metrics) reads in the Airflow UI. Containers are
        removed when they succeed and kept when they fail, for `docker logs` / `docker inspect`
    (until `sh run.sh down`).
    """
    return RtbJobOperator(
        task_id=task_id,
        image=JOB_IMAGE,
        command=[*rtb_args, "--project-dir", CONTAINER_PROJECT_DIR],
        environment={"RTB_PROJECT_DIR": CONTAINER_PROJECT_DIR},
        mounts=project_mounts(models_read_only=models_read_only),
        user=HOST_USER,
        docker_url=DOCKER_URL,
        network_mode="none",
        mount_tmp_dir=False,
        auto_remove="success",
        labels={"rtb-pipeline.stack": STACK, "rtb-pipeline.task": task_id},
        # The stage's output is files, not XCom: don't push the last log line.
        do_xcom_push=False,
        # Never pull: the image is built locally by run.sh / `docker compose build`.
        force_pull=False,
    )
