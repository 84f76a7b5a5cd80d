"""Schemathesis against a live `rtb serve`: requests generated from the service's own
/openapi.json, every phase (examples, coverage, fuzzing) and every check.

The checks include `positive_data_acceptance` and `negative_data_rejection`, so this holds
the OpenAPI document to the validation itself: a request the schema allows must be scored,
one it forbids must get a 4xx, never a price; every status returned must be documented and
every response body must match its documented schema. The one setting changed from the
defaults: 413 counts as a rejection, because it is this API's documented answer to a list
over the row cap (`maxItems`), which the coverage phase sends on purpose.

Bounded: at most `MAX_EXAMPLES` cases per operation and phase, a fixed seed (CI sees the
same cases every run; set RTB_FUZZ_SEED to explore others), a small row cap, one worker.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from support.live_service import wait_ready
from test_serving_api import V1, fit, free_port, publish, rtb_serve

from rtb.config import ProjectPaths

MAX_EXAMPLES = 60
MAX_BATCH = 4
MIN_CASES = 100
CONFIG = """\
[checks.negative_data_rejection]
expected-statuses = ["400", "413", "422"]
"""


@pytest.fixture(scope="module")
def live_service(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fuzz")
    paths = ProjectPaths(root / "project")
    publish(paths, fit("logreg_target_encoded", 1), V1, "logreg_target_encoded")
    port = free_port()
    process = rtb_serve(paths, "--port", str(port), "--max-batch", str(MAX_BATCH),
                        "--reload-seconds", "0")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, base, timeout=60)
        yield base, root
    finally:
        process.terminate()
        process.communicate(timeout=30)


@pytest.mark.slow
def test_schemathesis_finds_no_failure(live_service) -> None:
    base, root = live_service
    config = root / "schemathesis.toml"
    config.write_text(CONFIG)
    command = [
        sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color",
        "run", f"{base}/openapi.json",
        "--checks", "all",
        "--mode", "all",
        "--phases", "examples,coverage,fuzzing",
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", os.environ.get("RTB_FUZZ_SEED", "1"),
        "--workers", "1",
        "--request-timeout", "10",
    ]
    # Its cache and reports go to the temporary folder, not into the work tree.
    result = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-6000:]
    cases = re.search(r"(\d+) generated, (\d+) passed", report)  # it ran, and all passed
    assert cases is not None and int(cases[1]) >= MIN_CASES and cases[1] == cases[2], report
    assert re.search(r"Tested:\s+4\b", report), report  # /predict, /health, /model, /reload
