"""Where a task's seconds go, measured on a running stack: Airflow's part, the engine's part and
the container's own part of every task of a DAG run.

Usage: `python bench/task_overhead.py [--project-dir DIR] [--dag-id train_pipeline] [--runs 2]`

DIR is an install that is up (`sh run.sh` was run there; default: this repo), with the same
environment as when it was started (a shell override such as COMPOSE_PROJECT_NAME or
AIRFLOW_PORT must be set again). Its compose project name and port come from
`sh run.sh compose config`, so they are whatever that install uses. The script triggers the
DAG `--runs` times, one run after the other, through the REST API (airflow/rest_client.py) and,
while each run goes, records the engine's events of the job containers (`docker events`,
filtered on the `rtb-pipeline.stack` label every task container carries; the containers of
tasks that succeed are removed at once, so `docker inspect` afterwards finds nothing). For each
task instance it prints, in seconds:

- ready->queued: from the end of the task that ran before it (or the run's start) until the
  scheduler queued it (the scheduler loop);
- queued->start: until the executor's supervisor started it (Task SDK process start);
- start->create: until its container was created (the task process parses the DAG file,
  builds the operator, talks to the engine);
- create->start: the engine starting the container;
- container: the container's life, from start to exit, and inside it the stage's own seconds
  (its closing `... in N s` log line; the rest is Python start-up and imports);
- exit->end: fetching the logs, removing the container, XCom, recording the state.

Tasks without a container (the @task ones, the sensor) show only the Airflow columns. A probe
of the job image follows: a bare container (`--entrypoint true`), `rtb --help`, and the
biggest imports of `import rtb.cli` (`python -X importtime`). Figures only, no assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_spec = util.spec_from_file_location("rest_client", REPO / "airflow" / "rest_client.py")
rest_client = util.module_from_spec(_spec)
_spec.loader.exec_module(rest_client)  # type: ignore[union-attr]
sys.path.insert(0, str(REPO / "bench"))
from over_time import STAGE_SECONDS  # noqa: E402  (a stage's closing line: one pattern for both)

STACK_LABEL = "rtb-pipeline.stack"  # set on every job container (airflow/dags/pipeline/common.py)
TASK_LABEL = "rtb-pipeline.task"
IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)")


def _when(text: str | None) -> float | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else None


@dataclass
class Install:
    """What identifies a running install: its compose project, API port and job image."""

    root: Path
    name: str
    port: int
    job_image: str

    @classmethod
    def read(cls, root: Path) -> Install:
        out = subprocess.run(["sh", "run.sh", "compose", "config", "--format", "json"], cwd=root,
                             capture_output=True, text=True, check=True).stdout
        config = json.loads(out)
        services = config["services"]
        port = int(services["airflow-apiserver"]["ports"][0]["published"])
        job_image = services["airflow-scheduler"]["environment"]["RTB_JOB_IMAGE"]
        return cls(root=root, name=config["name"], port=port, job_image=job_image)


@dataclass
class ContainerEvents:
    """The job containers' create/start/die times while a run goes, from `docker events`."""

    stack: str
    by_id: dict[str, dict[str, float | str]] = field(default_factory=dict)

    def __enter__(self) -> ContainerEvents:
        self._process = subprocess.Popen(
            ["docker", "events", "--format", "{{json .}}", "--filter", "type=container",
             "--filter", f"label={STACK_LABEL}={self.stack}"],
            stdout=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            event = json.loads(line)
            if event.get("Action") not in ("create", "start", "die"):
                continue
            seen = self.by_id.setdefault(event["id"], {})
            seen[event["Action"]] = event["timeNano"] / 1e9
            seen["task"] = event["Actor"]["Attributes"].get(TASK_LABEL, "?")

    def __exit__(self, *exc: object) -> None:
        time.sleep(1)  # the last `die` may still be on its way
        self._process.terminate()
        self._process.wait(timeout=10)

    def for_task(self, task_id: str, start: float, end: float) -> dict[str, float] | None:
        """The container of `task_id` created within the task instance's [start, end]."""
        for seen in self.by_id.values():
            if seen.get("task") == task_id and "create" in seen and start <= seen["create"] <= end:
                return {k: v for k, v in seen.items() if isinstance(v, float)}
        return None


def _stage_seconds(api: object, dag_id: str, run_id: str, ti: dict) -> float | None:
    lines = api.task_log_lines(dag_id, run_id, ti["task_id"], ti["try_number"],  # type: ignore[attr-defined]
                               ti.get("map_index", -1))
    found = [float(m.group(1) or m.group(2)) for line in lines if (m := STAGE_SECONDS.search(line))]
    return found[-1] if found else None


def _row(cells: list[object]) -> str:
    name, *rest = cells
    return f"{name!s:<20}" + "".join(f"{cell!s:>14}" for cell in rest)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def report_run(api: object, events: ContainerEvents, dag_id: str, run_id: str) -> dict[str, float]:
    """Print one line per task instance; the run's totals by column."""
    path = f"/api/v2/dags/{dag_id}/dagRuns/{api.quote(run_id)}"  # type: ignore[attr-defined]
    run = api.request("GET", path)  # type: ignore[attr-defined]
    answer = api.request("GET", f"{path}/taskInstances?limit=100")  # type: ignore[attr-defined]
    tis = sorted((ti for ti in answer["task_instances"] if ti.get("start_date")),
                 key=lambda ti: _when(ti["start_date"]))
    ends = [_when(ti["end_date"]) for ti in tis if ti.get("end_date")]
    run_start = _when(run["start_date"])
    totals = dict.fromkeys(("ready->queued", "queued->start", "start->create", "create->start",
                            "container", "stage", "exit->end", "task"), 0.0)
    print(_row(["task", *totals, "state"]))
    for ti in tis:
        queued, start, end = _when(ti.get("queued_when")), _when(ti["start_date"]), _when(ti.get("end_date"))
        ready = max((e for e in ends if queued is not None and e <= queued), default=run_start)
        cells: dict[str, float | None] = dict.fromkeys(totals)
        cells["ready->queued"] = queued - ready if queued is not None else None
        cells["queued->start"] = start - queued if queued is not None else None
        cells["task"] = (end or start) - (queued or start)
        container = events.for_task(ti["task_id"], start, end or time.time())
        if container and {"create", "start", "die"} <= container.keys():
            cells["start->create"] = container["create"] - start
            cells["create->start"] = container["start"] - container["create"]
            cells["container"] = container["die"] - container["start"]
            cells["exit->end"] = (end - container["die"]) if end else None
            cells["stage"] = _stage_seconds(api, dag_id, run_id, ti)
        for key, value in cells.items():
            totals[key] += value or 0.0
        name = ti["task_id"] + (f"[{ti['map_index']}]" if ti.get("map_index", -1) >= 0 else "")
        print(_row([name, *(_fmt(v) for v in cells.values()), ti["state"]]))
    print(_row(["sum", *(_fmt(v) for v in totals.values()), ""]))
    wall = (_when(run["end_date"]) or time.time()) - (_when(run.get("queued_at")) or run_start)
    work = totals["stage"]
    print(f"run {run_id}: {run['state']} in {wall:.1f} s from queued to end; stages' own work "
          f"{work:.1f} s, everything else {wall - work:.1f} s")
    return totals | {"wall": wall}


def _timed(*cmd: str) -> tuple[float, subprocess.CompletedProcess]:
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True)
    return time.monotonic() - started, done


