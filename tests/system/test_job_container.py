"""RtbJobOperator against the real Docker engine, without an Airflow stack: what a job
container writes becomes task-log records at their own levels, an `rtb: error:` line ends the
task without a retry, and the container of a failed task is kept while a successful one is
removed.

The containers run BASE_IMAGE (as for run.sh) with a shell script that writes lines the way
`rtb` does under Airflow (RTB_LOG_FORMAT=airflow, see tests/unit/test_cli_errors.py); the real
`rtb` in the job image is covered by test_e2e_airflow.py. The operator's `execute` is called
the way the task runner calls it, in a context that marks the operator as the one running.
"""

from __future__ import annotations

import contextvars
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .conftest import IN_CI, _require_docker

pytestmark = pytest.mark.system

DAGS_DIR = Path(__file__).resolve().parents[2] / "airflow" / "dags"
ERROR_LINE = "rtb: error: data/raw/training_data.csv.gz: column 'viewCount' line 3: expected a number"


@pytest.fixture(scope="module")
def common() -> Iterator[ModuleType]:
    """The DAGs' shared module, imported from the DAG folder as the dag-processor does."""
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(DAGS_DIR))
        for module in [m for m in sys.modules if m == "pipeline" or m.startswith("pipeline.")]:
            mp.delitem(sys.modules, module)
        import pipeline.common

        yield pipeline.common


@pytest.fixture
def stack_label() -> Iterator[dict[str, str]]:
    """A stack label of this test's own; whatever containers carry it are removed after."""
    _require_docker()
    label = {"rtb-pipeline.stack": f"rtb-job-test-{uuid.uuid4().hex[:8]}"}
    yield label
    for container in _containers(label):
        subprocess.run(["docker", "rm", "-f", container], capture_output=True, timeout=60)


def _containers(label: dict[str, str]) -> list[str]:
    """`docker ps -a` of the containers with the label, as a user looks for them."""
    (key, value), = label.items()
    listed = subprocess.run(["docker", "ps", "-aq", "--filter", f"label={key}={value}"],
                            capture_output=True, text=True, check=True, timeout=60)
    return listed.stdout.split()


def _image() -> str:
    image = os.environ.get("BASE_IMAGE")
    if not image:
        if IN_CI:
            pytest.fail("BASE_IMAGE is not set (as for run.sh)")
        pytest.skip("BASE_IMAGE is not set (as for run.sh)")
    return image


def _operator(common: ModuleType, label: dict[str, str], script: str, **extra: Any) -> Any:
    """A job task as the DAGs build it (job_settings), on BASE_IMAGE, without the host mounts."""
    settings = common.job_settings("make_dataset") | {
        "image": _image(), "mounts": [], "labels": label, "entrypoint": ["sh", "-c"], **extra,
    }
    return common.RtbJobOperator(task_id="make_dataset", command=[script], **settings)


def _execute(operator: Any) -> tuple[Any, list[tuple[str, str]]]:
    """Run `execute` as the task runner does; its result and the (level, message) records."""
    from airflow.sdk.bases.operator import ExecutorSafeguard
    from structlog.testing import capture_logs

    run = contextvars.copy_context()
    run.run(ExecutorSafeguard.tracker.set, operator)
    with capture_logs() as records:
        try:
            return run.run(operator.execute, context={}), _levels(records)
        except BaseException as exc:  # SystemExit included: the test asserts on it
            exc.records = _levels(records)
            raise


def _levels(records: list[dict]) -> list[tuple[str, str]]:
    return [(record["log_level"], record["event"]) for record in records]


def test_lines_keep_their_level_and_an_rtb_error_fails_without_retry_or_trace(common, stack_label) -> None:
    from airflow.sdk import RetryAction

    script = (
        "echo 'INFO read 3 rows from data/raw/training_data.csv.gz in 0.1 s' >&2; "
        "echo 'WARNING training_data.csv.gz: 2 rows have a timestamp in the future' >&2; "
        "echo '  (latest 2031-01-01)' >&2; "
        f'echo "{ERROR_LINE}" >&2; exit 1'
    )
    operator = _operator(common, stack_label, script)
    with pytest.raises(SystemExit) as raised:
        _execute(operator)

    assert isinstance(raised.value, common.RtbUserError) and raised.value.code == 1
    records = raised.value.records
    start = records.index(("info", "read 3 rows from data/raw/training_data.csv.gz in 0.1 s"))
    assert records[start:] == [
        ("info", "read 3 rows from data/raw/training_data.csv.gz in 0.1 s"),
        ("warning", "training_data.csv.gz: 2 rows have a timestamp in the future"),
        ("warning", "  (latest 2031-01-01)"),
        ("error", ERROR_LINE),
    ], records
    decision = operator.retry_policy.evaluate(raised.value, try_number=1, max_tries=3)
    assert decision.action is RetryAction.FAIL

    kept = _containers(stack_label)
    assert kept == [operator.container["Id"][:12]], "the failed task's container is kept"
    logs = subprocess.run(["docker", "logs", kept[0]], capture_output=True, text=True, timeout=60)
    assert ERROR_LINE in logs.stderr


def test_a_failure_without_an_rtb_error_stays_retryable_and_keeps_its_traceback(common, stack_label) -> None:
    from airflow.providers.docker.exceptions import DockerContainerFailedException
    from airflow.sdk import RetryAction

    script = ("echo 'Traceback (most recent call last):' >&2; "
              "echo '  File \"/app/rtb/cli.py\", line 1, in main' >&2; "
              "echo 'MemoryError' >&2; exit 137")
    operator = _operator(common, stack_label, script)
    with pytest.raises(DockerContainerFailedException) as raised:
        _execute(operator)

    records = raised.value.records
    start = records.index(("error", "Traceback (most recent call last):"))
    assert records[start:] == [
        ("error", "Traceback (most recent call last):"),
        ("error", '  File "/app/rtb/cli.py", line 1, in main'),
        ("error", "MemoryError"),
    ], records
    decision = operator.retry_policy.evaluate(raised.value, try_number=1, max_tries=3)
    assert decision.action is RetryAction.DEFAULT, "may pass on a retry: the task's retries apply"
    assert len(_containers(stack_label)) == 1


def test_a_task_that_succeeds_answers_and_leaves_no_container(common, stack_label) -> None:
    script = "echo 'INFO plan predict (files mode): 1 unit(s)' >&2; echo '{\"units\": []}'"
    operator = _operator(common, stack_label, script, do_xcom_push=True, xcom_all=True)
    lines, records = _execute(operator)

    # stdout and stderr reach the engine's log on two pipes, so their lines may interleave
    # either way: the plan is the last JSON line among them, which is what read_plan takes.
    assert '{"units": []}' in lines
    assert common.read_plan(lines) == {"units": []}
    assert ("info", "plan predict (files mode): 1 unit(s)") in records
    assert _containers(stack_label) == []
