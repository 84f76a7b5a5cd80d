"""
### predict_pipeline

Scores the ad requests of each hour with the champion model, one run per data interval.

1. `check_model`: `rtb check-model` verifies `models/champion.yaml` and the pickle it names.
2. `plan`: `rtb plan predict` decides what this interval covers: the hourly partitions
   `data/raw/requests/date=.../hour=...` of [data_interval_start, data_interval_end), or, in a
   project that has no `requests/` folder, the single file `data/raw/test_data.csv.gz`.
3. `wait_for_requests`: waits (deferred to the triggerer) for each partition's `_SUCCESS`
   marker; a partition still missing after `RTB_PARTITION_WAIT_SECONDS` skips the interval.
4. `make_dataset`, `preprocessing`, `predicting`: one task per partition; each partition has
   ONE prediction set, `data/predictions/requests/date=.../hour=.../`, replaced as a whole when
   the interval runs again (sidecar: interval, run id, model version and sha256).
5. `monitor`: drift of the interval against the champion's training window, realised
   calibration of days whose labels arrived; `reports/drift/...`, `reports/quality/...`.
6. `retrain_needed` -> `trigger_training`: a drift or staleness past its threshold triggers
   `train_pipeline` (once per champion), with the reason in its conf and report.
7. `publish` (only when `RTB_PUBLISH_REDIS_URL` is set): `rtb publish` writes the interval's
   prediction sets to Redis, `<prefix>score:<id>`, once per set (a re-run does not rewrite).

`models/` is mounted read-only in this DAG, so predicting can never change a model.
"""

from __future__ import annotations

from airflow.sdk import DAG, CronDataIntervalTimetable, task
from pipeline.common import (
    DEFAULT_ARGS,
    INTERVAL_ARGS,
    PUBLISH_REDIS_URL,
    plan_driven_stages,
    read_plan,
    rtb_command_task,
    rtb_mapped,
    rtb_publish_task,
    rtb_task,
    trigger_training,
)

with DAG(
    dag_id="predict_pipeline",
    description="champion model + each hour's requests -> install probabilities, drift watch",
    # Data intervals, not trigger times: each run covers [data_interval_start,
    # data_interval_end), the period before it (Airflow 3's plain cron strings give runs
    # whose interval is a single instant).
    schedule=CronDataIntervalTimetable("0 * * * *", timezone="UTC"),
    catchup=False,
    max_active_runs=4,
    default_args=DEFAULT_ARGS,
    doc_md=__doc__,
    tags=["rtb", "prediction"],
) as dag:
    # Predicting never needs to write a model: models/ is mounted read-only.
    read_only = {"models_read_only": True}
    check_model = rtb_task("check_model", "check-model", **read_only)
    plan = rtb_task("plan", "plan", "predict", *INTERVAL_ARGS, xcom=True, **read_only)

    stages = plan_driven_stages(plan, sensor_id="wait_for_requests", **read_only)
    predicting = rtb_mapped("predicting", **read_only).expand(
        command=stages["units"].map(lambda unit: unit["predicting"])
    )
    monitor = rtb_command_task("monitor", stages["commands"]["monitor"], xcom=True, **read_only)

    @task.short_circuit
    def retrain_needed(monitor_lines: list[str]) -> str:
        """The reason to retrain (the monitor's decision), or "" to skip the trigger."""
        decision = read_plan(monitor_lines)
        return "; ".join(decision.get("reasons") or ["drift"]) if decision.get("retrain") else ""

    reason = retrain_needed(monitor.output)
    retrain = trigger_training("trigger_training", reason_from="retrain_needed")

    check_model >> plan
    stages["preprocessing"] >> predicting >> monitor
    reason >> retrain
    if PUBLISH_REDIS_URL:
        predicting >> rtb_publish_task("publish", stages["commands"]["publish"])
