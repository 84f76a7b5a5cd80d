"""End to end through the real stack: Airflow schedules DockerOperator tasks that run the job
image on the host's engine, and the files land in the (copied) project's data/, models/ and
reports/. Triggered and checked through the REST API v2, as a user would.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from .conftest import RUN_TIMEOUT

pytestmark = pytest.mark.system

# A stage's line that reports rows, as the task log shows it: the message first (the container
# writes `INFO <message>` under Airflow; the record's level is the word, its time Airflow's).
RTB_ROWS_LINE = re.compile(r"^(?!\d)\S.*\brows\b")
# rtb's format outside Airflow (`%(asctime)s %(levelname)s %(name)s: %(message)s`): a second
# timestamp that must not reach the task log.
RTB_PLAIN_LINE = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2},\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _metric_names(section: dict) -> set[str]:
    return {name for name, value in section.items() if isinstance(value, (int, float, dict))}


def _log_records(api, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int) -> list[dict]:
    """A task's log as the REST API v2 serves it: one record per line, with its `event` (the
    message) and `level`, and an `error_detail` for a logged exception (the traceback)."""
    answer = api.request(
        "GET", f"/api/v2/dags/{dag_id}/dagRuns/{api.quote(run_id)}/taskInstances/{task_id}/logs/"
        f"{try_number}?map_index={map_index}")
    return [item for item in answer["content"] if isinstance(item, dict)]


def _kept_containers(stack, task_id: str) -> list[tuple[str, str]]:
    """(id, status) of the stack's job containers of `task_id` that `docker ps -a` lists."""
    listed = subprocess.run(
        ["docker", "ps", "-a", "--filter", f"label=rtb-pipeline.stack={stack.env['COMPOSE_PROJECT_NAME']}",
         "--filter", f"label=rtb-pipeline.task={task_id}", "--format", "{{.ID}}\t{{.Status}}"],
        capture_output=True, text=True, check=True, timeout=60, env=stack.env)
    return [tuple(line.split("\t", 1)) for line in listed.stdout.splitlines()]


def test_predict_before_any_training_stops_at_check_model(api, untrained_predict_run) -> None:
    run = untrained_predict_run
    assert run.state == "failed"
    tis = api.task_instances(run.dag_id, run.run_id)
    assert tis["check_model"]["state"] == "failed"
    assert tis["check_model"]["try_number"] == 1, "a missing model is not worth a retry"
    for task_id in ("make_dataset", "preprocessing", "predicting"):
        assert tis[task_id]["state"] == "upstream_failed"
    log = api.task_log(run.dag_id, run.run_id, "check_model", 1)
    assert "rtb: error:" in log


def test_train_pipeline_writes_features_model_and_report(stack, trained_run) -> None:
    assert trained_run.state == "success"
    root = stack.root
    assert (root / "data/interim/train.arrow").is_file()
    train_df = root / "data/processed/train_df.csv"
    assert train_df.is_file() and train_df.stat().st_size > 0
    models = sorted((root / "models").glob("pipeline_*.pkl"))
    reports = sorted((root / "reports").glob("report_*.yaml"))
    assert models and reports
    assert (root / "models/champion.yaml").is_file()

    report = yaml.safe_load(reports[-1].read_text())
    for section in ("cv", "holdout"):
        assert {"roc_auc", "log_loss"} <= _metric_names(report[section]), report[section]
    holdout_auc = report["holdout"]["roc_auc"]
    assert 0.0 <= float(holdout_auc) <= 1.0


def test_task_log_shows_the_containers_own_output(api, trained_run) -> None:
    records = _log_records(api, trained_run.dag_id, trained_run.run_id, "make_dataset", 1, map_index=0)
    events = [str(record.get("event", "")) for record in records]
    assert any(event.startswith("Starting docker container from image") for event in events)
    rows = [r for r in records if r.get("level") == "info" and RTB_ROWS_LINE.search(str(r.get("event")))]
    assert rows, events[-30:]
    assert not any(RTB_PLAIN_LINE.search(event) for event in events), events[-30:]


