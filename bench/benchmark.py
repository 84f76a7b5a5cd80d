"""Reference solution vs. our `rtb` CLI: seconds, peak RSS and test quality, in one session.

Why one script and one session: the machine is shared and noisy, so figures taken on different
days or hosts cannot be compared. This script generates (or reuses) one dataset, runs the
re-enacted reference (`bench/reference.py`) and then our CLI chain on the very same raw files,
each stage in its own process, and scores both on the same held-back test labels.

Peak RSS is the stage process's `ru_maxrss` from `os.wait4` (Linux reports the largest RSS of
the process and of any descendant it reaped), taken by a tiny launcher so that the benchmark's
own memory cannot leak into the figure (see `_LAUNCHER`). Because several processes alive at
once add up, the stage's summed process-tree RSS is also sampled with psutil; stages where it
exceeds `ru_maxrss` are flagged in the table.

The raw test file carries no labels. Test labels are drawn once as Bernoulli(p_true) with a
fixed generator and kept in `<work>/labels/`, never in a raw file, so neither side can see them.

Usage: see bench/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil

from rtb.dataset_config import load_dataset_config
from rtb.models.metrics import base_rate_entropy, probability_metrics
from rtb.models.training_report import git_sha, library_versions

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger("bench")

BENCH_DIR = Path(__file__).resolve().parent
REFERENCE_SCRIPT = BENCH_DIR / "reference.py"
RTB = load_dataset_config("rtb")  # the schema of the generated raw files
RAW_FILES = {"train": RTB.files["train"], "test": RTB.files["test"]}
LABEL_SEED_OFFSET = 1_000_003  # labels use their own stream, never the generator's
TREE_FLAG_RATIO = 1.10
# Stage keys in table order: (key, label).
STAGES: list[tuple[str, str]] = [
    ("make_dataset:train", "make_dataset (train)"),
    ("preprocessing:train", "preprocessing (train)"),
    ("training", "training"),
    ("make_dataset:test", "make_dataset (test)"),
    ("preprocessing:test", "preprocessing (test)"),
    ("predicting", "predicting"),
]
SIDES = {
    "train": ["make_dataset:train", "preprocessing:train", "training"],
    "predict": ["make_dataset:test", "preprocessing:test", "predicting"],
}
# The reference has no preprocessing stage: its make_dataset reads, derives, fills and writes
# the processed CSV in one process (see bench/reference.py).
REFERENCE_SIDES = {
    "train": ["make_dataset:train", "training"],
    "predict": ["make_dataset:test", "predicting"],
}
REFERENCE_STAGE_KEYS = [key for keys in REFERENCE_SIDES.values() for key in keys]
# Environment variables that would silently change what our CLI reads.
SCRUBBED_ENV = ("RTB_PROJECT_DIR", "RTB_DATASET_CONFIG")


@dataclass
class StageRun:
    """One measured child process."""

    side: str
    key: str
    argv: list[str]
    log_path: str
    # None until measured, so that results.json stays plain JSON (no NaN) for failed stages.
    seconds: float | None = None
    cpu_seconds: float | None = None
    load_1m_start: float | None = None
    peak_rss_mb: float | None = None
    tree_peak_rss_mb: float | None = None
    returncode: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass
class Dataset:
    """The raw files both sides read, and the test labels only the scorer reads."""

    raw_dir: Path
    y_test: np.ndarray | None
    p_true_test: np.ndarray | None
    generated_seconds: float | None = None
    notes: list[str] = field(default_factory=list)


class _TreeSampler(threading.Thread):
    """Samples the summed RSS of a process's descendants (not itself) until told to stop.

    `ru_maxrss` is a per-process maximum; when a stage runs worker processes side by side the
    machine needs their sum, which only sampling can show (sampling can miss short spikes).
    """

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_bytes = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop_event.is_set():
            total = 0
            try:
                procs = root.children(recursive=True)
            except psutil.Error:
                procs = []
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    continue
            self.peak_bytes = max(self.peak_bytes, total)
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])


# Runs as `python -I -S -c _LAUNCHER OUT_JSON ARGV...`: forks and execs the stage, then
# reports the stage's wall seconds, exit code and ru_maxrss. Why not wait4 on a child of the
# benchmark itself: Linux keeps a process's ru_maxrss across exec and seeds it with the RSS of
# the memory image the child was forked (or vforked) from, so every child of a big parent
# would report at least the parent's high-water mark. Forked from this ~10 MB launcher, the
# figure is the stage's own.
_LAUNCHER = r"""
import json, os, sys, time
out, argv = sys.argv[1], sys.argv[2:]
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        sys.stderr.write(f"cannot run {argv[0]}: {exc}\n")
    os._exit(127)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - started