def probe_image(image: str, repeats: int = 3) -> None:
    """Container start-up and Python start-up of the job image, apart from Airflow."""
    size = subprocess.run(["docker", "image", "inspect", "--format", "{{.Size}}", image],
                          capture_output=True, text=True, check=True).stdout.strip()
    print(f"\njob image {image}: {int(size) / 1e6:.0f} MB")
    bare = [_timed("docker", "run", "--rm", "--network", "none", "--entrypoint", "true", image)[0]
            for _ in range(repeats)]
    helps = [_timed("docker", "run", "--rm", "--network", "none", image, "--help")[0]
             for _ in range(repeats)]
    print(f"docker run --rm (entrypoint true): {min(bare):.2f} s best of {repeats}; "
          f"`rtb --help`: {min(helps):.2f} s, so Python start-up and imports "
          f"~{min(helps) - min(bare):.2f} s")
    _, done = _timed("docker", "run", "--rm", "--network", "none", "--entrypoint", "python", image,
                     "-X", "importtime", "-c", "import rtb.cli")
    matches = (IMPORT_LINE.match(line) for line in done.stderr.splitlines())
    rows = [(int(m.group(2)), len(m.group(3)), m.group(4)) for m in matches if m]
    total = max((cumulative for cumulative, _, _ in rows), default=0)
    top = sorted((row for row in rows if row[1] <= 3), reverse=True)[:12]
    print(f"`import rtb.cli`: {total / 1e6:.2f} s cumulative; the biggest top-level imports:")
    for cumulative, _, name in top:
        print(f"  {cumulative / 1e6:6.2f} s  {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--project-dir", type=Path, default=REPO, help="an install that is up")
    parser.add_argument("--dag-id", default="train_pipeline")
    parser.add_argument("--runs", type=int, default=2,
                        help="triggers, one after the other (the first may be colder)")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--user", default="airflow")
    parser.add_argument("--password", default=os.environ.get("RTB_AIRFLOW_PASSWORD", "airflow"))
    args = parser.parse_args(argv)

    install = Install.read(args.project_dir.resolve())
    print(f"install {install.root}: project {install.name}, port {install.port}, image {install.job_image}")
    api = rest_client.AirflowClient(f"http://127.0.0.1:{install.port}", args.user, args.password)
    api.wait_for_dag(args.dag_id)
    for number in range(1, args.runs + 1):
        api.wait_until_idle(args.dag_id, args.timeout)
        before = {run["dag_run_id"] for run in api.runs(args.dag_id)}
        with ContainerEvents(install.name) as events:
            api.trigger(args.dag_id)
            # The first unpause may also queue the schedule's latest interval, which then runs
            # first: it is the cold run after start-up, so it is reported too.
            api.wait_until_idle(args.dag_id, args.timeout)
        new = [run for run in reversed(api.runs(args.dag_id)) if run["dag_run_id"] not in before]
        for run in new:
            print(f"\n{args.dag_id} trigger {number} of {args.runs}: {run['run_type']} run "
                  f"({datetime.now(UTC):%H:%M:%S} UTC)")
            report_run(api, events, args.dag_id, run["dag_run_id"])
    probe_image(install.job_image)
    return 0


if __name__ == "__main__":
    sys.exit(main())
