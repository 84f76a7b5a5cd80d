"""In-process single-row latency of the compiled scorer, per candidate model type.

Usage, from the repository root: `python bench/latency.py --project-dir DIR [--rows 100000] [--repeats 5]`

Why a script and not a test: timings on a shared two-core machine are noise-prone, so they
are printed as figures (STYLE.md), never asserted. Each candidate in
`rtb.models.pipeline.CANDIDATES` is fitted on the project's processed training data (the
earliest `--rows` rows), compiled, checked against the pipeline, and timed on raw rows from
data/raw/test_data.csv.gz (all distinct, so dictionary lookups pay their real cache misses).
Two figures per model: `all` is every timed call; `intrinsic` is, per row, the fastest of
`--repeats` calls, which removes the scheduler noise of a busy machine and leaves the cost
of the row's own path (tree depth, which tables hit).
"""

from __future__ import annotations

import argparse
import gc
import logging
import time
from pathlib import Path

import numpy as np

from rtb.config import ProjectPaths, default_project_dir
from rtb.data.preprocessing import read_processed
from rtb.dataset_config import load_dataset_config
from rtb.features import feature_frame
from rtb.models.pipeline import CANDIDATES, build_pipeline
from rtb.scoring.compiled import compile_pipeline
from rtb.serving.scorer import PipelineScorer

log = logging.getLogger("bench.latency")


def raw_test_rows(paths: ProjectPaths, limit: int) -> list[dict[str, object]]:
    import csv
    import gzip

    cfg = load_dataset_config()
    source = paths.raw_dir / cfg.files["test"]
    rows: list[dict[str, object]] = []
    with gzip.open(source, "rt", newline="") as handle:
        for record in csv.DictReader(handle, delimiter=cfg.separator):
            rows.append({
                k: None if v == "" else float(v) if k in cfg.numerical else v
                for k, v in record.items()
            })
            if len(rows) >= limit:
                break
    return rows


def time_calls(score: object, rows: list[dict], repeats: int) -> np.ndarray:
    """Microseconds per call, shape (repeats, rows)."""
    out = np.empty((repeats, len(rows)))
    clock = time.perf_counter_ns
    for repeat in range(repeats):
        for i, row in enumerate(rows):
            start = clock()
            score(row)  # type: ignore[operator]
            out[repeat, i] = clock() - start
    return out / 1000.0


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", type=Path, default=None)
    parser.add_argument("--rows", type=int, default=100_000, help="training rows per candidate")
    parser.add_argument("--score-rows", type=int, default=5_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    paths = ProjectPaths((args.project_dir or default_project_dir()).resolve())
    cfg = load_dataset_config()
    frame = read_processed(paths.processed_arrow("train"), cfg, require_target=True)
    frame = frame.sort_values(cfg.timestamp, kind="stable", ignore_index=True).iloc[: args.rows]
    X, y = feature_frame(frame, cfg), frame[cfg.target].to_numpy()
    rows = raw_test_rows(paths, args.score_rows)
    figures = []
    for name in CANDIDATES:
        pipeline = build_pipeline(name, cfg).fit(X, y)
        pipeline.set_params(model__slope=0.9, model__intercept=-0.1)
        started = time.perf_counter()
        compiled = compile_pipeline(pipeline, cfg)
        compile_seconds = time.perf_counter() - started
        expected = np.asarray(PipelineScorer(pipeline, cfg).score_many(rows))
        got = np.asarray([compiled.score_one(row) for row in rows])
        gc.collect()
        gc.freeze()  # the service's long-lived tables should not be walked by the GC per call
        timings = time_calls(compiled.score_one, rows, args.repeats)
        pandas_path = time_calls(PipelineScorer(pipeline, cfg).score_one, rows[:200], 1)
        gc.unfreeze()
        intrinsic = timings.min(axis=0)
        figures.append((name, compile_seconds, float(np.abs(got - expected).max()),
                        np.percentile(timings, [50, 99]), np.percentile(intrinsic, [50, 99]),
                        float(np.median(pandas_path))))
    print(f"{'model':<24} {'compile s':>9} {'max |diff|':>10} {'p50 us':>7} {'p99 us':>7} "
          f"{'intr p50':>8} {'intr p99':>8} {'pandas p50 us':>13}")
    for name, seconds, diff, (p50, p99), (i50, i99), pandas_median in figures:
        print(f"{name:<24} {seconds:>9.2f} {diff:>10.1e} {p50:>7.1f} {p99:>7.1f} {i50:>8.1f} "
              f"{i99:>8.1f} {pandas_median:>13.0f}")


if __name__ == "__main__":
    main()
