"""Load test of `rtb serve`: open-loop requests at a fixed rate, latency percentiles, server RSS.

Why open loop: a client that waits for each answer before sending the next slows down
exactly when the server does, and its latencies hide the queue it never built (coordinated
omission). Here request i is *due* at t0 + i / rate whatever happened before; its latency is
measured from that due time, so time spent waiting for a free connection counts. The
client is a minimal HTTP/1.1 keep-alive client on raw asyncio streams (uvloop when
installed) so that, on a two-core machine, it takes as little CPU from the server as possible.

By default the script starts the service itself (`python -m rtb.cli serve`) on a free
loopback port from `--project-dir` (its champion, or `--model`), and reads the server's RSS
from /proc at the start and the end of each phase. `--url` targets a running service
instead (loopback addresses only; pass `--server-pid` to get its RSS).

Usage:
    python bench/load_test.py --project-dir /tmp/x                    # 60 s + 60 s at 1,000/s
    python bench/load_test.py --project-dir /tmp/x --duration 10 --batch-sizes 1
    python bench/load_test.py --project-dir /tmp/x --batch-sizes 1,100 --rates 1000,300
    python bench/load_test.py --url http://127.0.0.1:8000 --server-pid 1234
    python bench/load_test.py --project-dir /tmp/x --serve-args "--workers 2" --batch-sizes 100
    python bench/load_test.py --project-dir /tmp/x --scrape-interval 1   # GET /metrics each 1 s
    python bench/load_test.py --project-dir /tmp/x --batch-sizes 1,1,1,1 --scrape-intervals 0,1,0,1

With `--workers N` the RSS and CPU figures are those of the whole process tree (the parent
and its workers). `--scrape-interval` scrapes /metrics on a connection of its own during
each phase, so that a run with and one without it show what a scrape costs the requests.

Request rows come from the project's data/raw/test_data.csv.gz when it exists (realistic
levels and gaps), else from `raw_rows` of tests/support/raw_requests.py (test tooling, not
part of the installed package).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gzip
import ipaddress
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from rtb.dataset_config import load_dataset_config

log = logging.getLogger("bench.load_test")

# The synthetic request rows are test tooling; they live with the tests, not in the package.
TESTS_DIR = Path(__file__).resolve().parents[1] / "tests"

CFG = load_dataset_config("rtb")
DRAIN_SECONDS = 10.0


@dataclass
class PhaseResult:
    """Figures of one phase (one batch size at one target rate)."""

    batch_rows: int
    target_rps: float
    seconds: float
    sent: int
    ok: int
    errors: int  # non-200 answers and failed connections
    unfinished: int  # still queued or in flight when the drain window closed (overload)
    achieved_rps: float
    rows_per_s: float
    latency_ms: dict[str, float]
    service_ms: dict[str, float]
    rss_start_mb: float | None
    rss_end_mb: float | None
    server_cpu_percent: float | None
    client_cpu_percent: float
    load_average: float
    scrapes: int = 0
    scrape_ms: dict[str, float] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- requests
def load_rows(project_dir: Path | None, limit: int) -> list[dict[str, object]]:
    """Raw rows as JSON-ready dicts: the project's test log if present, else synthetic."""
    source = project_dir / "data" / "raw" / CFG.files["test"] if project_dir else None
    if source is None or not source.exists():
        if str(TESTS_DIR) not in sys.path:
            sys.path.insert(0, str(TESTS_DIR))
        # The synthetic rows are deliberately awkward and some (negative counts) are invalid
        # requests now: keep those the service's own request model accepts, so every request
        # is scored rather than answered 422.
        from pydantic import ValidationError
        from support.raw_requests import raw_rows

        from rtb.serving.schema import adapters

        one_row = adapters(CFG, 1)[0]
        rows = []
        for row in raw_rows(limit * 2, seed=11, unseen=0.05):
            try:
                one_row.validate_python(row)
            except ValidationError:
                continue
            rows.append(row)
        log.info("request rows: %d synthetic rows (tests/support/raw_requests.py)", limit)
        return rows[:limit]
    rows: list[dict[str, object]] = []
    with gzip.open(source, "rt", newline="") as handle:
        for record in csv.DictReader(handle, delimiter=CFG.separator):
            row: dict[str, object] = {}
            for key, value in record.items():
                if value == "":
                    row[key] = None
                elif key in CFG.numerical:
                    row[key] = float(value)
                else:
                    row[key] = value
            rows.append(row)
            if len(rows) >= limit:
                break
    log.info("request rows: %d rows from %s", len(rows), source)
    return rows