def test_task_runs_as_the_invoking_user(stack, trained_run) -> None:
    """Files the tasks wrote belong to whoever ran run.sh, not to root."""
    for path in [*(stack.root / "models").glob("pipeline_*.pkl"), stack.root / "data/processed"]:
        assert path.stat().st_uid == os.getuid(), path


def test_predict_pipeline_scores_every_test_row(api, stack, predicted_run) -> None:
    run = predicted_run
    tis = api.task_instances(run.dag_id, run.run_id)
    assert run.state == "success", {t: ti["state"] for t, ti in tis.items()}

    root = stack.root
    test_df = pd.read_csv(root / "data/processed/test_df.csv")
    predictions = sorted((root / "data/predictions").glob("predictions_*.npy"))
    assert predictions, "no predictions_*.npy written"
    proba = np.load(predictions[-1])
    assert proba.ndim == 1
    assert len(proba) == len(test_df) > 0
    assert np.isfinite(proba).all()
    assert ((proba >= 0.0) & (proba <= 1.0)).all()
    assert predictions[-1].with_suffix(".csv").is_file()


def test_run_sh_predict_follows_a_run_to_success(stack) -> None:
    follow = stack.run_sh("predict", timeout=RUN_TIMEOUT)
    output = follow.stdout + follow.stderr
    assert follow.returncode == 0, output
    for task_id in ("check_model", "make_dataset", "preprocessing", "predicting"):
        assert re.search(rf"{task_id}\s+success", output), output
    assert re.search(r"predict_pipeline: run \S+ success", output), output


