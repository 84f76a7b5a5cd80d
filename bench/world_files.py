"""Write one synthetic world (`worlds.py`) as the two raw files and the test labels that
`benchmark.py --raw-dir DIR/raw` reads, so that speed is measured on data our own generator
did not make (and on a world where a different candidate wins).

    .venv/bin/python bench/world_files.py --world nonmonotone --out /tmp/world-nonmonotone
    .venv/bin/python bench/benchmark.py --raw-dir /tmp/world-nonmonotone/raw

`DIR/labels/` gets `y_test.npy` (the labels drawn with the world) and `p_true_test.npy` (its
true probabilities), where the benchmark looks for them; no raw file carries either.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from worlds import WORLDS, draw_world, write_raw  # noqa: E402

log = logging.getLogger("world_files")


def write_world(out: Path, world: str, rows_train: int, rows_test: int, seed: int) -> dict:
    """Draw `world` with `rows_train` training rows and `rows_test` test rows (spread over its
    test days) and write DIR/raw and DIR/labels; what was written, as a dict."""
    spec = WORLDS[world]
    started = time.perf_counter()
    per_day = -(-rows_test // spec.test_days)
    data = draw_world(spec, rows_train, per_day, seed)
    raw_dir, labels_dir = out / "raw", out / "labels"
    for stale in (raw_dir, labels_dir):
        shutil.rmtree(stale, ignore_errors=True)
    write_raw(data, raw_dir)
    labels_dir.mkdir(parents=True)
    np.save(labels_dir / "y_test.npy", data.y_test.astype(np.int8))
    np.save(labels_dir / "p_true_test.npy", np.asarray(data.p_test, dtype=float))
    meta = {"world": world, "rows_train": len(data.train), "rows_test": len(data.test),
            "seed": seed, "test_base_rate": float(data.y_test.mean()),
            "seconds": round(time.perf_counter() - started, 1)}
    (labels_dir / "meta.json").write_text(json.dumps(meta))
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", required=True, choices=sorted(WORLDS))
    parser.add_argument("--rows-train", type=int, default=3_700_000)
    parser.add_argument("--rows-test", type=int, default=3_700_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    meta = write_world(args.out, args.world, args.rows_train, args.rows_test, args.seed)
    log.info("%s", json.dumps(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
