"""
### predict_pipeline

Scores the newest test log with the champion model, every hour.

1. `check_model`: `rtb check-model` verifies `models/champion.yaml` and the pickle it names.
2. `make_dataset`: `rtb make-dataset --split test` checks `data/raw/test_data.csv.gz` and
   writes `data/interim/test.arrow`.
3. `preprocessing`: `rtb preprocess --split test` writes `data/processed/test_df.csv`.
4. `predicting`: `rtb predict` scores it with the champion and writes
   `data/predictions/predictions_<version>.npy` (with `.csv` and a `.yaml` sidecar).

`check_model` goes first so that, before any model has been trained, the run fails at once
with a clear message instead of after the data preparation. `models/` is mounted read-only
in this DAG, so predicting can never change a model.
"""

from __future__ import annotations

from airflow.sdk import DAG
from pipeline.common import DEFAULT_ARGS, rtb_task

with DAG(
    dag_id="predict_pipeline",
    description="champion model + raw test log -> install probabilities",
    schedule="@hourly",
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    doc_md=__doc__,
    tags=["rtb", "prediction"],
) as dag:
    # Predicting never needs to write a model: models/ is mounted read-only.
    read_only = {"models_read_only": True}
    check_model = rtb_task("check_model", "check-model", **read_only)
    make_dataset = rtb_task("make_dataset", "make-dataset", "--split", "test", **read_only)
    preprocessing = rtb_task("preprocessing", "preprocess", "--split", "test", **read_only)
    predicting = rtb_task("predicting", "predict", **read_only)

    check_model >> make_dataset >> preprocessing >> predicting
