"""Seconds per million rows of the drift watch: profiling a training window, and the drift of
a scored interval against that profile.

Usage, from the repository root: `python bench/drift_speed.py [--rows 1000000] [--repeats 5]`

Why a script and not a test: timings on a shared two-core machine are noise-prone, so they
are printed as figures (the median of several repeats), never asserted. The frames are
RTB-shaped and come through the real stages: `rtb.data.generate.generate_raw` writes a
training and a test log of `--rows` rows each (about 9k campaigns, 40k source games, 33k
device models, new campaigns in the test window), `make_dataset` and `preprocess` turn them
into processed tables, and Arrow hands them to pandas as the stages read them (categoricals
as `category`, numerics float32 with NaN gaps). No model is trained: the scores are Beta draws
around the generator's 1.2% base rate, which costs the same to bin as real ones. The model's
vocabularies are stood in for by the training frame's levels.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from rtb.data.generate import generate_raw
from rtb.data.make_dataset import make_dataset
from rtb.data.preprocessing import preprocess
from rtb.dataset_config import DatasetConfig, load_dataset_config
from rtb.monitoring import drift_report, profile_training_window


def processed_frames(rows: int, seed: int, cfg: DatasetConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Processed train and test frames of `rows` rows each, through the real stages."""
    with tempfile.TemporaryDirectory(prefix="drift-bench-") as tmp:
        train_path, test_path = generate_raw(Path(tmp), rows_train=rows, rows_test=rows, seed=seed)
        frames = []
        for path, split in ((train_path, "train"), (test_path, "test")):
            table = preprocess(make_dataset(path, cfg, split), cfg, source=path.name)
            frames.append(table.unify_dictionaries().to_pandas(split_blocks=True, self_destruct=True))
    return frames[0], frames[1]


def median_seconds(work: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows per frame (default 1M)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    cfg = load_dataset_config("rtb")

    started = time.perf_counter()
    train, test = processed_frames(args.rows, args.seed, cfg)
    rng = np.random.default_rng(args.seed)
    train_scores = rng.beta(1.2, 100.0, len(train))
    test_scores = rng.beta(1.3, 100.0, len(test))
    known = {name: train[name].cat.categories for name in cfg.categorical}
    print(f"data: {len(train):,} train + {len(test):,} test rows, {len(cfg.categorical)} categoricals "
          f"({', '.join(f'{c} {train[c].cat.categories.size:,}' for c in cfg.categorical)}), "
          f"{len(cfg.feature_numerical)} numerics; built in {time.perf_counter() - started:.1f} s")

    profile = profile_training_window(train, cfg, scores=train_scores)
    per_million = 1e6 / args.rows
    t_profile, all_profile = median_seconds(
        lambda: profile_training_window(train, cfg, scores=train_scores), args.repeats
    )
    t_drift, all_drift = median_seconds(
        lambda: drift_report(test, profile, scores=test_scores, known_levels=known), args.repeats
    )
    report = drift_report(test, profile, scores=test_scores, known_levels=known)
    print(f"profile: {t_profile * per_million:.3f} s per 1M rows "
          f"(median of {args.repeats}; runs {', '.join(f'{t:.3f}' for t in all_profile)} s)")
    print(f"drift:   {t_drift * per_million:.3f} s per 1M rows "
          f"(median of {args.repeats}; runs {', '.join(f'{t:.3f}' for t in all_drift)} s)")
    print(f"profile dict: {len(str(profile.to_dict())):,} characters")
    print(report.summary())


if __name__ == "__main__":
    main()
