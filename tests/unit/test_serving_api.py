"""The HTTP contract of `rtb serve`: endpoints, validation, limits, start-up failures, hot swap.

In-process tests use FastAPI's TestClient on the real ASGI app (fast path included). The
start-up and hot-swap tests run the real `rtb serve` in a subprocess on a free loopback port.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import joblib
import numpy as np
import pytest
from fastapi.testclient import TestClient
from support.live_service import wait_ready
from support.raw_requests import raw_rows

from rtb.config import ProjectPaths
from rtb.dataset_config import load_dataset_config
from rtb.features import feature_frame, rows_frame
from rtb.io_utils import sha256_file, write_yaml
from rtb.models import registry
from rtb.models.pipeline import build_pipeline
from rtb.serving.app import create_app
from rtb.serving.service import ScoringService

CFG = load_dataset_config("rtb")
V1, V2, V3 = "20240101T000000Z", "20240102T000000Z", "20240103T000000Z"
ROW = {
    "id": "5c3d228defaf187a0721c8e8",
    "timestamp": "2019-01-15 00:00:13.419000+00:00",
    "campaignId": "c1",
    "platform": "android",
    "softwareVersion": "v2",
    "sourceGameId": 3,
    "country": "C1",
    "startCount": 20,
    "viewCount": 8,
    "clickCount": 0,
    "installCount": 0,
    "lastStart": "2019-01-14 14:39:32.788000+00:00",
    "startCount1d": 1,
    "startCount7d": 2,
    "connectionType": "net1",
    "deviceType": "d3",
}


def fit(name: str, seed: int):
    rows = raw_rows(1500, seed=seed)
    frame = rows_frame(rows, CFG)
    rng = np.random.default_rng(seed)
    z = -2.5 + 0.05 * np.nan_to_num(frame["viewCount"].to_numpy(dtype=float))
    y = (rng.random(len(z)) < 1 / (1 + np.exp(-z))).astype(int)
    return build_pipeline(name, CFG).fit(feature_frame(frame, CFG), y)


def publish(paths: ProjectPaths, pipeline, version: str, name: str) -> registry.ModelEntry:
    """Write a model and its report the way training does; promote it to champion."""
    model_path = paths.model(version)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(pipeline, model_path)
    sha = sha256_file(model_path)
    write_yaml(paths.report(version), {
        "version": version,
        "model": name,
        "selected": {"name": name, "holdout_log_loss": 0.2},
        "holdout": {"log_loss": 0.2, "roc_auc": 0.6},
        "cv": {"log_loss": {"mean": 0.21, "std": 0.01}},
        "calibration": {"method": "platt_on_log_odds", "slope": 1.0, "intercept": 0.0},
        "training_seconds": 1.5,
        "artifacts": {"model": model_path.name, "model_sha256": sha},
    })
    entry = registry.ModelEntry(model_path, version, sha, 0.2)
    registry.promote(paths, entry, registry.current_champion(paths)
                     if paths.champion_pointer.exists() else None)
    return entry


@pytest.fixture(scope="module")
def models() -> dict[str, object]:
    return {"lr": fit("logreg_target_encoded", 1), "gbm": fit("gbm_target_encoded", 2)}


@pytest.fixture
def paths(tmp_path: Path, models) -> ProjectPaths:
    paths = ProjectPaths(tmp_path / "project")
    publish(paths, models["lr"], V1, "logreg_target_encoded")
    return paths


@pytest.fixture
def client(paths: ProjectPaths):
    service = ScoringService.start(paths, CFG, model_path=None)
    app = create_app(service, max_batch=5, max_body_bytes=20_000, reload_seconds=0)
    with TestClient(app, raise_server_exceptions=False) as test_client:
        test_client.service = service
        yield test_client


def expected(pipeline, rows: list[dict]) -> list[float]:
    processed = rows_frame(rows, CFG)
    return pipeline.predict_proba(feature_frame(processed, CFG))[:, 1].tolist()


def test_health_and_model_describe_the_served_model(client) -> None:
    health = client.get("/health").json()
    assert health == {"status": "ok", "model": V1, "scorer": "compiled"}
    info = client.get("/model").json()
    assert info["version"] == V1
    assert info["sha256"] == sha256_file(client.service.current.entry.path)
    assert info["trained_at"] == "2024-01-01T00:00:00+00:00"
    assert info["holdout"] == {"log_loss": 0.2, "roc_auc": 0.6}
    assert info["model_type"] == "logreg_target_encoded"
    assert info["scorer"] == "compiled" and "matches the pipeline" in info["scorer_reason"]


def test_predict_one_row_and_a_list_in_order(client, models) -> None:
    one = client.post("/predict", json=ROW)
    assert one.status_code == 200
    assert one.json()["model"] == V1
    assert one.json()["probabilities"] == pytest.approx(expected(models["lr"], [ROW]), abs=1e-9)

    rows = raw_rows(5, seed=9, unseen=0.3)
    many = client.post("/predict", json=rows)
    assert many.status_code == 200
    assert many.json()["probabilities"] == pytest.approx(expected(models["lr"], rows), abs=1e-9)
    reversed_rows = client.post("/predict", json=rows[::-1]).json()["probabilities"]
    assert reversed_rows == many.json()["probabilities"][::-1]


def test_optional_fields_may_be_absent_or_null(client, models) -> None:
    minimal = {"timestamp": ROW["timestamp"]}
    nulls = {**minimal, **{k: None for k in ROW if k != "timestamp"}}
    response = client.post("/predict", json=[minimal, nulls])
    assert response.status_code == 200
    assert response.json()["probabilities"] == pytest.approx(
        expected(models["lr"], [minimal, nulls]), abs=1e-9
    )


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"campaignId": "c1"}, ["body", "timestamp"]),
        ({**ROW, "startCount": "many"}, ["body", "startCount"]),
        ({**ROW, "timestamp": "yesterday"}, ["body", "timestamp"]),
        ({**ROW, "viewCount": 1e39}, ["body", "viewCount"]),
        ([ROW, {**ROW, "lastStart": "soon"}], ["body", 1, "lastStart"]),
    ],
)
def test_invalid_fields_are_422_naming_the_field(client, body, loc) -> None:
    response = client.post("/predict", json=body)
    assert response.status_code == 422
    locs = [error["loc"][: len(loc)] for error in response.json()["detail"]]
    assert loc in locs


ISSUE_17_ROW = {  # every kind of garbage a fuzzer got priced, in one request
    **ROW,
    "startCount": -25,
    "startCount1d": -1e16,
    "country": True,
    "softwareVersion": 11.4,
    "timestamp": "0227-05-01T00:00:00-00:58",
    "bidFloor": 0.5,
}
ISSUE_17_FIELDS = {"startCount", "startCount1d", "country", "softwareVersion", "timestamp",
                   "bidFloor"}


def offending(response) -> dict[tuple, dict]:
    assert response.status_code == 422, response.text
    return {tuple(error["loc"][1:]): error for error in response.json()["detail"]}


def test_garbage_is_422_naming_every_offending_field_never_a_price(client) -> None:
    errors = offending(client.post("/predict", json=ISSUE_17_ROW))
    assert set(errors) == {(name,) for name in ISSUE_17_FIELDS}  # all of them, once each
    assert errors[("startCount",)]["expected"] == "a count >= 0 and at most 1e+09"
    assert "greater than or equal to 0" in errors[("startCount1d",)]["msg"]
    assert "valid string" in errors[("country",)]["msg"]
    assert "valid integer" in errors[("country",)]["msg"]
    assert errors[("country",)]["expected"].endswith("or an integer of at most 15 digits")
    assert "years 2000-2099" in errors[("timestamp",)]["expected"]
    assert "pattern" not in errors[("timestamp",)]["msg"]  # words, not the regex
    assert errors[("bidFloor",)]["type"] == "extra_forbidden"


@pytest.mark.parametrize(("field", "value"), [
    ("startCount", -25), ("startCount1d", -1e16), ("viewCount", 2e9), ("clickCount", "3"),
    ("country", True), ("softwareVersion", 11.4), ("deviceType", "a\x00b"),
    ("campaignId", "c" * 257), ("timestamp", "0227-05-01T00:00:00-00:58"),
    ("lastStart", 1547510413), ("timestamp", "2019-02-29 00:00:00"), ("unknownKey", 1),
])
def test_each_invalid_value_is_422_naming_its_field(client, field, value) -> None:
    assert set(offending(client.post("/predict", json={**ROW, field: value}))) == {(field,)}


def test_a_list_names_each_offending_row_and_field(client) -> None:
    rows = [{**ROW, "startCount": -1}, ROW, {**ROW, "country": False, "startCount7d": -2}]
    assert set(offending(client.post("/predict", json=rows))) == {
        (0, "startCount"), (2, "country"), (2, "startCount7d"),
    }
    missing = offending(client.post("/predict", json=[{"campaignId": "c1"}, {}, ROW, {}]))
    assert set(missing) == {(0, "timestamp"), (1, "timestamp"), (3, "timestamp")}


def test_whole_numbers_for_categoricals_score_as_their_digits(client) -> None:
    scores = [client.post("/predict", json={**ROW, "sourceGameId": value}).json()["probabilities"]
              for value in (3, 3.0, "3")]
    assert scores[0] == scores[1] == scores[2]


def test_malformed_json_and_empty_list_are_422(client) -> None:
    bad = client.post("/predict", content=b'{"timestamp": ', headers={"content-type": "a/json"})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["type"] == "json_invalid"
    assert client.post("/predict", json=[]).status_code == 422


def test_too_many_rows_or_bytes_are_413(client) -> None:
    rows = client.post("/predict", json=[ROW] * 6)
    assert rows.status_code == 413
    assert "at most 5 rows" in rows.json()["detail"]
    big = client.post("/predict", json={**ROW, "campaignId": "x" * 30_000})
    assert big.status_code == 413
    assert "at most 20000 bytes" in big.json()["detail"]


def test_errors_never_echo_a_stack_trace(client, monkeypatch) -> None:
    def broken(row):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(client.service.current.scorer, "score_one", broken)
    response = client.post("/predict", json=ROW)
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}
    assert "secret" not in response.text


def test_openapi_documents_predict(client) -> None:
    spec = client.get("/openapi.json").json()
    predict = spec["paths"]["/predict"]["post"]
    body = predict["requestBody"]["content"]["application/json"]
    row = body["schema"]["anyOf"][0]
    assert row["required"] == ["timestamp"] and row["additionalProperties"] is False
    assert body["schema"]["anyOf"][1]["maxItems"] == 5
    count = row["properties"]["startCount"]["anyOf"][0]
    assert (count["type"], count["minimum"], count["maximum"]) == ("number", 0, 1e9)
    assert row["properties"]["timestamp"]["pattern"].startswith("^")
    assert set(predict["responses"]) == {"200", "413", "422", "500"}
    for status in ("413", "422", "500"):
        answer = predict["responses"][status]["content"]["application/json"]
        assert "$ref" in answer["schema"] and answer["example"]["detail"]
    assert "409" in spec["paths"]["/reload"]["post"]["responses"]
    assert client.get("/docs").status_code == 200


def test_fastapi_route_and_fast_path_agree(client) -> None:
    app = client.app
    with TestClient(app.api) as plain:
        for body in (ROW, [ROW, {"timestamp": ROW["timestamp"]}], {"campaignId": 1}, ISSUE_17_ROW):
            fast, slow = client.post("/predict", json=body), plain.post("/predict", json=body)
            assert (fast.status_code, fast.json()) == (slow.status_code, slow.json())


def test_reload_swaps_to_a_new_champion_and_keeps_a_broken_one_out(client, paths, models):
    assert client.post("/reload").json()["reloaded"] is False
    publish(paths, models["gbm"], V2, "gbm_target_encoded")
    result = client.post("/reload").json()
    assert result["reloaded"] is True and result["model"] == V2 and result["previous"] == V1
    assert client.get("/model").json()["version"] == V2
    response = client.post("/predict", json=ROW).json()
    assert response["model"] == V2
    assert response["probabilities"] == pytest.approx(expected(models["gbm"], [ROW]), abs=1e-9)

    entry = publish(paths, models["lr"], V3, "logreg_target_encoded")
    entry.path.write_bytes(entry.path.read_bytes()[:-10])  # truncated after promotion
    broken = client.post("/reload")
    assert broken.status_code == 409
    assert "sha256" in broken.json()["error"]
    assert client.post("/predict", json=ROW).json()["model"] == V2
    assert "sha256" in client.get("/model").json()["last_reload_error"]


# --------------------------------------------------------------------------- real server
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rtb_serve(paths: ProjectPaths, *args: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "rtb.cli", "serve", "--project-dir", str(paths.root), *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("rtb: error:")]


def test_serve_refuses_to_start_on_a_tampered_model(paths: ProjectPaths) -> None:
    model = paths.model(V1)
    model.write_bytes(model.read_bytes() + b"\0")
    process = rtb_serve(paths, "--port", str(free_port()))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert len(error_lines(stderr)) == 1 and "sha256" in error_lines(stderr)[0]
    assert "Traceback" not in stderr


def test_serve_refuses_to_start_on_a_missing_model(paths: ProjectPaths) -> None:
    process = rtb_serve(paths, "--port", str(free_port()), "--model",
                        str(paths.models_dir / "pipeline_20990101T000000Z.pkl"))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    lines = error_lines(stderr)  # the path as given or relative to the project: either names it
    assert len(lines) == 1
    assert lines[0].endswith("models/pipeline_20990101T000000Z.pkl: model file not found")


def test_hot_swap_under_load_drops_no_request(paths: ProjectPaths, models) -> None:
    port = free_port()
    process = rtb_serve(paths, "--port", str(port), "--reload-seconds", "0.3")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, base, timeout=60)
        with httpx.Client(base_url=base, timeout=10) as http:
            seen: list[tuple[int, str | None]] = []
            stop = threading.Event()

            def hammer() -> None:
                with httpx.Client(base_url=base, timeout=10) as worker:
                    while not stop.is_set():
                        response = worker.post("/predict", json=[ROW, ROW])
                        body = response.json() if response.status_code == 200 else {}
                        seen.append((response.status_code, body.get("model")))

            thread = threading.Thread(target=hammer)
            thread.start()
            time.sleep(0.5)
            publish(paths, models["gbm"], V2, "gbm_target_encoded")
            deadline = time.monotonic() + 30
            while http.get("/model").json()["version"] != V2:
                assert time.monotonic() < deadline, "the poll did not pick up the new champion"
                time.sleep(0.1)
            time.sleep(0.5)
            stop.set()
            thread.join(timeout=30)
    finally:
        process.terminate()
        process.communicate(timeout=30)
    statuses = {status for status, _ in seen}
    versions = [version for _, version in seen]
    assert statuses == {200}
    assert versions[0] == V1 and versions[-1] == V2
    switch = versions.index(V2)
    assert set(versions[:switch]) == {V1} and set(versions[switch:]) == {V2}