with open(out, "w") as fh:
    json.dump({"seconds": seconds, "exit_code": os.waitstatus_to_exitcode(status),
               "maxrss_kb": usage.ru_maxrss, "cpu_seconds": usage.ru_utime + usage.ru_stime},
              fh)
"""


def run_measured(side: str, key: str, argv: list[str], log_path: Path) -> StageRun:
    """Run one stage in its own process; wall seconds and its peak RSS (see `_LAUNCHER`)."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    run = StageRun(side=side, key=key, argv=[str(a) for a in argv], log_path=str(log_path))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    usage_path = log_path.with_suffix(".usage.json")
    usage_path.unlink(missing_ok=True)
    log.info("[%s] %s: %s", side, key, " ".join(run.argv))
    launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(usage_path), *run.argv]
    run.load_1m_start = os.getloadavg()[0]  # the machine is shared: keep the context
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(launcher, stdout=out, stderr=subprocess.STDOUT, env=env)
        sampler = _TreeSampler(proc.pid)
        sampler.start()
        proc.wait()
        sampler.stop()
    try:
        usage = json.loads(usage_path.read_text())
    except (OSError, ValueError):
        run.returncode = proc.returncode or 1
        run.error = f"launcher exited {proc.returncode} without a usage report; see {log_path}"
        log.error("[%s] %s failed: %s", side, key, run.error)
        return run
    run.returncode = int(usage["exit_code"])
    run.seconds = float(usage["seconds"])
    run.cpu_seconds = float(usage["cpu_seconds"])
    run.peak_rss_mb = usage["maxrss_kb"] / 1024  # Linux reports KiB
    run.tree_peak_rss_mb = max(sampler.peak_bytes / 2**20, run.peak_rss_mb)
    if not run.ok:
        run.error = f"exit code {run.returncode}; last lines of {log_path}:\n{_tail(log_path)}"
        log.error("[%s] %s failed: %s", side, key, run.error)
    else:
        log.info("[%s] %s: %.1f s, peak RSS %.0f MB", side, key, run.seconds, run.peak_rss_mb)
    return run


# ---------------------------------------------------------------------------------------------
# Data


def _label_rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, LABEL_SEED_OFFSET])


def generate_dataset(work: Path, rows_train: int, rows_test: int, seed: int) -> Dataset:
    """Write the raw files with the project's generator and keep test labels beside, not in them.

    The raw files come from `generate_raw` (the format our pipeline is contracted to read); the
    true test probabilities come from `generate_frames` with the same seed, and a cheap check
    confirms both describe the same rows. A work dir that already holds a dataset made with the
    same rows and seed is reused, since writing 7.4M gzip CSV rows takes minutes.
    """
    raw_dir, labels_dir = work / "raw", work / "labels"
    meta_path = labels_dir / "meta.json"
    wanted = {"rows_train": rows_train, "rows_test": rows_test, "seed": seed}
    files_there = all((raw_dir / name).exists() for name in RAW_FILES.values())
    if files_there and meta_path.exists() and json.loads(meta_path.read_text()) == wanted:
        log.info("reusing the dataset in %s (same rows and seed)", raw_dir)
        return Dataset(
            raw_dir=raw_dir,
            y_test=np.load(labels_dir / "y_test.npy"),
            p_true_test=np.load(labels_dir / "p_true_test.npy"),
            notes=[f"dataset reused from {raw_dir}"],
        )

    from rtb.data.generate import generate_frames, generate_raw

    # A dataset of other rows or seed, or one cut short: ours to replace (the generator never
    # overwrites), and stale labels must not outlive the files they describe.
    for stale in (raw_dir, labels_dir):
        shutil.rmtree(stale, ignore_errors=True)
    started = time.perf_counter()
    log.info(
        "generating %d train + %d test rows (seed %d) into %s", rows_train, rows_test, seed, raw_dir
    )
    train_path, test_path = generate_raw(
        raw_dir, rows_train=rows_train, rows_test=rows_test, seed=seed
    )
    for path, name in ((train_path, RAW_FILES["train"]), (test_path, RAW_FILES["test"])):
        if Path(path) != raw_dir / name:
            raise RuntimeError(f"generate_raw wrote {path}, expected {raw_dir / name}")
    _, test_df, _, p_true_test = generate_frames(rows_train, rows_test, seed)  # same rows
    _check_same_rows(test_path, test_df)
    p_true_test = np.asarray(p_true_test, dtype=float)
    del test_df
    gc.collect()  # the frames are large; the stages to be measured need the memory
    y_test = _label_rng(seed).binomial(1, p_true_test).astype(np.int8)
    labels_dir.mkdir(parents=True, exist_ok=True)
    np.save(labels_dir / "y_test.npy", y_test)
    np.save(labels_dir / "p_true_test.npy", p_true_test)
    meta_path.write_text(json.dumps(wanted))
    seconds = time.perf_counter() - started
    log.info("dataset ready in %.1f s; test base rate %.5f", seconds, y_test.mean())
    return Dataset(
        raw_dir=raw_dir, y_test=y_test, p_true_test=p_true_test, generated_seconds=seconds
    )


