"""Publishing a prediction set to Redis: keys per second of `rtb publish`, and a read's latency.

A set of N scores (default 3.7M, the size of one test file) is written by the real set writer
(`write_prediction_set`) into a temporary project, a Redis server of its own is started from
$REDIS_IMAGE (the compose file's default otherwise), and `rtb publish` runs as a whole
process, timed from start to exit. Then single GETs of random published ids are timed one by
one from this process (what another backend service does), and Redis's memory is read.

    .venv/bin/python bench/publish_speed.py --rows 3700000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa

from rtb.config import ProjectPaths
from rtb.models.make_predicting import write_prediction_set

TESTS_DIR = Path(__file__).resolve().parents[1] / "tests"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3_700_000)
    parser.add_argument("--reads", type=int, default=10_000)
    parser.add_argument("--batch-rows", type=int, default=10_000)
    args = parser.parse_args()
    import redis

    if str(TESTS_DIR) not in sys.path:
        sys.path.insert(0, str(TESTS_DIR))
    from support.redis_server import running_redis

    with running_redis("rtb-publish-bench") as port:
        client = redis.Redis(port=port)
        with tempfile.TemporaryDirectory() as tmp:
            paths = ProjectPaths(Path(tmp) / "project")
            paths.predictions_dir.mkdir(parents=True)
            rng = np.random.default_rng(0)
            ids = pa.chunked_array([pa.array([uuid.UUID(int=int(v)).hex for v in
                                              rng.integers(0, 2**63, args.rows)])])
            probabilities = rng.beta(1, 80, args.rows)
            sidecar = {"version": "20261201T000000Z", "rows": args.rows,
                       "model": {"file": "pipeline_bench.pkl", "version": "bench", "sha256": ""}}
            write_prediction_set(paths, "20261201T000000Z", ids, probabilities, sidecar)
            rtb = Path(sys.executable).with_name("rtb")
            started = time.perf_counter()
            result = subprocess.run(
                [str(rtb), "publish", "--redis-url", f"redis://127.0.0.1:{port}/0",
                 "--batch-rows", str(args.batch_rows), "--project-dir", str(paths.root)],
                capture_output=True, text=True,
            )
            seconds = time.perf_counter() - started
            if result.returncode != 0:
                print(result.stderr, file=sys.stderr)
                return 1
            sample = rng.choice(args.rows, size=args.reads, replace=False)
            keys = [f"rtb:score:{ids[int(i)].as_py()}" for i in sample]
            timings = np.empty(len(keys))
            for i, key in enumerate(keys):
                t0 = time.perf_counter_ns()
                value = client.get(key)
                timings[i] = (time.perf_counter_ns() - t0) / 1e3
                assert value is not None
        memory = client.info("memory")["used_memory"]
        print(f"rtb publish of {args.rows:,} scores: {seconds:.1f} s as a whole process, "
              f"{args.rows / seconds:,.0f} keys/s (batch {args.batch_rows:,}); "
              f"Redis memory {memory / 2**20:,.0f} MiB ({memory / args.rows:.0f} B/key)")
        p50, p99, p999 = np.percentile(timings, [50, 99, 99.9])
        print(f"GET of one score, {args.reads:,} random ids, one at a time: p50 {p50:.0f} us, "
              f"p99 {p99:.0f} us, p99.9 {p999:.0f} us (client round trip over loopback)")
        print(f"load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
