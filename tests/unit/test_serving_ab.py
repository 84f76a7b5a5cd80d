"""Champion/challenger in `rtb serve`: the A/B file, the sticky split, shadow scoring and its
log, `rtb uplift` on that log, and following the A/B file under load.

The service tests run the real `rtb serve` in a subprocess (see tests/support/live_service.py).
"""

from __future__ import annotations

import csv
import gzip
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from support.live_service import samples, stop, value, wait_ready
from test_serving_api import ROW, V1, V2, error_lines, expected, fit, free_port, publish, rtb_serve

from rtb.config import ProjectPaths
from rtb.errors import RtbError
from rtb.io_utils import write_yaml
from rtb.models.metrics import bootstrap_log_loss_uplift, probability_metrics
from rtb.serving.ab import AbConfig, ab_path, bucket, parse_ab
from rtb.serving.shadow import COLUMNS, ShadowLog, ShadowRecord


@pytest.fixture(scope="module")
def pipelines() -> dict[str, object]:
    return {"lr": fit("logreg_target_encoded", 1), "gbm": fit("gbm_target_encoded", 2)}


@pytest.fixture
def paths(tmp_path: Path, pipelines) -> ProjectPaths:
    """Champion V1 (logistic regression); V2 (LightGBM) trained and on disk, not promoted."""
    paths = ProjectPaths(tmp_path / "project")
    publish(paths, pipelines["gbm"], V2, "gbm_target_encoded")
    publish(paths, pipelines["lr"], V1, "logreg_target_encoded")
    return paths


def set_ab(paths: ProjectPaths, **fields: object) -> None:
    write_yaml(ab_path(paths.models_dir), {"version": 1, **fields}, overwrite=True)


def row(request_id: str) -> dict:
    return {**ROW, "id": request_id}


@pytest.fixture
def serve(paths: ProjectPaths):
    """Start `rtb serve` with extra arguments; every process started is stopped at the end."""
    started = []

    def _serve(*args: str) -> str:
        port = free_port()
        process = rtb_serve(paths, "--port", str(port), *args)
        started.append(process)
        base = f"http://127.0.0.1:{port}"
        wait_ready(process, base)
        return base

    yield _serve
    for process in started:
        stop(process)


# --------------------------------------------------------------------------- the file
@pytest.mark.parametrize(("text", "field", "expected_words"), [
    ("version: 2\nchallenger: 20240102T000000Z\nshare: 0.1\n", "version", "expected 1"),
    ("version: 1\nchallenger: latest\nshare: 0.1\n", "challenger", "model version"),
    ("version: 1\nchallenger: 20240102T000000Z\nmode: canary\n", "mode", "'split' or 'shadow'"),
    ("version: 1\nchallenger: 20240102T000000Z\n", "share", "for mode split"),
    ("version: 1\nchallenger: 20240102T000000Z\nshare: 1.5\n", "share", "[0, 1]"),
    ("version: 1\nchallenger: 20240102T000000Z\nshare: true\n", "share", "[0, 1]"),
    ("version: 1\nchallenger: 20240102T000000Z\nshare: 0.1\nsalt: 3\n", "salt", "unknown"),
])
def test_a_bad_ab_file_is_one_line_naming_the_file_and_field(
    tmp_path, text, field, expected_words
) -> None:
    path = tmp_path / "ab.yaml"
    path.write_text(text)
    with pytest.raises(RtbError) as caught:
        parse_ab(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}:")
    assert repr(field) in message and expected_words in message


def test_shadow_mode_scores_every_id_unless_told_a_share(tmp_path) -> None:
    path = tmp_path / "ab.yaml"
    path.write_text("version: 1\nchallenger: 20240102T000000Z\nmode: shadow\n")
    assert parse_ab(path) == AbConfig("20240102T000000Z", "shadow", 1.0)


def test_the_arm_hash_is_a_fixed_function_of_the_id_text() -> None:
    """blake2b of the id: changing it would move every id to another arm on deploy."""
    assert bucket("5c3d228defaf187a0721c8e8") == pytest.approx(0.013628592603240423, abs=0)
    assert bucket("a") == pytest.approx(0.25379361057584854, abs=0)
    assert AbConfig("v", "split", 0.1).picks_challenger(None) is False