def _check_same_rows(test_path: Path, test_df: pd.DataFrame, rows: int = 2000) -> None:
    """Fail loudly if the written test file and the in-memory frame disagree.

    The labels come from the frame and the predictions from the file; if they described
    different rows every quality figure would be noise.
    """
    import pandas as pd

    head = pd.read_csv(test_path, sep=RTB.separator, nrows=rows)
    columns = [c for c in (RTB.id, "campaignId", "startCount", "viewCount") if c in head.columns]
    expected = test_df.head(rows)
    for column in columns:
        if not np.array_equal(
            head[column].astype(str).to_numpy(), expected[column].astype(str).to_numpy()
        ):
            raise RuntimeError(
                f"{test_path}: column {column!r} differs from generate_frames() with the same "
                "seed; test labels would not match the test rows"
            )


def external_dataset(raw_dir: Path, labels_dir: Path | None) -> Dataset:
    """Use raw files made elsewhere; quality needs `y_test.npy` (+ `p_true_test.npy`) beside."""
    raw_dir = raw_dir.resolve()
    missing = [name for name in RAW_FILES.values() if not (raw_dir / name).exists()]
    if missing:
        raise SystemExit(f"--raw-dir {raw_dir}: missing {missing}")
    labels_dir = labels_dir or raw_dir.parent / "labels"
    y_path, p_path = labels_dir / "y_test.npy", labels_dir / "p_true_test.npy"
    if not y_path.exists():
        note = f"no test labels at {y_path}: quality is not scored"
        log.warning(note)
        return Dataset(raw_dir=raw_dir, y_test=None, p_true_test=None, notes=[note])
    p_true = np.load(p_path) if p_path.exists() else None
    return Dataset(
        raw_dir=raw_dir,
        y_test=np.load(y_path),
        p_true_test=p_true,
        notes=[f"raw files from {raw_dir}, labels from {labels_dir}"],
    )


# ---------------------------------------------------------------------------------------------
# The two sides


def run_reference(work: Path, raw_dir: Path) -> tuple[list[StageRun], Path]:
    """The re-enacted reference, stage by stage; stops at the first failure."""
    root = work / "reference"
    shutil.rmtree(root, ignore_errors=True)
    base = [sys.executable, str(REFERENCE_SCRIPT)]
    common = ["--raw-dir", str(raw_dir), "--root", str(root)]
    plan = [
        ("make_dataset:train", ["make_dataset", "--split", "train"]),
        ("training", ["training"]),
        ("make_dataset:test", ["make_dataset", "--split", "test"]),
        ("predicting", ["predicting"]),
    ]
    runs = _run_plan("reference", [(k, base + a + common) for k, a in plan], root / "logs")
    return runs, root / "predictions" / "predictions.npy"


def _rtb_command() -> list[str]:
    """The `rtb` console script of this interpreter's environment (what Airflow runs)."""
    script = Path(sys.executable).with_name("rtb")
    return [str(script)] if script.exists() else [sys.executable, "-m", "rtb.cli"]


