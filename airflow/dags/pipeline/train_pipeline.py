"""
### train_pipeline

Turns the raw training log into a new candidate model, every day at 06:00 UTC.

1. `make_dataset`: `rtb make-dataset --split train` checks `data/raw/training_data.csv.gz`
   and writes `data/interim/train.arrow`.
2. `preprocessing`: `rtb preprocess --split train` writes `data/processed/train_df.csv`.
3. `training`: `rtb train` fits and evaluates the model and writes
   `models/pipeline_<version>.pkl` and `reports/report_<version>.yaml` (CV and holdout
   metrics); it updates `models/champion.yaml` only if the new model is better.

Each task is one container of the job image with the host's `data/`, `models/` and
`reports/` bind-mounted; its log below is the container's own log. A task that prints
`rtb: error:` (for example a corrupt input file) fails at once without retries, and nothing
downstream runs, so the current champion model stays in place.
"""

from __future__ import annotations

from airflow.sdk import DAG
from pipeline.common import DEFAULT_ARGS, rtb_task

with DAG(
    dag_id="train_pipeline",
    description="raw training log -> features -> calibrated model + report",
    schedule="0 6 * * *",
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    doc_md=__doc__,
    tags=["rtb", "training"],
) as dag:
    make_dataset = rtb_task("make_dataset", "make-dataset", "--split", "train")
    preprocessing = rtb_task("preprocessing", "preprocess", "--split", "train")
    training = rtb_task("training", "train")

    make_dataset >> preprocessing >> training