# --------------------------------------------------------------------------- split
def test_split_is_sticky_and_near_its_share_over_10k_ids(paths, serve, pipelines) -> None:
    share = 0.3
    set_ab(paths, challenger=V2, mode="split", share=share)
    base = serve("--reload-seconds", "0")
    ids = [f"req-{i:05d}" for i in range(10_000)]

    def ask(chunk: list[str]) -> list[tuple[str, str, float]]:
        with httpx.Client(base_url=base, timeout=10) as http:
            out = []
            for request_id in chunk:
                body = http.post("/predict", json=row(request_id)).json()
                out.append((body["arm"], body["model"], body["probabilities"][0]))
            return out

    def ask_all(wanted: list[str]) -> list[tuple[str, str, float]]:
        chunks = [wanted[i::4] for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            answers = dict(zip(range(4), pool.map(ask, chunks), strict=True))
        by_id = {}
        for index, chunk in enumerate(chunks):
            by_id.update(zip(chunk, answers[index], strict=True))
        return [by_id[i] for i in wanted]

    first = ask_all(ids)
    arms = [arm for arm, _, _ in first]
    assert set(arms) == {"champion", "challenger"}
    assert abs(arms.count("challenger") / len(ids) - share) < 0.02
    # The service's arm is the same function of the id as this process computes: the split
    # does not depend on the process, so it survives restarts and holds across workers.
    assert arms == ["challenger" if bucket(i) < share else "champion" for i in ids]
    assert {model for arm, model, _ in first if arm == "challenger"} == {V2}
    assert {model for arm, model, _ in first if arm == "champion"} == {V1}
    p_gbm, p_lr = expected(pipelines["gbm"], [ROW])[0], expected(pipelines["lr"], [ROW])[0]
    assert {round(p, 12) for arm, _, p in first if arm == "challenger"} == {round(p_gbm, 12)}
    assert {round(p, 12) for arm, _, p in first if arm == "champion"} == {round(p_lr, 12)}
    again = ask_all(ids[::10])
    assert [arm for arm, _, _ in again] == arms[::10]


def test_a_list_takes_the_arm_of_its_first_row(paths, serve) -> None:
    set_ab(paths, challenger=V2, mode="split", share=0.5)
    base = serve("--reload-seconds", "0")
    ids = [f"list-{i}" for i in range(40)]
    for first in ids:
        rows = [row(first), *(row(other) for other in ids[:3])]
        body = httpx.post(f"{base}/predict", json=rows, timeout=10).json()
        assert body["arm"] == ("challenger" if bucket(first) < 0.5 else "champion")
        assert len(body["probabilities"]) == 4


def test_a_broken_ab_file_stops_the_start_with_one_line(paths) -> None:
    set_ab(paths, challenger="20990101T000000Z", mode="split", share=0.1)
    process = rtb_serve(paths, "--port", str(free_port()))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    lines = error_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr
    assert "models/ab.yaml: field 'challenger'" in lines[0]
    assert "pipeline_20990101T000000Z.pkl: model file not found" in lines[0]


# --------------------------------------------------------------------------- shadow
def read_shadow(folder: Path) -> list[dict[str, str]]:
    assert not list(folder.glob("*.part")), "a stopped service leaves no unpublished file"
    rows = []
    for file in sorted(folder.glob("*.csv")):
        with open(file, newline="") as handle:
            reader = csv.DictReader(handle)
            assert reader.fieldnames == COLUMNS
            rows.extend(reader)
    return rows


def write_labels(path: Path, labels: dict[str, int]) -> Path:
    with gzip.open(path, "wt") as handle:
        handle.write("id;timestamp;install\n")
        for request_id, label in labels.items():
            handle.write(f"{request_id};{ROW['timestamp']};{label}\n")
    return path


def test_shadow_logs_both_scores_and_uplift_reports_them(paths, pipelines, run_cli,
                                                         tmp_path) -> None:
    set_ab(paths, challenger=V2, mode="shadow")
    port = free_port()
    process = rtb_serve(paths, "--port", str(port), "--reload-seconds", "0")
    base = f"http://127.0.0.1:{port}"
    rng = np.random.default_rng(3)
    sent: dict[str, dict] = {}
    answered: dict[str, float] = {}
    try:
        wait_ready(process, base)
        with httpx.Client(base_url=base, timeout=10) as http:
            for i in range(120):
                rows = [{**row(f"s{i}-{j}"), "viewCount": int(rng.integers(0, 60)),
                         "campaignId": f"c{int(rng.integers(1, 9))}"} for j in range(1 + i % 3)]
                body = http.post("/predict", json=rows if len(rows) > 1 else rows[0]).json()
                assert body["arm"] == "champion" and body["model"] == V1
                for one, p in zip(rows, body["probabilities"], strict=True):
                    sent[one["id"]], answered[one["id"]] = one, p
            metrics = samples(base)
    finally:
        stop(process)
    logged = read_shadow(paths.reports_dir / "shadow")
    assert sorted(r["id"] for r in logged) == sorted(sent)
    assert value(metrics, "rtb_shadow_rows_total") + value(
        metrics, "rtb_shadow_dropped_rows_total") == len(sent)
    ids = [r["id"] for r in logged]
    gbm = expected(pipelines["gbm"], [sent[i] for i in ids])
    for record, p_challenger in zip(logged, gbm, strict=True):
        assert (record["champion"], record["challenger"]) == (V1, V2)
        assert float(record["champion_p"]) == answered[record["id"]]  # exactly what was sent
        assert float(record["challenger_p"]) == pytest.approx(p_challenger, abs=1e-9)

    labels = {i: int(rng.random() < 0.3) for i in ids}
    labels_file = write_labels(tmp_path / "labelled.csv.gz", labels)
    out = tmp_path / "uplift.yaml"
    result = run_cli("uplift", "--project-dir", str(paths.root), "--labels", str(labels_file),
                     "--out", str(out), "--rounds", "50")
    assert result.code == 0, result.stderr
    report = yaml.safe_load(out.read_text())
    (comparison,) = report["comparisons"]
    y = np.array([labels[i] for i in ids])
    old = np.array([float(r["champion_p"]) for r in logged])
    new = np.array([float(r["challenger_p"]) for r in logged])
    order = np.argsort(ids)  # the report's rows come out of a join; the statistics are the same
    y, old, new = y[order], old[order], new[order]
    assert comparison["rows_labelled"] == len(ids)
    assert comparison["champion_metrics"] == pytest.approx(probability_metrics(y, old), nan_ok=True)
    assert comparison["challenger_metrics"] == pytest.approx(probability_metrics(y, new),
                                                             nan_ok=True)
    uplift = comparison["uplift_vs_champion"]
    assert uplift["uplift"] == pytest.approx(
        bootstrap_log_loss_uplift(y, new, old, rounds=50)["uplift"])
    assert uplift["ci95_low"] <= uplift["uplift"] <= uplift["ci95_high"]
    assert set(comparison["calibration"]) == {"champion", "challenger"}


def test_uplift_errors_name_the_file_and_column(paths, run_cli, tmp_path) -> None:
    log_dir = paths.reports_dir / "shadow"
    log_dir.mkdir(parents=True)
    (log_dir / "shadow_x.csv").write_text(
        ",".join(COLUMNS) + "\n2026-12-01T00:00:00+00:00,a,V1,0.1,V2,0.2\n")
    no_label = tmp_path / "nolabel.csv.gz"
    with gzip.open(no_label, "wt") as handle:
        handle.write("id;timestamp\na;x\n")
    result = run_cli("uplift", "--project-dir", str(paths.root), "--labels", str(no_label))
    assert result.code == 1
    assert result.stderr.strip().endswith("nolabel.csv.gz: column 'install' missing; expected "
                                          "the id and the label")
    other = write_labels(tmp_path / "other.csv.gz", {"b": 1})
    result = run_cli("uplift", "--project-dir", str(paths.root), "--labels", str(other))
    assert result.code == 1 and "no shadow row has a label" in result.stderr
    (log_dir / "shadow_y.csv").write_text(
        ",".join(COLUMNS) + "\n2026-12-01T00:00:00+00:00,a,V1,1.7,V2,0.2\n")
    result = run_cli("uplift", "--project-dir", str(paths.root), "--labels", str(other))
    assert result.code == 1
    assert "shadow_y.csv: column 'champion_p' row 2: expected a probability" in result.stderr
    assert not (paths.reports_dir / "uplift").exists()  # nothing half-written


def test_shadow_log_rotates_by_size_and_drops_when_its_queue_is_full(tmp_path) -> None:
    written, dropped = [], []
    release = threading.Event()

    def slow_writer(rows: int) -> None:  # the disk stalls after the first record
        written.append(rows)
        release.wait(30)

    log = ShadowLog(tmp_path / "shadow", max_bytes=400, queue_size=2,
                    on_written=slow_writer, on_dropped=dropped.append)
    record = ShadowRecord(time.time(), ["a", "b"], V1, [0.1, 0.2], V2, [0.3, 0.4])
    log.put(record)
    deadline = time.monotonic() + 30
    while not written:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for _ in range(5):  # two fit the queue, three are dropped, none blocks
        log.put(record)
    assert dropped == [2, 2, 2]
    release.set()
    while len(written) < 3:  # the two queued ones
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for count in range(4, 14):  # one at a time: none dropped
        log.put(record)
        while len(written) < count:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    log.close()
    assert dropped == [2, 2, 2]
    rows = read_shadow(tmp_path / "shadow")
    assert len(rows) == 2 * (1 + 2 + 10)
    assert len(list((tmp_path / "shadow").glob("*.csv"))) > 1  # 400-byte files rotate


# --------------------------------------------------------------------------- under load
def test_a_reload_of_the_ab_file_under_load_drops_no_request(paths, serve) -> None:
    base = serve("--reload-seconds", "0.2")
    seen: list[tuple[int, str | None]] = []
    stop_load = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=base, timeout=10) as http:
            number = 0
            while not stop_load.is_set():
                number += 1
                response = http.post("/predict", json=[row(f"load-{number}"), ROW])
                body = response.json() if response.status_code == 200 else {}
                seen.append((response.status_code, body.get("arm")))

    def wait_for(condition, what: str) -> None:
        deadline = time.monotonic() + 30
        while not condition(httpx.get(f"{base}/model", timeout=10).json()):
            assert time.monotonic() < deadline, what
            time.sleep(0.05)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        time.sleep(0.5)
        set_ab(paths, challenger=V2, mode="split", share=1.0)
        wait_for(lambda info: info["ab"] is not None, "the A/B file was not picked up")
        time.sleep(0.5)
        split_seen = len(seen)
        # Broken (the arms stay), and written in one rename: a write in place can be seen half
        # done by a poll and then again whole, two failed reloads for one edit.
        broken = ab_path(paths.models_dir).with_name("ab.yaml.new")
        broken.write_text("version: 2\n")
        os.replace(broken, ab_path(paths.models_dir))
        wait_for(lambda info: info["last_ab_error"], "the broken A/B file was not noticed")
        time.sleep(0.5)
        broken_seen = len(seen)
        ab_path(paths.models_dir).unlink()
        wait_for(lambda info: info["ab"] is None, "removing the A/B file did not end the test")
        time.sleep(0.5)
    finally:
        stop_load.set()
        thread.join(timeout=30)
    metrics = samples(base)
    assert {status for status, _ in seen} == {200}
    arms = [arm for _, arm in seen]
    assert arms[0] == "champion" and arms[-1] == "champion"
    assert set(arms[split_seen:broken_seen]) == {"challenger"}  # kept while the file was broken
    first, last = arms.index("challenger"), len(arms) - arms[::-1].index("challenger")
    assert set(arms[first:last]) == {"challenger"}  # one switch each way, nothing in between
    assert value(metrics, "rtb_reloads_total", file="ab", outcome="swapped") == 2
    assert value(metrics, "rtb_reloads_total", file="ab", outcome="failed") == 1
