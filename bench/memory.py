"""Peak memory and seconds of each stage at N and at 4N rows: does memory stay flat?

Each stage runs as a whole `rtb` process (interpreter start and imports included), measured
by `benchmark.run_measured` (wall seconds and the process's own ru_maxrss). The 4N files are
the N files four times over, each copy's ids made fresh (their first character replaced by
one that is not hex), so the rows are as realistic as the generator's and the 4N run reads
exactly four times the bytes. With several `--tree`s (e.g. the last commit and this one) the
trees run in turn, alternating, on the same files: the machine is shared, so compare figures
of one session only.

    .venv/bin/python bench/memory.py --rows 3700000 --work /tmp/memory \\
        --tree before=/work/base/src --tree after=src

Prints one table per tree (seconds and peak MB at N and 4N, and their ratios 4N/N) and, with
two trees, the second tree's figures over the first's at each size.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from benchmark import RAW_FILES, StageRun, _rtb_command, run_measured
from isal import igzip

log = logging.getLogger("bench.memory")

STAGES = [
    ("make_dataset:train", ["make-dataset", "--split", "train"]),
    ("preprocessing:train", ["preprocess", "--split", "train"]),
    ("training", ["train"]),
    ("make_dataset:test", ["make-dataset", "--split", "test"]),
    ("preprocessing:test", ["preprocess", "--split", "test"]),
    ("predicting", ["predict"]),
]
COPIES = 4
FRESH_PREFIXES = b"wxyz"  # not hex digits: a copy's ids can never equal the original's


def generate(raw: Path, rows: int, seed: int) -> None:
    """The N-row files from the generator, unless they are there already."""
    if all((raw / name).exists() for name in RAW_FILES.values()):
        log.info("reusing %s", raw)
        return
    raw.mkdir(parents=True, exist_ok=True)
    subprocess.run([*_rtb_command(), "generate", "--out", str(raw), "--rows-train", str(rows),
                    "--rows-test", str(rows), "--seed", str(seed)], check=True)


def multiply(source: Path, target: Path, copies: int = COPIES) -> None:
    """`copies` times the rows of a raw file, each copy's ids with a fresh first character."""
    if target.exists():
        log.info("reusing %s", target)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    with igzip.open(partial, "wb", compresslevel=1) as out:
        for copy in range(copies):
            with igzip.open(source, "rb") as rows:
                header = rows.readline()
                if copy == 0:
                    out.write(header)
                prefix = FRESH_PREFIXES[copy : copy + 1]
                while lines := rows.readlines(64 << 20):
                    out.write(b"".join(prefix + line[1:] for line in lines))
    partial.rename(target)


def run_tree(name: str, src: Path, raw: Path, project: Path, logs: Path) -> list[StageRun]:
    """Every stage in order in a fresh project whose data/raw links to `raw`, with `src`
    first on the import path; a failed stage ends the chain."""
    shutil.rmtree(project, ignore_errors=True)
    (project / "data" / "raw").mkdir(parents=True)
    for file in RAW_FILES.values():
        (project / "data" / "raw" / file).symlink_to(raw / file)
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(src.resolve())
    runs = []
    try:
        for key, args in STAGES:
            argv = [*_rtb_command(), *args, "--project-dir", str(project)]
            run = run_measured(name, key, argv, logs / f"{key.replace(':', '-')}.log")
            runs.append(run)
            if not run.ok:
                break
    finally:
        if previous is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = previous
    shutil.rmtree(project / "data", ignore_errors=True)  # GBs per size: keep only the logs
    return runs


def _ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}" if num is not None and den else "-"


def _fmt(value: float | None, spec: str) -> str:
    return format(value, spec) if value is not None else "failed"


def render(results: dict[str, dict[str, list[dict]]], sizes: list[str]) -> str:
    """Medians over rounds are not taken: every round is printed (noise is visible)."""
    small, large = sizes
    lines = []
    for tree, by_size in results.items():
        lines += [f"\n## {tree}", "",
                  f"| stage | {small} s | {large} s | time ratio | {small} peak MB | {large} peak MB "
                  "| RSS ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
        for a, b in zip(by_size[small], by_size[large], strict=False):
            lines.append(
                f"| {a['key']} | {_fmt(a['seconds'], '.1f')} | {_fmt(b['seconds'], '.1f')} | "
                f"{_ratio(b['seconds'], a['seconds'])} | {_fmt(a['peak_rss_mb'], ',.0f')} | "
                f"{_fmt(b['peak_rss_mb'], ',.0f')} | {_ratio(b['peak_rss_mb'], a['peak_rss_mb'])} |")
    trees = list(results)
    if len(trees) == 2:
        first, second = trees
        lines += [f"\n## {second} / {first}", "",
                  f"| stage | {small} time | {small} RSS | {large} time | {large} RSS |",
                  "|---|---:|---:|---:|---:|"]
        for position, (key, _) in enumerate(STAGES):
            cells = []
            for size in sizes:
                a, b = results[first][size], results[second][size]
                if position < min(len(a), len(b)):
                    cells += [_ratio(b[position]["seconds"], a[position]["seconds"]),
                              _ratio(b[position]["peak_rss_mb"], a[position]["peak_rss_mb"])]
                else:
                    cells += ["-", "-"]
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3_700_000, help="N: rows of each generated file")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--work", type=Path, required=True, help="data, projects and logs go here")
    parser.add_argument("--raw", type=Path, help="use these N-row raw files instead of generating")
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=SRC",
                        help="a source tree to measure (repeatable; default: this one's src)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds per size")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    trees = dict(item.split("=", 1) for item in args.tree) or {"this": str(Path(__file__).parents[1] / "src")}
    small_raw = args.raw or args.work / "raw-n"
    if args.raw is None:
        generate(small_raw, args.rows, args.seed)
    large_raw = args.work / "raw-4n"
    for file in RAW_FILES.values():
        multiply(small_raw / file, large_raw / file)
    sizes = {f"N={args.rows:,}": small_raw, f"4N={COPIES * args.rows:,}": large_raw}
    results: dict[str, dict[str, list[dict]]] = {tree: {size: [] for size in sizes} for tree in trees}
    for size, raw in sizes.items():
        for round_ in range(args.rounds):
            for tree, src in trees.items():
                tag = f"{tree}-{size.split('=')[0]}-{round_}"
                runs = run_tree(tree, Path(src), raw, args.work / "projects" / tag,
                                args.work / "logs" / tag)
                if round_ == args.rounds - 1 or not results[tree][size]:
                    results[tree][size] = [asdict(run) for run in runs]
                with open(args.work / "runs.jsonl", "a") as out:
                    out.write(json.dumps({"tree": tree, "size": size, "round": round_,
                                          "runs": [asdict(run) for run in runs]}) + "\n")
    print(f"# peak RSS and seconds per stage, {' vs '.join(sizes)} rows (load avg {os.getloadavg()[0]:.1f})")
    print(render(results, list(sizes)))
    print("\nseconds: wall time of the whole process; peak MB: its ru_maxrss; every round is "
          f"in {args.work / 'runs.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