def run_ours(work: Path, raw_dir: Path) -> tuple[list[StageRun], Path]:
    """Our CLI chain in a fresh project dir whose data/raw links to the same raw files."""
    project = work / "ours"
    shutil.rmtree(project, ignore_errors=True)
    (project / "data" / "raw").mkdir(parents=True)
    for name in RAW_FILES.values():
        (project / "data" / "raw" / name).symlink_to(raw_dir / name)
    rtb = _rtb_command()
    pdir = ["--project-dir", str(project)]
    plan = [
        ("make_dataset:train", [*rtb, "make-dataset", "--split", "train", *pdir]),
        ("preprocessing:train", [*rtb, "preprocess", "--split", "train", *pdir]),
        ("training", [*rtb, "train", *pdir]),
        ("make_dataset:test", [*rtb, "make-dataset", "--split", "test", *pdir]),
        ("preprocessing:test", [*rtb, "preprocess", "--split", "test", *pdir]),
        ("predicting", [*rtb, "predict", *pdir]),
    ]
    return _run_plan("ours", plan, work / "ours-logs"), project / "data" / "predictions"


def _run_plan(side: str, plan: Sequence[tuple[str, list[str]]], logs: Path) -> list[StageRun]:
    """Run stages in order; a failed stage ends the side, since later ones need its output."""
    if logs.exists():
        shutil.rmtree(logs)
    runs: list[StageRun] = []
    for key, argv in plan:
        run = run_measured(side, key, argv, logs / f"{key.replace(':', '-')}.log")
        runs.append(run)
        if not run.ok:
            break
    return runs


def promoted_model(project: Path) -> str | None:
    """The candidate our training promoted: the champion's report names it (None if no run
    promoted one)."""
    from rtb.config import ProjectPaths
    from rtb.io_utils import read_yaml
    from rtb.models.registry import current_champion

    paths = ProjectPaths(project)
    champion = current_champion(paths)
    return None if champion is None else read_yaml(paths.report(champion.version)).get("model")


