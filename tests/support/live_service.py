"""A real `rtb serve` process for tests: wait until it answers, stop it, read its metrics."""

from __future__ import annotations

import subprocess
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families


def wait_ready(process: subprocess.Popen, base: str, timeout: float = 90.0) -> None:
    """Return once GET /health answers 200; fail with the server's stderr if it exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None:
            raise AssertionError(f"rtb serve exited with {process.returncode}: "
                                 f"{process.communicate()[1][-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("rtb serve did not start")
        time.sleep(0.2)


def stop(process: subprocess.Popen) -> str:
    """SIGTERM, wait, and return its stderr."""
    if process.poll() is None:
        process.terminate()
    return process.communicate(timeout=60)[1]


def samples(base: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape of /metrics: {(sample name, sorted labels): value}."""
    response = httpx.get(f"{base}/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(scrape: dict, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 if none)."""
    wanted = set(labels.items())
    return sum(v for (n, found), v in scrape.items() if n == name and wanted <= set(found))
