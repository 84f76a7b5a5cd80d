"""`rtb serve --workers 2`: both processes serve one port, each follows a new champion and a
new A/B file, a scrape of either counts the requests of both, and nothing is left at exit.

With SO_REUSEPORT the kernel picks the process per connection, so every probe here opens a
fresh connection and the test polls until it has heard from both pids.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from support.live_service import samples, stop, value, wait_ready
from test_serving_api import ROW, V1, V2, fit, free_port, publish

from rtb.config import ProjectPaths
from rtb.io_utils import write_yaml
from rtb.serving.ab import ab_path


def until_both(base: str, condition: Callable[[dict], bool], what: str) -> dict[int, dict]:
    """GET /model on fresh connections until two pids have answered with `condition` true."""
    pids: dict[int, dict] = {}
    deadline = time.monotonic() + 60
    while len([info for info in pids.values() if condition(info)]) < 2:
        assert time.monotonic() < deadline, f"{what}: heard only {pids}"
        info = httpx.get(f"{base}/model", timeout=10).json()  # a new connection each time
        pids[info["pid"]] = info
        time.sleep(0.02)
    assert len(pids) == 2, pids
    return pids


def test_two_workers_serve_and_hot_swap_in_both(tmp_path: Path) -> None:
    paths = ProjectPaths(tmp_path / "project")
    publish(paths, fit("gbm_target_encoded", 2), V2, "gbm_target_encoded")
    publish(paths, fit("logreg_target_encoded", 1), V1, "logreg_target_encoded")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    port = free_port()
    command = [sys.executable, "-m", "rtb.cli", "serve", "--project-dir", str(paths.root),
               "--port", str(port), "--workers", "2", "--reload-seconds", "0.3"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TMPDIR": str(scratch)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, base)
        workers = until_both(base, lambda info: info["version"] == V1, "serving V1")
        assert process.pid not in workers
        assert len(list(scratch.glob("rtb-metrics-*"))) == 1  # the shared metrics folder

        sent = 0
        for _ in range(40):  # fresh connections: both workers score some
            response = httpx.post(f"{base}/predict", json=ROW, timeout=10)
            assert response.status_code == 200 and response.json()["model"] == V1
            sent += 1

        publish(paths, fit("logreg_target_encoded", 3), "20240103T000000Z",
                "logreg_target_encoded")
        until_both(base, lambda info: info["version"] == "20240103T000000Z", "hot swap")
        split = {"version": 1, "challenger": V2, "mode": "split", "share": 1.0}
        write_yaml(ab_path(paths.models_dir), split, overwrite=True)
        until_both(base, lambda info: (info["ab"] or {}).get("challenger") == V2, "A/B file")
        for _ in range(10):
            body = httpx.post(f"{base}/predict", json=ROW, timeout=10).json()
            assert (body["arm"], body["model"]) == ("challenger", V2)
            sent += 1

        scrape = samples(base)  # answered by one worker, counting both
        assert value(scrape, "rtb_requests_total", endpoint="/predict", status="200") == sent
        pids = {dict(labels)["pid"] for name, labels in scrape if name == "rtb_model_info"}
        assert pids == {str(pid) for pid in workers}
        assert value(scrape, "rtb_reloads_total", file="champion", outcome="swapped") == 2
    finally:
        stderr = stop(process)
    assert process.returncode == 0, stderr[-3000:]
    assert not list(scratch.glob("rtb-metrics-*")), "the metrics folder is removed at exit"
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists(), f"worker {pid} outlived the server"
