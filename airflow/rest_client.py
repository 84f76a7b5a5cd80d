"""The one Airflow REST API v2 client: `sh run.sh train|predict` and the system tests use it.

Standard library only, because run.sh runs it with the python inside the api-server container,
fed on stdin (`docker compose exec -T airflow-apiserver python - DAG_ID HOST_PORT TIMEOUT <
airflow/rest_client.py`): there only Airflow's own environment exists, not the rtb package, and
the host needs neither python nor curl. It lives outside airflow/dags/ so that the dag-processor
never parses it, and it is not in the job image.

As a script it logs in as the first SimpleAuthManager user (password from the passwords file),
waits for the DAG to be parsed, unpauses it, triggers a run, prints each task's state until the
run ends, then what the run decided (for train_pipeline: whether the new model was promoted to
champion and why, the line the training task logged) and, if the run failed, the error lines of
each failed task's log. Exit status: 0 when the run succeeded, 1 otherwise (with a `run.sh:
error:` line when no run could be followed).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

log = logging.getLogger(__name__)

POLL_SECONDS = 3
FINISHED = ("success", "failed")
# The task whose log says what a run decided, and the text its line carries: rtb's
# `rtb.models.promotion.PROMOTION_MARK` (this file runs where rtb is not installed).
OUTCOME_LINES = {"train_pipeline": ("training", "promotion decision: ")}


class AirflowClient:
    """A small REST API v2 client, logged in through POST /auth/token (SimpleAuthManager).

    The token is fetched on first use and fetched again once when a call answers 401, so a
    client kept for longer than the token's lifetime (a long run, a long test session) still
    works.
    """

    def __init__(self, base_url: str, username: str, password: str, request_timeout: float = 60) -> None:
        self.base_url = base_url.rstrip("/")
        self.username = username
        self.password = password
        self.request_timeout = request_timeout
        self._token: str | None = None

    def _send(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        request = urllib.request.Request(
            self.base_url + path,
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=self.request_timeout) as response:
            return json.load(response)

    @property
    def token(self) -> str:
        """The access token, logging in if there is none yet."""
        if self._token is None:
            answer = self._send("POST", "/auth/token", {"username": self.username, "password": self.password})
            self._token = answer["access_token"]
        return self._token

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """One authenticated call; its JSON answer. HTTP errors other than one 401 propagate."""
        try:
            return self._send(method, path, body, self.token)
        except urllib.error.HTTPError as exc:
            if exc.code != 401:
                raise
            log.info("%s %s answered 401: logging in again", method, path)
            self._token = None  # expired: log in again once
            return self._send(method, path, body, self.token)

    @staticmethod
    def quote(run_id: str) -> str:
        """A run id as one path segment (manual run ids hold ':' and '+')."""
        return urllib.parse.quote(run_id, safe="")

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> dict:
        """The DAG's details, once known: right after start-up the dag-processor may not have
        parsed the file yet (404). Any other error, or a 404 past `timeout`, propagates."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.request("GET", f"/api/v2/dags/{dag_id}")
            except urllib.error.HTTPError as exc:
                if exc.code != 404 or time.monotonic() > deadline:
                    raise
            time.sleep(POLL_SECONDS)

    def start_run(self, dag_id: str) -> str:
        """Unpause (queued runs of a paused DAG never start) and trigger a run now; its id."""
        self.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        run = self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None})
        return run["dag_run_id"]

    def trigger_interval(self, dag_id: str, logical_date: str, conf: dict | None = None) -> str:
        """Trigger a run for the schedule interval `logical_date` starts (unpausing the DAG)."""
        self.wait_for_dag(dag_id)
        self.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
        run = self.request("POST", f"/api/v2/dags/{dag_id}/dagRuns",
                           {"logical_date": logical_date, "conf": conf or {}})
        return run["dag_run_id"]

    def backfill(self, dag_id: str, from_date: str, to_date: str, max_active_runs: int = 3) -> dict:
        """Create a backfill: one run per schedule interval starting in [from_date, to_date]."""
        self.wait_for_dag(dag_id)
        return self.request("POST", "/api/v2/backfills", {
            "dag_id": dag_id, "from_date": from_date, "to_date": to_date,
            "max_active_runs": max_active_runs, "reprocess_behavior": "none",
        })

    def runs(self, dag_id: str) -> list[dict]:
        """The DAG's runs, newest first."""
        answer = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100&order_by=-run_after")
        return answer["dag_runs"]

    def clear_run(self, dag_id: str, run_id: str) -> None:
        """Clear every task of a run, so that the run (its interval) executes again."""
        self.request("POST", f"/api/v2/dags/{dag_id}/clearTaskInstances", {
            "dag_run_id": run_id, "dry_run": False, "only_failed": False, "reset_dag_runs": True,
        })

    def trigger(self, dag_id: str, dag_timeout: float = 180) -> str:
        """Wait until the DAG is parsed, then unpause and trigger it; the run's id."""
        self.wait_for_dag(dag_id, dag_timeout)
        return self.start_run(dag_id)

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{self.quote(run_id)}")["state"]

    def task_instances(self, dag_id: str, run_id: str) -> dict[str, dict]:
        """The run's task instances by task id, in the API's order."""
        answer = self.request(
            "GET", f"/api/v2/dags/{dag_id}/dagRuns/{self.quote(run_id)}/taskInstances?limit=100"
        )
        return {ti["task_id"]: ti for ti in answer["task_instances"]}

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float = 600) -> str:
        """The run's final state; TimeoutError (with every task's state) past `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.run_state(dag_id, run_id)
            if state in FINISHED:
                return state
            if time.monotonic() > deadline:
                states = {t: ti["state"] for t, ti in self.task_instances(dag_id, run_id).items()}
                raise TimeoutError(f"{dag_id} {run_id} still {state} after {timeout} s: {states}")
            time.sleep(POLL_SECONDS)

    def wait_until_idle(self, dag_id: str, timeout: float = 600) -> None:
        """Until no run of the DAG is queued or running (e.g. one its schedule added)."""
        deadline = time.monotonic() + timeout
        while True:
            runs = self.request("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100")["dag_runs"]
            active = [r["dag_run_id"] for r in runs if r["state"] in ("queued", "running")]
            if not active:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{dag_id}: runs still active after {timeout} s: {active}")
            time.sleep(POLL_SECONDS)

    def task_log_lines(
        self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int | None = None
    ) -> list[str]:
        """The task's log, one string per log event. A mapped task's first instance unless
        `map_index` names another."""
        if map_index is None:
            answer = self.request(
                "GET", f"/api/v2/dags/{dag_id}/dagRuns/{self.quote(run_id)}/taskInstances?limit=100"
            )
            indexes = [ti.get("map_index", -1) for ti in answer["task_instances"] if ti["task_id"] == task_id]
            map_index = min(indexes) if indexes else -1
        answer = self.request(
            "GET",
            f"/api/v2/dags/{dag_id}/dagRuns/{self.quote(run_id)}/taskInstances/{task_id}/logs/{try_number}"
            f"?map_index={map_index}",
        )
        lines = []
        for item in answer["content"]:
            if isinstance(item, dict):
                lines.append(str(item.get("event", item)))
            else:  # older shape: [host, text]
                lines.append(str(item[-1]) if isinstance(item, list) else str(item))
        return lines

    def task_log(
        self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int | None = None
    ) -> str:
        """The task's log as text, one line per log event."""
        return "\n".join(self.task_log_lines(dag_id, run_id, task_id, try_number, map_index))


