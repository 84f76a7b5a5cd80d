"""
### train_pipeline

Trains a new candidate model on a moving window of labelled days, every day at 06:00 UTC.

1. `plan`: `rtb plan train` lists the labelled partitions `data/raw/labelled/date=...` of the
   `RTB_TRAIN_WINDOW_DAYS` days before the interval's end (or, in a project without a
   `labelled/` folder, the single file `data/raw/training_data.csv.gz`).
2. `wait_for_labels`: waits (deferred) for the newest day's `_SUCCESS` marker, since labels
   arrive after the day; still missing after `RTB_PARTITION_WAIT_SECONDS` skips the run.
3. `make_dataset`, `preprocessing`: one task per labelled day.
4. `training`: `rtb train` fits and evaluates the candidates, holding out the latest day, and
   writes `models/pipeline_<version>.pkl`, `reports/report_<version>.yaml` (metrics, and
   exactly which partitions with their sha256) and the model's drift profile; it moves
   `models/champion.yaml` only through the promotion gate (challenger and champion scored on
   the latest day, which neither was fitted on). It publishes the `rtb_champion_model` asset.
5. `retention`: deletes raw partitions older than `RTB_RETENTION_DAYS` (never one a window
   still needs) with their derived files.

Each task is one container of the job image with the host's `data/`, `models/` and
`reports/` bind-mounted; its log below is the container's own log. A task that prints
`rtb: error:` (for example a corrupt input file) fails at once without retries, and nothing
downstream runs, so the current champion model stays in place.
"""

from __future__ import annotations

from airflow.sdk import DAG, get_current_context, task
from pipeline.common import (
    DEFAULT_ARGS,
    INTERVAL_ARGS,
    MODEL_ASSET,
    PartitionSensor,
    read_plan,
    rtb_command_task,
    rtb_mapped,
    rtb_task,
    run_commands_from_plan,
    units_from_plan,
)

with DAG(
    dag_id="train_pipeline",
    description="labelled days of a moving window -> features -> calibrated model + report",
    schedule="0 6 * * *",
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    doc_md=__doc__,
    tags=["rtb", "training"],
) as dag:
    plan = rtb_task("plan", "plan", "train", *INTERVAL_ARGS, xcom=True)

    @task
    def units(plan_lines: list[str], run_id: str) -> list[dict]:
        """One entry per labelled day of the window (or the single file)."""
        return units_from_plan(read_plan(plan_lines), run_id=run_id)

    @task(multiple_outputs=True)
    def commands(plan_lines: list[str], run_id: str) -> dict:
        """Training and retention commands; a run triggered by drift says why it runs."""
        conf = get_current_context()["dag_run"].conf or {}
        return run_commands_from_plan(read_plan(plan_lines), run_id=run_id,
                                      trigger_reason=conf.get("reason"))

    @task
    def markers(plan_lines: list[str]) -> list[str]:
        """The `_SUCCESS` markers (paths under data/raw) this run waits for."""
        return read_plan(plan_lines)["wait_for"]

    per_unit = units(plan.output, run_id="{{ run_id }}")
    single = commands(plan.output, run_id="{{ run_id }}")
    wait_for_labels = PartitionSensor.partial(task_id="wait_for_labels").expand(
        filepath=markers(plan.output)
    )
    make_dataset = rtb_mapped("make_dataset").expand(
        command=per_unit.map(lambda unit: unit["make_dataset"])
    )
    preprocessing = rtb_mapped("preprocessing").expand(
        command=per_unit.map(lambda unit: unit["preprocessing"])
    )
    training = rtb_command_task("training", single["training"], outlets=[MODEL_ASSET])
    retention = rtb_command_task("retention", single["retention"])

    [per_unit, single] >> wait_for_labels >> make_dataset >> preprocessing >> training >> retention