def test_scoring_service_serves_the_champion(stack, predicted_run) -> None:
    """`sh run.sh serve`: the job image's `rtb serve` on models/ and reports/ (read-only)."""
    serve = stack.run_sh("serve", timeout=300)
    assert serve.returncode == 0, serve.stdout + serve.stderr
    base = f"http://127.0.0.1:{stack.env['SCORING_PORT']}"
    champion = yaml.safe_load((stack.root / "models/champion.yaml").read_text())

    with urllib.request.urlopen(base + "/health", timeout=30) as response:
        health = json.load(response)
    assert health["status"] == "ok"
    assert health["model"] == champion["version"]

    rows = pd.read_csv(stack.root / "data/raw/test_data.csv.gz", sep=None, engine="python", nrows=3)
    request = urllib.request.Request(
        base + "/predict",
        data=rows.to_json(orient="records").encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        answer = json.load(response)
    assert answer["model"] == champion["version"] and answer["arm"] == "champion"
    assert len(answer["probabilities"]) == 3
    assert all(0.0 <= p <= 1.0 for p in answer["probabilities"])

    with urllib.request.urlopen(base + "/metrics", timeout=30) as response:
        metrics = response.read().decode()
    assert re.search(r'rtb_requests_total\{.*endpoint="/predict".*\} 1\.0', metrics), metrics[:2000]
    # The one folder the service may write: the shadow log's, as the host user.
    probe = stack.run_sh("compose", "exec", "-T", "scoring", "python", "-c",
                         "open('/project/reports/shadow/.probe', 'w').write('ok')", timeout=120)
    assert probe.returncode == 0, probe.stdout + probe.stderr
    assert (stack.root / "reports/shadow/.probe").read_text() == "ok"
    denied = stack.run_sh("compose", "exec", "-T", "scoring", "python", "-c",
                          "open('/project/models/.probe', 'w')", timeout=120)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr


def test_corrupt_training_input_fails_at_make_dataset_and_keeps_the_model(api, stack, trained_run) -> None:
    root = stack.root
    api.wait_until_idle("train_pipeline")
    guarded = sorted(
        [
            *(root / "models").glob("pipeline_*.pkl"),
            *(root / "models").glob("champion.yaml"),
            *(root / "reports").glob("report_*.yaml"),
        ]
    )
    before = {path: _sha256(path) for path in guarded}
    assert before

    raw = root / "data/raw/training_data.csv.gz"
    original = raw.read_bytes()
    corrupt = b"this is not a gzip file\n" * 100
    with pytest.raises(gzip.BadGzipFile):
        gzip.decompress(corrupt)
    raw.write_bytes(corrupt)
    try:
        # As a user would: `sh run.sh train` triggers through the REST API and follows the run.
        follow = stack.run_sh("train", timeout=RUN_TIMEOUT)
        output = follow.stdout + follow.stderr
        triggered = re.search(r"triggered run (\S+)", output)
        assert triggered, output
        run_id = triggered.group(1)
        state = api.wait_for_run("train_pipeline", run_id)
        tis = api.task_instances("train_pipeline", run_id)
        log = api.task_log("train_pipeline", run_id, "make_dataset", 1)
    finally:
        raw.write_bytes(original)

    assert follow.returncode != 0, output
    assert "rtb: error:" in output, output
    assert state == "failed"
    assert tis["make_dataset"]["state"] == "failed"
    assert tis["make_dataset"]["try_number"] == 1, "bad input must fail at once, not retry"
    assert tis["preprocessing"]["state"] == "upstream_failed"
    assert tis["training"]["state"] == "upstream_failed"
    assert "rtb: error:" in log, log[-2000:]

    # The task log: the error line as an ERROR record that names the user's path, no second
    # timestamp, and no traceback after it (neither the container's nor the operator's).
    records = _log_records(api, "train_pipeline", run_id, "make_dataset", 1, map_index=0)
    errors = [r for r in records if str(r.get("event", "")).startswith("rtb: error:")]
    assert len(errors) == 1 and errors[0].get("level") == "error", errors
    assert errors[0]["event"].startswith("rtb: error: data/raw/training_data.csv.gz: "), errors
    assert not any("error_detail" in r or "Traceback" in str(r.get("event")) for r in records), records[-10:]
    assert not any(RTB_PLAIN_LINE.search(str(r.get("event", ""))) for r in records), records[-10:]
    # The failed task's container is kept for `docker logs`; those of tasks that succeeded
    # (plan, in this run and before; training, in the run before) are not.
    kept = _kept_containers(stack, "make_dataset")
    assert len(kept) == 1 and kept[0][1].startswith("Exited (1)"), kept
    logs = subprocess.run(["docker", "logs", kept[0][0]], capture_output=True, text=True, timeout=60,
                          env=stack.env)
    assert errors[0]["event"] in logs.stderr, logs.stderr[-2000:]
    assert _kept_containers(stack, "plan") == [] and _kept_containers(stack, "training") == []

    after_models = {
        *(root / "models").glob("pipeline_*.pkl"),
        *(root / "reports").glob("report_*.yaml"),
    }
    assert after_models == {p for p in before if p.name != "champion.yaml"}
    for path, digest in before.items():
        assert _sha256(path) == digest, f"{path.name} changed"


def test_scheduler_restart_mid_run_still_finishes_consistently(api, stack, trained_run) -> None:
    """Restart the scheduler (`docker compose restart`: SIGTERM, then a new process) while a
    training task runs: the run must still finish and every model on disk match its report."""
    api.wait_until_idle("train_pipeline")
    run_id = api.trigger("train_pipeline")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        states = {t: ti["state"] for t, ti in api.task_instances("train_pipeline", run_id).items()}
        if "running" in states.values():
            break
        time.sleep(1)
    else:
        pytest.fail(f"no task started running: {states}")

    restart = stack.run_sh("compose", "restart", "airflow-scheduler", timeout=300)
    assert restart.returncode == 0, restart.stdout + restart.stderr

    state = api.wait_for_run("train_pipeline", run_id)
    tis = api.task_instances("train_pipeline", run_id)
    tries = {t: (ti["state"], ti["try_number"]) for t, ti in tis.items()}
    print(f"\nafter a scheduler restart: run {state}, tasks {tries}")
    assert state == "success", tries
    champion = yaml.safe_load((stack.root / "models/champion.yaml").read_text())
    assert _sha256(stack.root / "models" / champion["model"]) == champion["sha256"]
    for model in (stack.root / "models").glob("pipeline_*.pkl"):
        report = stack.root / "reports" / f"report_{model.stem.split('_', 1)[1]}.yaml"
        assert yaml.safe_load(report.read_text())["artifacts"]["model_sha256"] == _sha256(model)