def request_bodies(rows: list[dict[str, object]], batch: int, count: int) -> list[bytes]:
    """`count` distinct JSON bodies of `batch` rows (one object when batch == 1)."""
    bodies = []
    for i in range(count):
        if batch == 1:
            payload: object = rows[i % len(rows)]
        else:
            start = (i * batch) % len(rows)
            payload = [rows[(start + j) % len(rows)] for j in range(batch)]
        bodies.append(json.dumps(payload, separators=(",", ":")).encode())
    return bodies


# --------------------------------------------------------------------------- HTTP client
class Connection:
    """One keep-alive HTTP/1.1 connection; one request in flight at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes, method: str = "POST") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            sock = self.writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        self.writer.write(head + body)
        assert self.reader is not None
        header = await self.reader.readuntil(b"\r\n\r\n")
        status = int(header[9:12])
        length = 0
        for line in header.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        payload = await self.reader.readexactly(length) if length else b""
        if b"connection: close" in header.lower():
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass
        self.reader = self.writer = None


async def run_phase(host: str, port: int, bodies: list[bytes], rate: float, seconds: float,
                    connections: int
                    ) -> tuple[np.ndarray, np.ndarray, int, int, int, list[str]]:
    """Open-loop: request i is due at t0 + i/rate. Returns latencies from due time (s), service
    times (s), ok, error and unfinished counts and a few error samples."""
    queue: asyncio.Queue[tuple[int, float] | None] = asyncio.Queue()
    total = int(rate * seconds)
    latency = np.full(total, np.nan)
    service = np.full(total, np.nan)
    counts = {"ok": 0, "errors": 0}
    samples: list[str] = []

    async def worker() -> None:
        connection = Connection(host, port)
        try:
            while (item := await queue.get()) is not None:
                index, due = item
                sent = time.perf_counter()
                try:
                    status, payload = await asyncio.wait_for(
                        connection.post("/predict", bodies[index % len(bodies)]), DRAIN_SECONDS
                    )
                except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    status, payload = 0, f"{type(exc).__name__}: {exc}".encode()
                    await connection.close()
                done = time.perf_counter()
                latency[index] = done - due
                service[index] = done - sent
                if status == 200:
                    counts["ok"] += 1
                else:
                    counts["errors"] += 1
                    if len(samples) < 5:
                        samples.append(f"{status} {payload[:200]!r}")
        finally:
            await connection.close()

    workers = [asyncio.create_task(worker()) for _ in range(connections)]
    start = time.perf_counter()
    for index in range(total):
        due = start + index / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queue.put_nowait((index, due))
    for _ in workers:
        queue.put_nowait(None)
    try:
        await asyncio.wait_for(asyncio.gather(*workers), seconds + DRAIN_SECONDS)
    except TimeoutError:
        for task in workers:
            task.cancel()
    unfinished = int(np.isnan(latency).sum())
    return latency, service, counts["ok"], counts["errors"], unfinished, samples


async def scrape_metrics(host: str, port: int, interval: float, seconds: float) -> np.ndarray:
    """GET /metrics every `interval` seconds for `seconds`, on a connection of its own;
    returns each scrape's duration (s)."""
    connection = Connection(host, port)
    durations = []
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < seconds:
            await asyncio.sleep(interval)
            sent = time.perf_counter()
            status, _ = await connection.post("/metrics", b"", method="GET")
            if status == 200:
                durations.append(time.perf_counter() - sent)
    finally:
        await connection.close()
    return np.array(durations)


