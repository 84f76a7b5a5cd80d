"""Running over time, measured through the real stack: one hourly predict run end to end, and a
backfill of N hours.

Usage: `python bench/over_time.py [--rows-per-hour 150000] [--hours 24] [--max-active-runs 4]
[--executors local,celery:1,celery:2]`

Brings up a private copy of the stack with `sh run.sh` (as the system tests do: own compose
project, free ports, `:bench` image tags), writes a partitioned stream into its data/raw
(two labelled days for one training run, then `--hours` hourly request partitions of
`--rows-per-hour` each), trains once, then measures:

1. one predict_pipeline run for one hour: trigger to prediction set on disk, and how much of
   it the stage containers themselves took (the `rtb` lines' own seconds in each task log)
   versus Airflow's scheduling, the sensor and container start-up;
2. a backfill over `--hours` hours: wall time and runs per minute, once per executor named by
   `--executors` (default `local`; e.g. `local,celery:1,celery:2`): the same data, the same
   model and the same project folder, the stack brought down (`run.sh down -v`, which keeps
   the files but wipes Airflow's database) and up again with `sh run.sh up [--workers N]`
   between them, so each backfill starts from no runs at all.

Figures are printed (no assertions); needs Docker and BASE_IMAGE/POSTGRES_IMAGE as run.sh.
The stack is torn down at the end (`--keep` leaves it up).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from importlib import util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = util.spec_from_file_location("rest_client", REPO / "airflow" / "rest_client.py")
rest_client = util.module_from_spec(_spec)
_spec.loader.exec_module(rest_client)  # type: ignore[union-attr]

# A stage's closing line: "... in 1.7 s" or "...; 45.3 s in all" (training). Under Airflow the
# task log holds the message alone (RTB_LOG_FORMAT=airflow: the operator turns the level word
# into the line's level); run by hand, the line starts with time, level and logger.
STAGE_SECONDS = re.compile(r"(?: in (\d+(?:\.\d+)?) s|[;,] (\d+(?:\.\d+)?) s in all)\s*$")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _copy_repo(dest: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for raw in filter(None, listed):
        source = REPO / raw.decode()
        if source.is_file():
            target = dest / raw.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def _generate(raw: Path, *, end: datetime, days: int, rows_per_day: int) -> float:
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "rtb.cli", "generate", "--stream", "--out", str(raw),
                    "--days", str(days), "--rows-per-day", str(rows_per_day),
                    "--end", end.strftime("%Y-%m-%dT%H:%M:%SZ")], check=True)
    return time.monotonic() - started


def _stage_seconds(api: object, dag_id: str, run_id: str) -> dict[str, float]:
    """Seconds each stage container reported for itself (its final `... in N s` line)."""
    out: dict[str, float] = {}
    for task_id, ti in api.task_instances(dag_id, run_id).items():  # type: ignore[attr-defined]
        if ti["state"] != "success":
            continue
        lines = api.task_log_lines(dag_id, run_id, task_id, ti["try_number"])  # type: ignore[attr-defined]
        found = [float(m.group(1) or m.group(2)) for line in lines if (m := STAGE_SECONDS.search(line))]
        if found:
            out[task_id] = found[-1]
    return out


def executor_up_args(spec: str) -> tuple[str, ...]:
    """`sh run.sh up` arguments for an executor named `local` or `celery:N` (N workers)."""
    kind, _, workers = spec.partition(":")
    if kind == "local" and not workers:
        return ("up",)
    if kind == "celery" and workers.isdigit() and int(workers) >= 1:
        return ("up", "--workers", workers)
    raise argparse.ArgumentTypeError(f"executor {spec!r}: expected local or celery:N (N >= 1)")


def executor_list(text: str) -> list[str]:
    specs = [spec.strip() for spec in text.split(",") if spec.strip()]
    for spec in specs:
        executor_up_args(spec)
    if not specs:
        raise argparse.ArgumentTypeError("--executors names no executor")
    return specs


def _backfill(api: object, *, first_hour: datetime, hours: int, max_active_runs: int) -> dict[str, float]:
    """One backfill of `hours` predict runs from a quiet stack: wall time, runs, load."""
    # Unpausing lets the schedule add its latest interval (no partition: skipped after the
    # sensor's wait); let that and any other run end first, so the backfill runs alone.
    api.wait_for_dag("predict_pipeline")  # type: ignore[attr-defined]
    api.request("PATCH", "/api/v2/dags/predict_pipeline", {"is_paused": False})  # type: ignore[attr-defined]
    for dag_id in ("train_pipeline", "predict_pipeline"):
        api.wait_until_idle(dag_id, 1800)  # type: ignore[attr-defined]
    loads = []
    started = time.monotonic()
    api.backfill("predict_pipeline", first_hour.isoformat(),  # type: ignore[attr-defined]
                 (first_hour + timedelta(hours=hours - 1)).isoformat(), max_active_runs)
    while True:
        loads.append(os.getloadavg()[0])
        runs = [r for r in api.runs("predict_pipeline")  # type: ignore[attr-defined]
                if r["run_type"] == "backfill"]
        if len(runs) == hours and all(r["state"] in ("success", "failed") for r in runs):
            break
        time.sleep(5)
    wall = time.monotonic() - started
    return {"wall": wall, "ok": sum(r["state"] == "success" for r in runs),
            "load_mean": sum(loads) / len(loads), "load_max": max(loads)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-per-hour", type=int, default=150_000)
    parser.add_argument("--hours", type=int, default=24)
    parser.add_argument("--max-active-runs", type=int, default=4)
    parser.add_argument("--executors", type=executor_list, default=["local"],
                        help="backfill once per executor: local, celery:N (comma-separated)")
    parser.add_argument("--keep", action="store_true", help="leave the stack up")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="rtb-bench-over-time-")) / "rtb-pipeline"
    _copy_repo(root)
    port = _free_port()
    env = {**os.environ, "COMPOSE_PROJECT_NAME": f"rtb-bench-{uuid.uuid4().hex[:6]}",
           "AIRFLOW_PORT": str(port), "SCORING_PORT": str(_free_port()),
           "AIRFLOW_IMAGE": "rtb-pipeline-airflow:bench", "RTB_JOB_IMAGE": "rtb-pipeline-job:bench",
           "RTB_SAMPLE": "files", "RTB_SAMPLE_ROWS": "20000", "RTB_SAMPLE_TEST_ROWS": "5000",
           "RTB_TRAIN_WINDOW_DAYS": "2", "RTB_PARTITION_POKE_SECONDS": "5",
           "RTB_PARTITION_WAIT_SECONDS": "60"}

    def run_sh(*words: str, timeout: float = 1800) -> None:
        subprocess.run(["sh", "run.sh", *words], cwd=root, env=env, check=True, timeout=timeout,
                       stdout=subprocess.DEVNULL)

    started = time.monotonic()
    run_sh(*executor_up_args(args.executors[0]))
    print(f"stack up ({args.executors[0]}) in {time.monotonic() - started:.0f} s ({root})", flush=True)
    api = rest_client.AirflowClient(f"http://127.0.0.1:{port}", "airflow", "airflow")
    try:
        raw = root / "data" / "raw"
        for name in ("training_data.csv.gz", "test_data.csv.gz"):
            (raw / name).unlink()
        end = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=2)
        requests_start = end - timedelta(days=2)
        # Two labelled days before the request partitions: one training run on them.
        day0 = requests_start.replace(hour=0) - timedelta(days=2)
        seconds = _generate(raw, end=day0 + timedelta(days=2), days=2,
                            rows_per_day=args.rows_per_hour * 24 // 4)
        print(f"two labelled days generated in {seconds:.0f} s", flush=True)
        # A run triggered at a logical date covers the day that ended then: its window is
        # the two days before day0 + 2.
        logical = day0 + timedelta(days=2, hours=6, minutes=1)
        train = api.trigger_interval("train_pipeline", logical.isoformat())
        started = time.monotonic()
        state = api.wait_for_run("train_pipeline", train, 3600)
        print(f"train_pipeline on 2 days: {state} in {time.monotonic() - started:.0f} s; "
              f"stages {_stage_seconds(api, 'train_pipeline', train)}", flush=True)

        seconds = _generate(raw, end=end, days=2, rows_per_day=args.rows_per_hour * 24)
        print(f"48 hourly partitions of {args.rows_per_hour:,} rows generated in {seconds:.0f} s")
        first_hour = end - timedelta(hours=args.hours)
        one = first_hour - timedelta(hours=1)
        started = time.monotonic()
        run_id = api.trigger_interval("predict_pipeline", (one + timedelta(hours=1, minutes=1)).isoformat())
        state = api.wait_for_run("predict_pipeline", run_id, 3600)
        total = time.monotonic() - started
        stages = _stage_seconds(api, "predict_pipeline", run_id)
        ours = sum(stages.values())
        print(f"one hour ({args.rows_per_hour:,} rows), trigger to prediction set: {state} in "
              f"{total:.1f} s; stage containers' own seconds {ours:.1f} ({stages}); "
              f"Airflow, sensor and container start-up {total - ours:.1f} s", flush=True)

        for number, executor in enumerate(args.executors):
            if number:
                started = time.monotonic()
                run_sh("down", "-v", timeout=600)
                run_sh(*executor_up_args(executor))
                print(f"stack down and up again ({executor}) in {time.monotonic() - started:.0f} s",
                      flush=True)
            figures = _backfill(api, first_hour=first_hour, hours=args.hours,
                                max_active_runs=args.max_active_runs)
            print(f"backfill of {args.hours} hours, {executor}: {figures['ok']} succeeded in "
                  f"{figures['wall']:.0f} s, {args.hours / figures['wall'] * 60:.1f} runs per minute "
                  f"(max_active_runs {args.max_active_runs}, load average during it "
                  f"{figures['load_mean']:.1f} mean, {figures['load_max']:.1f} max)", flush=True)
    finally:
        if not args.keep:
            subprocess.run(["sh", "run.sh", "down", "-v"], cwd=root, env=env, timeout=600,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
