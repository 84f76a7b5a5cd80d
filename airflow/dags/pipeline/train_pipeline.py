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

from airflow.sdk import DAG, CronDataIntervalTimetable
from pipeline.common import (
    DEFAULT_ARGS,
    INTERVAL_ARGS,
    MODEL_ASSET,
    plan_driven_stages,
    rtb_command_task,
    rtb_task,
)

with DAG(
    dag_id="train_pipeline",
    description="labelled days of a moving window -> features -> calibrated model + report",
    # Data intervals, not trigger times: each run covers [data_interval_start,
    # data_interval_end), the period before it (Airflow 3's plain cron strings give runs
    # whose interval is a single instant).
    schedule=CronDataIntervalTimetable("0 6 * * *", timezone="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    doc_md=__doc__,
    tags=["rtb", "training"],
) as dag:
    plan = rtb_task("plan", "plan", "train", *INTERVAL_ARGS, xcom=True)

    stages = plan_driven_stages(plan, sensor_id="wait_for_labels")
    training = rtb_command_task("training", stages["commands"]["training"], outlets=[MODEL_ASSET])
    retention = rtb_command_task("retention", stages["commands"]["retention"])

    stages["preprocessing"] >> training >> retention