# --------------------------------------------------------------------------- server process
def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (`rtb serve --workers N` is a parent and N workers)."""
    pids, index = [pid], 0
    while index < len(pids):
        try:
            text = Path(f"/proc/{pids[index]}/task/{pids[index]}/children").read_text()
        except OSError:
            text = ""
        pids.extend(int(child) for child in text.split())
        index += 1
    return pids


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    total = None
    for member in process_tree(pid):
        try:
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total = (total or 0.0) + int(line.split()[1]) / 1024.0
        except OSError:
            continue
    return total


def cpu_seconds(pid: int | None) -> float | None:
    if pid is None:
        return None
    total = None
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total = (total or 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(project_dir: Path, model: Path | None, max_batch: int,
                 extra: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "rtb.cli", "serve", "--project-dir", str(project_dir),
               "--port", str(port), "--max-batch", str(max_batch), *(extra or [])]
    if model:
        command += ["--model", str(model)]
    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"rtb-serve-{port}.log"
    handle = open(log_path, "w")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"rtb serve exited with {process.returncode}; see {log_path}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
            # With --workers the first worker listens before the others have loaded; wait for
            # all of them, or every keep-alive connection would go to the first.
            if "--workers" in (extra or []) and "workers serving on" not in log_path.read_text():
                time.sleep(0.2)
                continue
            log.info("server pid %d on %s (log %s)", process.pid, url, log_path)
            return process, url
        except OSError:
            time.sleep(0.2)
    process.terminate()
    raise SystemExit(f"rtb serve did not listen within 120 s; see {log_path}")


def check_loopback(host: str) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"--url host {host!r}: only loopback addresses may be load-tested")


# --------------------------------------------------------------------------- main
def percentiles(values: np.ndarray) -> dict[str, float]:
    values = values[~np.isnan(values)] * 1e3
    if not len(values):
        return {}
    p50, p95, p99, p999 = np.percentile(values, [50, 95, 99, 99.9])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "p99.9": float(p999),
            "max": float(values.max())}


async def main_async(args: argparse.Namespace, url: str, pid: int | None,
                     rows: list[dict[str, object]]) -> list[PhaseResult]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    results = []
    if args.warmup > 0:
        bodies = request_bodies(rows, 1, 200)
        await run_phase(host, port, bodies, args.rate, args.warmup, args.connections)
    for batch, rate, interval in zip(args.batch_sizes, args.rates, args.scrape_intervals,
                                     strict=True):
        bodies = request_bodies(rows, batch, 200)
        rss_start, cpu_start = rss_mb(pid), cpu_seconds(pid)
        client_start = time.process_time()
        started = time.perf_counter()
        scraper = (asyncio.create_task(scrape_metrics(host, port, interval, args.duration))
                   if interval else None)
        latency, service, ok, errors, unfinished, samples = await run_phase(
            host, port, bodies, rate, args.duration, args.connections
        )
        scrapes = await scraper if scraper is not None else np.array([])
        elapsed = time.perf_counter() - started
        client_cpu = (time.process_time() - client_start) / elapsed
        cpu_end = cpu_seconds(pid)
        cpu = None if cpu_start is None or cpu_end is None else (cpu_end - cpu_start) / elapsed
        results.append(PhaseResult(
            batch_rows=batch,
            target_rps=rate,
            seconds=round(elapsed, 2),
            sent=len(latency),
            ok=ok,
            errors=errors,
            unfinished=unfinished,
            achieved_rps=round(ok / elapsed, 1),
            rows_per_s=round(ok * batch / elapsed, 1),
            latency_ms=percentiles(latency),
            service_ms=percentiles(service),
            rss_start_mb=rss_start,
            rss_end_mb=rss_mb(pid),
            server_cpu_percent=None if cpu is None else round(100 * cpu, 1),
            client_cpu_percent=round(100 * client_cpu, 1),
            load_average=os.getloadavg()[0],
            error_samples=samples,
            scrapes=len(scrapes),
            scrape_ms=percentiles(scrapes),
        ))
        log.info("phase batch=%d done: %s", batch, results[-1])
    return results


def print_table(results: list[PhaseResult], rss_before: float | None) -> None:
    nan = float("nan")
    print(f"server RSS before load: {nan if rss_before is None else rss_before:.1f} MB")
    print(f"{'rows/req':>8} {'target/s':>8} {'achieved/s':>10} {'rows/s':>9} {'errors':>6} "
          f"{'unfin.':>6} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'max ms':>8} "
          f"{'svc p99':>8} {'RSS start':>9} {'RSS end':>8} {'srv CPU%':>8} {'cli CPU%':>8} "
          f"{'load1':>5}")
    for r in results:
        lat = [r.latency_ms.get(k, nan) for k in ("p50", "p95", "p99", "max")]
        cells = [
            f"{r.batch_rows:>8}", f"{r.target_rps:>8.0f}", f"{r.achieved_rps:>10.1f}",
            f"{r.rows_per_s:>9.0f}", f"{r.errors:>6}", f"{r.unfinished:>6}",
            *(f"{value:>8.2f}" for value in lat), f"{r.service_ms.get('p99', nan):>8.2f}",
            f"{nan if r.rss_start_mb is None else r.rss_start_mb:>9.1f}",
            f"{nan if r.rss_end_mb is None else r.rss_end_mb:>8.1f}",
            f"{nan if r.server_cpu_percent is None else r.server_cpu_percent:>8.1f}",
            f"{r.client_cpu_percent:>8.1f}", f"{r.load_average:>5.1f}",
        ]
        print(" ".join(cells))
        for sample in r.error_samples:
            print(f"    error sample: {sample}")
        if r.scrapes:
            print(f"    /metrics scrapes: {r.scrapes}, p50 {r.scrape_ms['p50']:.2f} ms, "
                  f"max {r.scrape_ms['max']:.2f} ms")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", type=Path, default=None,
                        help="project with a promoted model (default: $RTB_PROJECT_DIR or .)")
    parser.add_argument("--model", type=Path, default=None, help="serve this model file")
    parser.add_argument("--url", default=None, help="test a running service (loopback only)")
    parser.add_argument("--server-pid", type=int, default=None, help="its pid, for RSS")
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before measuring")
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 100], help="rows per request, one phase each")
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")],
                        default=None, help="requests/s per phase (default: --rate for all)")
    parser.add_argument("--connections", type=int, default=32, help="keep-alive connections")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--serve-args", default="",
                        help='extra `rtb serve` arguments, e.g. "--workers 2"')
    parser.add_argument("--scrape-interval", type=float, default=0.0,
                        help="GET /metrics every this many seconds during each phase (0: never)")
    parser.add_argument("--scrape-intervals", type=lambda s: [float(x) for x in s.split(",")],
                        default=None, help="one --scrape-interval per phase, e.g. 0,1,0,1 to "
                        "alternate phases without and with scraping on the same server")
    args = parser.parse_args(argv)
    args.rates = args.rates or [args.rate] * len(args.batch_sizes)
    if len(args.rates) != len(args.batch_sizes):
        parser.error("--rates needs one rate per --batch-sizes entry")
    args.scrape_intervals = args.scrape_intervals or [args.scrape_interval] * len(args.batch_sizes)
    if len(args.scrape_intervals) != len(args.batch_sizes):
        parser.error("--scrape-intervals needs one interval per --batch-sizes entry")
    if min(args.rates) <= 0 or args.duration <= 0 or args.duration > 600:
        parser.error("rates must be > 0 and --duration in (0, 600] seconds")
    return args


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    project_dir = (args.project_dir or Path(os.environ.get("RTB_PROJECT_DIR", "."))).resolve()
    process = None
    if args.url:
        check_loopback(urlsplit(args.url).hostname or "")
        url, pid = args.url, args.server_pid
    else:
        import shlex

        process, url = start_server(project_dir, args.model, max(args.batch_sizes),
                                    shlex.split(args.serve_args))
        pid = process.pid
    try:
        rows = load_rows(project_dir, 20_000)
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        rss_before = rss_mb(pid)
        results = asyncio.run(main_async(args, url, pid, rows))
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
    print_table(results, rss_before)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))


if __name__ == "__main__":
    main()