def load_our_predictions(predictions_dir: Path) -> tuple[np.ndarray, Path]:
    """The newest predictions_<version>.npy: a fresh project holds exactly one."""
    found = sorted(predictions_dir.glob("predictions_*.npy"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RuntimeError(f"{predictions_dir}: no predictions_*.npy after `rtb predict`")
    return np.load(found[-1]), found[-1]


# ---------------------------------------------------------------------------------------------
# Scoring


QUALITY_KEYS = ("roc_auc", "log_loss", "normalized_entropy", "calibration_ratio")


def quality(y: np.ndarray, p: np.ndarray, ll_const: float, ll_true: float | None) -> dict:
    """The package's metrics for one predictor, plus its share of achievable log-loss gain.

    Metrics come from `rtb.models.metrics`, as in our training reports, so both sides and the
    yardsticks are scored exactly as the pipeline scores itself.
    """
    p = np.asarray(p, dtype=float).ravel()
    if p.shape != y.shape:
        raise RuntimeError(f"{p.shape[0]} predictions for {y.shape[0]} test labels")
    if not np.all(np.isfinite(p)) or p.min() < 0 or p.max() > 1:
        raise RuntimeError("predictions must be finite probabilities in [0, 1]")
    metrics = probability_metrics(y, p)
    out: dict = {key: metrics[key] for key in QUALITY_KEYS}
    share = None
    if ll_true is not None and ll_const > ll_true:
        share = (ll_const - out["log_loss"]) / (ll_const - ll_true)
    out["share_of_achievable_gain"] = share
    return out


def score_all(y: np.ndarray, p_true: np.ndarray | None, preds: dict[str, np.ndarray]) -> dict:
    """Score each side against the same labels, next to the two yardsticks.

    The constant predictor uses the test labels' own base rate, so its normalized entropy is 1
    and its share of gain 0 by construction; the true probabilities are the best any model
    can do on these labels in expectation.
    """
    y = np.asarray(y, dtype=float).ravel()
    base_rate = float(y.mean())
    ll_const = base_rate_entropy(y)
    ll_true = None
    table: dict[str, dict] = {}
    if p_true is not None:
        table["true p (achievable)"] = quality(y, p_true, ll_const, None)
        ll_true = table["true p (achievable)"]["log_loss"]
        table["true p (achievable)"]["share_of_achievable_gain"] = 1.0
    for name, p in preds.items():
        table[name] = quality(y, p, ll_const, ll_true)
    table["constant base rate"] = quality(y, np.full_like(y, base_rate), ll_const, ll_true)
    if ll_true is not None:
        table["constant base rate"]["share_of_achievable_gain"] = 0.0  # by definition
    return {"rows": int(y.size), "base_rate": base_rate, "predictors": table}


# ---------------------------------------------------------------------------------------------
# Report


def side_totals(runs: list[StageRun], sides: dict[str, list[str]] = SIDES) -> dict[str, dict]:
    """Train side and predict side: summed seconds, max of the stages' peak RSS."""
    by_key = {r.key: r for r in runs}
    out: dict[str, dict] = {}
    for side, keys in sides.items():
        stage_runs = [by_key.get(k) for k in keys]
        complete = all(r is not None and r.ok for r in stage_runs)
        done = [r for r in stage_runs if r is not None and r.ok]
        out[side] = {
            "complete": complete,
            "seconds": sum(r.seconds for r in done) if complete else None,
            "cpu_seconds": sum(r.cpu_seconds for r in done) if complete else None,
            "peak_rss_mb": max(r.peak_rss_mb for r in done) if complete else None,
        }
    return out


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    return format(value, spec) + suffix


def _ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or not den or not np.isfinite(num) or not np.isfinite(den):
        return None
    return num / den


def render_markdown(results: dict) -> str:
    """The human-readable table (also printed): timings, memory, quality, ratios."""
    ref = {r["key"]: r for r in results["stages"]["reference"]}
    ours = {r["key"]: r for r in results["stages"]["ours"]}

    def cell(runs: dict, key: str, what: str, spec: str) -> str:
        run = runs.get(key)
        if run is None and runs is ref and key not in REFERENCE_STAGE_KEYS:
            return "(in make_dataset)"
        if run is None:
            return "not run"
        if run["returncode"] != 0:
            return "FAILED"
        return _fmt(run[what], spec)

    cfg = results["config"]
    if cfg["rows_train"] is None:
        title = f"# rtb benchmark on {cfg['raw_dir']}"
    else:
        title = f"# rtb benchmark: {cfg['rows_train']:,} train rows, {cfg['rows_test']:,} test rows"
    lines = [
        title,
        "",
        f"{cfg['started']} on {cfg['machine']['hostname']} ({cfg['machine']['cpus']} CPUs, "
        f"{cfg['machine']['ram_gb']:.0f} GB RAM, load avg at start "
        f"{cfg['machine']['loadavg_start']}, at end {cfg['machine'].get('loadavg_end')}); "
        f"our side ran code {cfg.get('code_ours')}"
        + (
            f" (the checkout moved to {cfg['code_ours_end']} while it ran)"
            if cfg.get("code_ours_end") != cfg.get("code_ours")
            else ""
        ),
        "",
        f"Model our training promoted (and our predicting used): `{results.get('promoted_model')}`.",
        "",
        "| stage | ref s | ours s | speedup | ref CPU s | ours CPU s | ref peak MB | ours peak MB"
        " | ours/ref RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    flagged: list[str] = []
    for key, label in STAGES:
        r, o = ref.get(key), ours.get(key)
        ok_r = r is not None and r["returncode"] == 0
        ok_o = o is not None and o["returncode"] == 0
        speed = _ratio(r["seconds"], o["seconds"]) if ok_r and ok_o else None
        rss = _ratio(o["peak_rss_mb"], r["peak_rss_mb"]) if ok_r and ok_o else None
        lines.append(
            f"| {label} | {cell(ref, key, 'seconds', '.1f')} | {cell(ours, key, 'seconds', '.1f')}"
            f" | {_fmt(speed, '.1f', 'x')} | {cell(ref, key, 'cpu_seconds', '.1f')}"
            f" | {cell(ours, key, 'cpu_seconds', '.1f')}"
            f" | {cell(ref, key, 'peak_rss_mb', ',.0f')}"
            f" | {cell(ours, key, 'peak_rss_mb', ',.0f')} | {_fmt(rss, '.2f')} |"
        )
        for side, run in (("ref", r), ("ours", o)):
            if (
                run
                and run["returncode"] == 0
                and (run["tree_peak_rss_mb"] > TREE_FLAG_RATIO * run["peak_rss_mb"])
            ):
                flagged.append(f"{side} {label}: {run['tree_peak_rss_mb']:,.0f} MB")
    for side in SIDES:
        rt, ot = results["totals"]["reference"][side], results["totals"]["ours"][side]
        speed = _ratio(rt["seconds"], ot["seconds"])
        rss = _ratio(ot["peak_rss_mb"], rt["peak_rss_mb"])
        lines.append(
            f"| **{side} side** | {_fmt(rt['seconds'], '.1f')} | {_fmt(ot['seconds'], '.1f')}"
            f" | {_fmt(speed, '.1f', 'x')} | {_fmt(rt['cpu_seconds'], '.1f')}"
            f" | {_fmt(ot['cpu_seconds'], '.1f')} | {_fmt(rt['peak_rss_mb'], ',.0f')}"
            f" | {_fmt(ot['peak_rss_mb'], ',.0f')} | {_fmt(rss, '.2f')} |"
        )
    lines += [
        "",
        "Seconds are wall time of the whole process (interpreter start and imports included); "
        "CPU s is its user+system time (less sensitive to a busy machine, but it counts every "
        "core a stage uses); peak MB is the process's ru_maxrss from wait4; side seconds are "
        "sums, side peak = max over its stages.",
    ]
    if flagged:
        lines.append(
            "Summed RSS of the process tree (sampled) exceeded ru_maxrss in: "
            + "; ".join(flagged)
            + "."
        )
    if results.get("reference_reused_from"):
        lines.append(f"Reference figures reused from {results['reference_reused_from']}.")

    q = results.get("quality")
    if q:
        lines += [
            "",
            f"Quality on {q['rows']:,} test labels (base rate {q['base_rate']:.5f}):",
            "",
            "| predictor | ROC AUC | log loss | NE | calibration | share of achievable gain |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, m in q["predictors"].items():
            lines.append(
                f"| {name} | {_fmt(m['roc_auc'], '.4f')} | {_fmt(m['log_loss'], '.5f')}"
                f" | {_fmt(m['normalized_entropy'], '.4f')} | {_fmt(m['calibration_ratio'], '.3f')}"
                f" | {_fmt(m['share_of_achievable_gain'], '.1%')} |"
            )
        preds = q["predictors"]
        if "reference" in preds and "ours" in preds:
            r, o = preds["reference"], preds["ours"]
            ratios = [
                _fmt(_ratio(o[m], r[m]), ".3f")
                for m in ("roc_auc", "log_loss", "normalized_entropy")
            ]
            gain = _ratio(o["share_of_achievable_gain"], r["share_of_achievable_gain"])
            lines.append(f"| ours/reference | {' | '.join(ratios)} | - | {_fmt(gain, '.2f')} |")
        lines += [
            "",
            "NE = log loss / entropy of the test base rate (lower is better, 1 = constant). "
            "Calibration = mean predicted / observed rate. Share of achievable gain = "
            "(ll_const - ll) / (ll_const - ll_true).",
        ]
    for note in results.get("notes", []):
        lines.append(f"Note: {note}")
    errors = [
        f"- {r['side']} {r['key']}: {r['error']}"
        for side in ("reference", "ours")
        for r in results["stages"][side]
        if r.get("error")
    ]
    if errors:
        lines += ["", "Failures:", "", "```", *errors, "```"]
    return "\n".join(lines) + "\n"


def _machine() -> dict:
    return {
        "hostname": platform.node(),
        "cpus": os.cpu_count(),
        "ram_gb": psutil.virtual_memory().total / 2**30,
        "python": platform.python_version(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def _versions() -> dict[str, str]:
    """The libraries our training reports list, plus the version of the package under test."""
    from importlib.metadata import PackageNotFoundError, version

    out = library_versions()
    try:
        out["rtb-pipeline"] = version("rtb-pipeline")
    except PackageNotFoundError:
        out["rtb-pipeline"] = "not installed"
    return out


def _code_state() -> str | None:
    """HEAD (as our training reports record it) plus whether src/ has uncommitted edits,
    read when our side starts.

    The package is installed editable and others commit while a run takes twenty minutes, so
    the code our stages ran is the checkout at that moment, not at the benchmark's start.
    """
    sha = git_sha()
    if sha is None:
        return None
    try:
        status = subprocess.run(
            # ":/src": the repository's src/, whatever folder git runs in
            ["git", "-C", str(BENCH_DIR), "status", "--porcelain", "--", ":/src"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return sha[:7]
    return sha[:7] + (" + uncommitted changes in src/" if status.stdout.strip() else "")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows-train", type=int, default=3_700_000)
    parser.add_argument("--rows-test", type=int, default=3_700_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="Where data, artifacts, logs and results go (default: a new temp dir). A dataset "
        "already there with the same rows and seed is reused.",
    )
    parser.add_argument(
        "--raw-dir",
        type=Path,
        default=None,
        help="Take training_data.csv.gz/test_data.csv.gz from here instead of generating.",
    )
    parser.add_argument(
        "--labels-dir",
        type=Path,
        default=None,
        help="With --raw-dir: folder with y_test.npy (+ p_true_test.npy); "
        "default RAW_DIR/../labels.",
    )
    parser.add_argument(
        "--skip-reference",
        action="store_true",
        help="Reuse the reference figures and predictions of an earlier run in --work-dir.",
    )
    args = parser.parse_args(argv)
    if args.skip_reference and args.work_dir is None:
        parser.error("--skip-reference needs --work-dir of an earlier run")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run everything; exit 1 if any stage failed (after writing what was measured)."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    work = (args.work_dir or Path(tempfile.mkdtemp(prefix="rtb-bench-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log.info("work dir %s", work)
    results_path = work / "results.json"
    previous = None
    if args.skip_reference:
        if not results_path.exists():
            raise SystemExit(f"--skip-reference: {results_path} does not exist")
        previous = json.loads(results_path.read_text())

    results: dict = {
        "config": {
            "rows_train": args.rows_train,
            "rows_test": args.rows_test,
            "seed": args.seed,
            "work_dir": str(work),
            "started": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "code_at_start": _code_state(),
            "versions": _versions(),
            "machine": _machine(),
        },
        "notes": [],
    }
    if args.raw_dir is not None:
        dataset = external_dataset(args.raw_dir, args.labels_dir)
        # The row counts are the files', not the options'; counting gzip rows costs a minute.
        results["config"]["rows_train"] = None
        results["config"]["rows_test"] = None if dataset.y_test is None else len(dataset.y_test)
    else:
        dataset = generate_dataset(work, args.rows_train, args.rows_test, args.seed)
    results["config"]["raw_dir"] = str(dataset.raw_dir)
    results["generation_seconds"] = dataset.generated_seconds
    results["notes"] += dataset.notes

    preds: dict[str, np.ndarray] = {}
    if previous is not None:
        if previous["config"].get("raw_dir") != str(dataset.raw_dir):
            raise SystemExit("--skip-reference: the earlier run used other raw files")
        ref_runs = [StageRun(**r) for r in previous["stages"]["reference"]]
        ref_pred_path = work / "reference" / "predictions" / "predictions.npy"
        results["reference_reused_from"] = (
            previous.get("reference_reused_from") or previous["config"]["started"]
        )
    else:
        ref_runs, ref_pred_path = run_reference(work, dataset.raw_dir)
    if all(r.ok for r in ref_runs) and len(ref_runs) == len(REFERENCE_STAGE_KEYS):
        preds["reference"] = np.load(ref_pred_path)

    results["config"]["code_ours"] = _code_state()
    our_runs, our_pred_dir = run_ours(work, dataset.raw_dir)
    results["config"]["code_ours_end"] = _code_state()
    if all(r.ok for r in our_runs) and len(our_runs) == len(STAGES):
        try:
            preds["ours"], path = load_our_predictions(our_pred_dir)
            results["our_predictions"] = str(path)
        except RuntimeError as exc:
            results["notes"].append(str(exc))
            our_runs[-1].returncode, our_runs[-1].error = 1, str(exc)

    results["promoted_model"] = promoted_model(work / "ours")
    results["config"]["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["stages"] = {
        "reference": [asdict(r) for r in ref_runs],
        "ours": [asdict(r) for r in our_runs],
    }
    results["totals"] = {"reference": side_totals(ref_runs, REFERENCE_SIDES),
                         "ours": side_totals(our_runs)}
    detail = work / "reference" / "models" / "training_detail.json"
    if detail.exists():
        results["reference_training_detail"] = json.loads(detail.read_text())
    if dataset.y_test is not None and preds:
        try:
            results["quality"] = score_all(dataset.y_test, dataset.p_true_test, preds)
        except RuntimeError as exc:
            results["notes"].append(f"quality not scored: {exc}")

    results_path.write_text(json.dumps(results, indent=2, default=_json_default))
    markdown = render_markdown(results)
    (work / "results.md").write_text(markdown)
    print(markdown)
    print(f"(results.json and results.md in {work})")
    failed = [r for r in ref_runs + our_runs if not r.ok]
    return 1 if failed or "ours" not in preds else 0


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


if __name__ == "__main__":
    sys.exit(main())