# ----------------------------------------------------------------------------------------------
# The command run.sh runs in the api-server container


def _out(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def simple_auth_login() -> tuple[str, str]:
    """The first SimpleAuthManager user and its password, from the api-server's environment."""
    user = os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].split(",")[0].split(":")[0]
    with open(os.environ["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]) as handle:
        return user, json.load(handle)[user]


def follow(client: AirflowClient, dag_id: str, run_id: str, timeout: float) -> tuple[str, list[dict]]:
    """Print each task's state as it changes until the run ends; its state and task instances.

    Exits with a `run.sh: error:` line if the run is still going after `timeout` seconds.
    """
    seen: dict[str, tuple[Any, Any]] = {}
    deadline = time.monotonic() + timeout
    while True:
        tis = list(client.task_instances(dag_id, run_id).values())
        for ti in sorted(tis, key=lambda t: t.get("start_date") or "~"):
            state = (ti["state"], ti["try_number"])
            if seen.get(ti["task_id"]) != state:
                seen[ti["task_id"]] = state
                _out(f"  {ti['task_id']:<14} {ti['state'] or 'no status yet'} (try {ti['try_number']})")
        state = client.run_state(dag_id, run_id)
        if state in FINISHED:
            return state, tis
        if time.monotonic() > deadline:
            sys.exit(f"run.sh: error: {dag_id} run {run_id} still {state} after {timeout:.0f} s")
        time.sleep(POLL_SECONDS)


def print_failures(client: AirflowClient, dag_id: str, run_id: str, tis: list[dict]) -> None:
    """For each failed task, its `rtb: error:` and traceback lines, else its last 10 lines."""
    for ti in tis:
        if ti["state"] != "failed":
            continue
        try:
            lines = client.task_log_lines(dag_id, run_id, ti["task_id"], ti["try_number"])
        except (urllib.error.HTTPError, KeyError):
            lines = []
        errors = [line for line in lines if "rtb: error:" in line or "Traceback" in line]
        _out(f"  {ti['task_id']} failed; from its log:")
        for line in errors or lines[-10:]:
            print(f"    {line}", flush=True)


def outcome_line(lines: list[str], marker: str) -> str | None:
    """The last log line holding `marker`, from the marker on (the container's timestamp and
    logger name cut off); None if there is none."""
    for line in reversed(lines):
        at = line.find(marker)
        if at >= 0:
            return line[at:].strip()
    return None


def print_outcome(client: AirflowClient, dag_id: str, run_id: str, tis: list[dict]) -> None:
    """What the run decided, from the log of the task that decides it (train_pipeline: the
    training task's promotion line); nothing for a DAG without such a task."""
    if dag_id not in OUTCOME_LINES:
        return
    task_id, marker = OUTCOME_LINES[dag_id]
    ti = next((ti for ti in tis if ti["task_id"] == task_id), None)
    if ti is None or ti["state"] != "success":
        _out(f"{dag_id}: no {marker.strip(': ')}: task {task_id} {ti['state'] if ti else 'never ran'}")
        return
    try:
        lines = client.task_log_lines(dag_id, run_id, task_id, ti["try_number"])
    except (urllib.error.HTTPError, KeyError):
        lines = []
    line = outcome_line(lines, marker)
    _out(f"{dag_id}: {line}" if line else f"{dag_id}: the {task_id} log has no {marker.strip()!r} line")


def main(argv: list[str] | None = None) -> int:
    """Trigger DAG_ID and follow the run: 0 if it succeeded, 1 if it failed."""
    parser = argparse.ArgumentParser(prog="rest_client", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("dag_id")
    parser.add_argument("host_port", help="the api-server's port on the host, for the printed link")
    parser.add_argument("timeout", type=float, help="seconds to follow the run before giving up")
    parser.add_argument("--base-url", default="http://localhost:8080", help="the api-server, as seen here")
    args = parser.parse_args(argv)
    dag_id = args.dag_id

    user, password = simple_auth_login()
    client = AirflowClient(args.base_url, user, password, request_timeout=30)
    try:
        client.wait_for_dag(dag_id, timeout=120)
    except urllib.error.HTTPError as exc:
        sys.exit(f"run.sh: error: DAG {dag_id} not found ({exc.code}); see Import errors in the UI")
    run_id = client.start_run(dag_id)
    _out(f"{dag_id}: triggered run {run_id} (the DAG is now unpaused, so its schedule is on)")
    _out(f"follow it at http://localhost:{args.host_port}/dags/{dag_id}/runs/{client.quote(run_id)}")

    state, tis = follow(client, dag_id, run_id, args.timeout)
    _out(f"{dag_id}: run {run_id} {state}")
    print_outcome(client, dag_id, run_id, tis)
    if state != "success":
        print_failures(client, dag_id, run_id, tis)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
