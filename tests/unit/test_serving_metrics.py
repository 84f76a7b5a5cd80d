"""`GET /metrics` of a real `rtb serve`: counters and the histogram move with requests, the
model gauges follow a hot swap, reloads and their failures are counted."""

from __future__ import annotations

import time

import httpx
from support.live_service import samples, stop, value, wait_ready
from test_serving_api import ROW, V1, V2, fit, free_port, publish, rtb_serve

from rtb.config import ProjectPaths, version_time

PREDICT = {"endpoint": "/predict"}


def test_metrics_move_with_requests_and_follow_reloads(tmp_path) -> None:
    paths = ProjectPaths(tmp_path / "project")
    publish(paths, fit("logreg_target_encoded", 1), V1, "logreg_target_encoded")
    port = free_port()
    process = rtb_serve(paths, "--port", str(port), "--reload-seconds", "0", "--max-batch", "10")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, base)
        before = samples(base)
        with httpx.Client(base_url=base, timeout=10) as http:
            for _ in range(5):
                assert http.post("/predict", json=ROW).status_code == 200
            for _ in range(3):
                assert http.post("/predict", json=[ROW] * 4).status_code == 200
            for _ in range(2):
                assert http.post("/predict", json={**ROW, "startCount": -1}).status_code == 422
            assert http.post("/predict", json=[ROW] * 11).status_code == 413
            assert http.get("/health").status_code == 200
        after = samples(base)

        def delta(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        ok = {**PREDICT, "status": "200", "arm": "champion", "model": V1}
        assert delta("rtb_requests_total", **ok) == 8
        assert delta("rtb_rows_total", **ok) == 5 + 3 * 4
        assert delta("rtb_requests_total", **PREDICT, status="422") == 2
        assert delta("rtb_requests_total", **PREDICT, status="413") == 1
        assert delta("rtb_rows_total", **PREDICT, status="422") == 0
        assert delta("rtb_requests_total", endpoint="/health", status="200") == 1
        assert delta("rtb_request_duration_seconds_count", **PREDICT) == 11
        assert delta("rtb_request_duration_seconds_bucket", **PREDICT, le="+Inf") == 11
        edges = {dict(labels).get("le") for name, labels in after
                 if name == "rtb_request_duration_seconds_bucket"}
        assert {"0.0001", "0.0005", "0.001", "0.005", "0.01"} <= edges  # 0.1-10 ms resolved
        info = {"arm": "champion", "model": V1, "scorer": "compiled"}
        assert value(after, "rtb_model_info", **info) == 1
        age = time.time() - version_time(V1).timestamp()
        assert abs(value(after, "rtb_model_age_seconds", arm="champion") - age) < 60
        assert value(after, "rtb_model_info", arm="challenger") == 0

        publish(paths, fit("gbm_target_encoded", 2), V2, "gbm_target_encoded")
        assert httpx.post(f"{base}/reload", timeout=60).json()["reloaded"] is True
        entry = publish(paths, fit("logreg_target_encoded", 3), "20240103T000000Z",
                        "logreg_target_encoded")
        entry.path.write_bytes(entry.path.read_bytes()[:-10])
        assert httpx.post(f"{base}/reload", timeout=60).status_code == 409
        swapped = samples(base)
    finally:
        stop(process)
    assert value(swapped, "rtb_reloads_total", file="champion", outcome="swapped") == 1
    assert value(swapped, "rtb_reloads_total", file="champion", outcome="failed") == 1
    assert value(swapped, "rtb_model_info", arm="champion", model=V1) == 0
    assert value(swapped, "rtb_model_info", arm="champion", model=V2, scorer="compiled") == 1
