"""Model quality across differently shaped worlds: no single generator decides.

Why: a candidate tuned to one synthetic world can win there by matching its functional form.
This benchmark scores every candidate on the day(s) after its training window in each world
of `bench/worlds.py` (true probabilities known) and on the real TalkingData sample (no true
probabilities), through the pipeline's own path: raw files -> `run_make_dataset` ->
`run_preprocess` -> `read_processed` -> `select_model` (every candidate, time holdout, Platt)
-> `refit_on_all_rows` -> `predict_proba` on the next days. A method is worth keeping only if
it wins or ties across the whole table.

Figures per candidate, on the first day after training unless said otherwise:

- share of achievable gain = (LL(base rate) - LL(model)) / (LL(base rate) - LL(true p)), with
  LL on the day's labels and the day's own label rate as the base rate (as bench/benchmark.py
  scores); "expected" replaces the labels by their true probabilities (the expected log loss),
  which takes the label noise out of the figure at low base rates;
- calibration vs labels (mean predicted / label rate) and vs true p (mean predicted / mean
  true p), and the latter for every generated day after training;
- training seconds: the candidate's fit and calibration on the early rows plus its refit.

Usage: `python bench/multi_world.py --sizes 200000,1000000 --out bench/results/multi_world.json`
(writes the JSON and a markdown file beside it; prints the markdown).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.special import expit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from level_tracking import tracked_base_rate_log_odds  # noqa: E402
from worlds import WORLDS, WorldData, draw_world, write_raw  # noqa: E402

from rtb.config import ProjectPaths  # noqa: E402
from rtb.data.make_dataset import run_make_dataset  # noqa: E402
from rtb.data.preprocessing import read_processed, run_preprocess  # noqa: E402
from rtb.dataset_config import DatasetConfig, load_dataset_config  # noqa: E402
from rtb.features import feature_frame  # noqa: E402
from rtb.models.calibration import mean_matching_shift  # noqa: E402
from rtb.models.limits import DEFAULT_LIMITS  # noqa: E402
from rtb.models.metrics import EPS, normalized_entropy, rate_entropy  # noqa: E402
from rtb.models.pipeline import CANDIDATES  # noqa: E402
from rtb.models.training import (  # noqa: E402
    CandidateResult,
    Selection,
    refit_on_all_rows,
    select_model,
)

log = logging.getLogger("bench.multi_world")

REPO = Path(__file__).resolve().parents[1]
TALKINGDATA = REPO / "tests" / "data" / "talkingdata" / "train_sample.csv.gz"
# (name, first test day): train on every earlier day of the sample, score that day.
TALKINGDATA_FOLDS = (("talkingdata Nov 6-8 -> 9", "2017-11-09"),
                     ("talkingdata Nov 6-7 -> 8", "2017-11-08"))
TRUE_P, BASE_RATE = "true p", "constant base rate"
# Each candidate's variants, as the tables name them: shipped without the refit, and the
# level variants applied to the refit (see `level_variants`).
VARIANTS = {
    "early_fit": "early fit (no refit)",
    "unanchored": "refit, not anchored",
    "level_tracked": "level-tracked (opt-in)",
    "anchored_to_holdout": "anchored to the holdout rate",
    "anchored_in_sample": "anchored in-sample",
}


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, EPS, 1 - EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def day_quality(y: np.ndarray, p: np.ndarray, p_true: np.ndarray | None) -> dict[str, float]:
    """One predictor's figures on one day's rows (see the module docstring)."""
    rate = float(np.mean(y))
    ll_base, ll = rate_entropy(rate), log_loss(y, p)
    out = {"log_loss": ll, "normalized_entropy": normalized_entropy(y, p),
           "calibration_vs_labels": float(np.mean(p) / rate) if rate > 0 else float("nan")}
    if p_true is None:
        return out
    ll_true = log_loss(y, p_true)
    expected = lambda q: log_loss(p_true, q)  # noqa: E731 - expected LL under the true p
    e_base, e_true = expected(np.full_like(p, np.mean(p_true))), expected(p_true)
    out |= {
        "share_of_gain": (ll_base - ll) / (ll_base - ll_true),
        "share_of_gain_expected": (e_base - expected(p)) / (e_base - e_true),
        "calibration_vs_true_p": float(np.mean(p) / np.mean(p_true)),
    }
    return out


def predictor_row(y: np.ndarray, p: np.ndarray, p_true: np.ndarray | None,
                  day: np.ndarray) -> dict[str, object]:
    """Figures on the first day after training, plus calibration on every later day."""
    first = day == 1
    row: dict[str, object] = day_quality(y[first], p[first], None if p_true is None else p_true[first])
    reference = y if p_true is None else p_true
    row["calibration_per_day"] = [float(np.mean(p[day == d]) / np.mean(reference[day == d]))
                                  for d in np.unique(day)]
    return row


def evaluate(train: pd.DataFrame, test: pd.DataFrame, y: np.ndarray, p_true: np.ndarray | None,
             day: np.ndarray, cfg: DatasetConfig, *, seed: int,
             candidates: Sequence[str]) -> dict[str, object]:
    """Every candidate through select_model and its refit on all rows, scored on the test days."""
    selection = select_model(train, cfg, seed=seed, candidates=tuple(candidates))
    X_test = feature_frame(test, cfg)
    rows: dict[str, dict[str, object]] = {}
    if p_true is not None:
        rows[TRUE_P] = predictor_row(y, p_true, p_true, day)
    for result in selection.candidates:
        started = time.perf_counter()
        model, refit = refit_on_all_rows(dataclasses.replace(selection, selected=result),
                                         seed=seed)
        p = np.asarray(model.predict_proba(X_test)[:, 1], dtype=np.float64)
        rows[result.name] = predictor_row(y, p, p_true, day) | {
            "train_seconds": result.seconds + time.perf_counter() - started,
            "holdout_normalized_entropy": result.holdout["normalized_entropy"],
        }
        # The same candidate as fitted on the early rows, with the Platt step of its own
        # holdout: what shipping without the refit would give (no extra fit).
        early = np.asarray(result.pipeline.predict_proba(X_test)[:, 1], dtype=np.float64)
        rows[result.name]["early_fit"] = predictor_row(y, early, p_true, day)
        for variant, shift in level_variants(selection, result, model, refit, cfg, seed=seed).items():
            rows[result.name][variant] = predictor_row(y, _shifted(p, shift), p_true, day)
    constant = np.empty(len(y))
    for d in np.unique(day):  # each day's own label rate: NE 1 and share of gain 0 by definition
        constant[day == d] = y[day == d].mean()
    rows[BASE_RATE] = predictor_row(y, constant, p_true, day)
    return {"selected": selection.selected.name, "train_rows": len(train), "test_rows": len(test),
            "predictors": rows}


def level_variants(selection: Selection, result: CandidateResult, model: object,
                   refit: dict[str, object], cfg: DatasetConfig, *, seed: int) -> dict[str, float]:
    """The log-odds shift each level variant applies to the shipped refit's probabilities.

    - unanchored: without `level_anchor`'s shift (only the negative-share shift of the
      early fit's Platt intercept: the pipeline before the anchor);
    - level_tracked: from the holdout's label rate to the base rate that a shrunk daily trend of
      the whole window expects on the first day after it (`tracked_base_rate_log_odds`);
    - anchored_to_holdout: the refit's mean probability on the holdout rows (scored as new
      rows are, i.e. in-sample for the refit) to the holdout's label rate;
    - anchored_in_sample: the anchor to the early fit's level on early rows, but each row
      scored with its own label in its encodings (plain `predict_proba`).
    """
    rows, y, holdout = selection.rows, selection.y, selection.holdout
    shifts = {"unanchored": -float(refit["level_anchor"]["shift"])}
    # Natural counts: early negatives were kept at a share r, the holdout entirely.
    weight = np.where((y == 1) | holdout, 1.0, 1.0 / rows.negative_share)
    day = selection.frame[cfg.timestamp].dt.floor("D")
    full = pd.date_range(day.min(), day.max(), freq="D")  # a day without rows still counts
    index = full.get_indexer(day)
    day_rows = np.bincount(index, weights=weight, minlength=len(full))
    day_positives = np.bincount(index, weights=(y == 1).astype(float), minlength=len(full))
    level = tracked_base_rate_log_odds(day_positives, day_rows, float(len(full)))
    shifts["level_tracked"] = level - _log_odds(float(y[holdout].mean()))

    def refit_log_odds(at: np.ndarray) -> np.ndarray:
        return _log_odds(model.predict_proba(selection.X.iloc[at])[:, 1])

    held = np.flatnonzero(holdout)
    shifts["anchored_to_holdout"] = mean_matching_shift(refit_log_odds(held), float(y[held].mean()))
    early_rows = np.flatnonzero(~holdout)
    if len(early_rows) > DEFAULT_LIMITS.anchor_max_rows:
        early_rows = np.sort(np.random.default_rng(seed).choice(
            early_rows, DEFAULT_LIMITS.anchor_max_rows, replace=False))
    early_p = result.pipeline.predict_proba(selection.X.iloc[early_rows])[:, 1]
    shifts["anchored_in_sample"] = mean_matching_shift(
        refit_log_odds(early_rows), float(np.average(early_p, weights=weight[early_rows])),
        weight[early_rows])
    return shifts


def _log_odds(p: np.ndarray | float) -> np.ndarray | float:
    p = np.clip(p, EPS, 1 - EPS)
    return np.log(p / (1 - p))


def _shifted(p: np.ndarray, shift: float) -> np.ndarray:
    return expit(_log_odds(p) + shift)


def through_pipeline(root: Path, cfg: DatasetConfig,
                     write: Callable[[Path], None]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Raw files written by `write` into root/data/raw -> the processed train and test frames,
    by the stages' own functions (validation included)."""
    paths = ProjectPaths(root)
    write(paths.raw_dir)
    frames = []
    for split in ("train", "test"):
        run_make_dataset(paths, split, cfg)
        run_preprocess(paths, split, cfg)
        frames.append(read_processed(paths.processed_arrow(split), cfg,
                                     require_target=split == "train", with_id=False))
    return frames[0], frames[1]


def run_world(name: str, train_rows: int, test_rows_per_day: int, work: Path, *, seed: int,
              candidates: Sequence[str]) -> dict[str, object]:
    cfg = load_dataset_config("rtb")
    started = time.perf_counter()
    data: WorldData = draw_world(WORLDS[name], train_rows, test_rows_per_day, seed)
    drawn = time.perf_counter() - started
    train, test = through_pipeline(work / f"{name}-{train_rows}", cfg,
                                   lambda raw: write_raw(data, raw))
    result = evaluate(train, test, data.y_test, data.p_test, data.test_day, cfg, seed=seed,
                      candidates=candidates)
    log.info("%s at %d rows: drawn in %.1f s, evaluated in %.1f s", name, train_rows, drawn,
             time.perf_counter() - started)
    return {"world": name, "size": train_rows, "draw_seconds": drawn} | result


def run_talkingdata(fold: str, test_day: str, work: Path, *, seed: int,
                    candidates: Sequence[str]) -> dict[str, object]:
    """The real sample split by click day: every day before `test_day` trains, it is scored."""
    cfg = load_dataset_config("talkingdata")
    frame = pd.read_csv(TALKINGDATA)
    day_text = frame["click_time"].str[:10]
    train, test = frame[day_text < test_day], frame[day_text == test_day]

    def write(raw: Path) -> None:
        raw.mkdir(parents=True, exist_ok=True)
        train.to_csv(raw / cfg.files["train"], index=False)
        test.drop(columns=[cfg.target, "attributed_time"]).to_csv(raw / cfg.files["test"],
                                                                  index=False)

    processed_train, processed_test = through_pipeline(work / f"talkingdata-{test_day}", cfg,
                                                       write)
    y = test[cfg.target].to_numpy().astype(np.float64)
    result = evaluate(processed_train, processed_test, y, None, np.ones(len(y), dtype=int), cfg,
                      seed=seed, candidates=candidates)
    return {"world": fold, "size": len(train)} | result


def _fmt(value: object, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and np.isnan(value)) else format(value, spec)


def render_markdown(results: dict[str, object]) -> str:
    """One table per world and size, then the share of gain per candidate across worlds."""
    lines = [f"Command: `{results['command']}`", f"Load before the run: `{results['uptime']}`", ""]
    for run in results["runs"]:
        synthetic = TRUE_P in run["predictors"]
        lines += [f"### {run['world']}, {run['train_rows']:,} training rows "
                  f"(pipeline selected `{run['selected']}`)", ""]
        if synthetic:
            lines += ["| predictor | share of gain | share (expected) | NE | calib vs labels "
                      "| calib vs true p | calib vs true p per day | train s |",
                      "|---|---|---|---|---|---|---|---|"]
        else:
            lines += ["| predictor | NE | calib vs labels | train s |", "|---|---|---|---|"]
        for name, m in _with_early_fits(run["predictors"]):
            label = f"**{name}** (selected)" if name == run["selected"] else name
            seconds = _fmt(m.get("train_seconds"), ".0f")
            if synthetic:
                per_day = " / ".join(f"{c:.3f}" for c in m["calibration_per_day"])
                lines.append(
                    f"| {label} | {m['share_of_gain']:.1%} | {m['share_of_gain_expected']:.1%} "
                    f"| {m['normalized_entropy']:.3f} | {m['calibration_vs_labels']:.3f} "
                    f"| {m['calibration_vs_true_p']:.3f} | {per_day} | {seconds} |")
            else:
                lines.append(f"| {label} | {m['normalized_entropy']:.3f} "
                             f"| {m['calibration_vs_labels']:.3f} | {seconds} |")
        lines.append("")
    lines += summary_table(results["runs"])
    lines += selected_table(results["runs"])
    return "\n".join(lines) + "\n"


def _brief(figures: dict | None) -> str:
    if figures is None:
        return "-"
    if "share_of_gain_expected" in figures:
        return f"{figures['share_of_gain_expected']:.1%}, {figures['calibration_vs_true_p']:.3f}"
    return f"NE {figures['normalized_entropy']:.3f}, {figures['calibration_vs_labels']:.3f}"


def selected_table(runs: list[dict]) -> list[str]:
    """The model the pipeline selected in each run, as shipped (refit on all rows), next to the
    same candidate's variants (`VARIANTS`: without the refit, without the level anchor, and
    the level variants that were not kept)."""
    lines = ["### The selected model per world (next day)", "",
             "| world | rows | selected | share of gain | share (expected) | NE "
             "| calib vs labels | calib vs true p, day 1 / 2 | "
             + " | ".join(f"{label}: share (exp.), calib" for label in VARIANTS.values()) + " |",
             "|---|---|---|---|---|---|---|---|" + "---|" * len(VARIANTS)]
    for run in runs:
        m = run["predictors"][run["selected"]]
        synthetic = "share_of_gain" in m

        per_day = " / ".join(f"{c:.3f}" for c in m["calibration_per_day"]) if synthetic else "-"
        lines.append(
            f"| {run['world']} | {run['train_rows']:,} | {run['selected']} "
            f"| {_fmt(m.get('share_of_gain'), '.1%')} | {_fmt(m.get('share_of_gain_expected'), '.1%')} "
            f"| {m['normalized_entropy']:.3f} | {m['calibration_vs_labels']:.3f} | {per_day} "
            f"| " + " | ".join(_brief(m.get(key)) for key in VARIANTS) + " |")
    return lines + [""]


def _with_early_fits(predictors: dict[str, dict]) -> list[tuple[str, dict]]:
    """Each candidate followed by its early fit (no refit), for the per-world tables."""
    out = []
    for name, m in predictors.items():
        out.append((name, m))
        out += [(f"{name}, {label}", m[key]) for key, label in VARIANTS.items() if key in m]
    return out


def summary_table(runs: list[dict]) -> list[str]:
    """Each candidate's headline figure in every run: share of gain (expected) on synthetic
    worlds, NE on TalkingData; the selected one starred."""
    names = [n for n in runs[0]["predictors"] if n not in (TRUE_P, BASE_RATE)]
    lines = ["### Across worlds (next day; share of gain (expected) / calibration vs true p; "
             "TalkingData: NE / calibration vs labels; * = selected)", "",
             "| world | rows | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for run in runs:
        cells = []
        for name in names:
            m = run["predictors"][name]
            star = "*" if name == run["selected"] else ""
            if "share_of_gain_expected" in m:
                cells.append(f"{m['share_of_gain_expected']:.1%} / {m['calibration_vs_true_p']:.3f}{star}")
            else:
                cells.append(f"NE {m['normalized_entropy']:.3f} / {m['calibration_vs_labels']:.3f}{star}")
        lines.append(f"| {run['world']} | {run['train_rows']:,} | " + " | ".join(cells) + " |")
    return lines + [""]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="200000,1000000",
                        help="training rows per world, comma-separated")
    parser.add_argument("--worlds", default=",".join(WORLDS), help="comma-separated world names")
    parser.add_argument("--test-rows-per-day", type=int, default=100_000)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    parser.add_argument("--no-talkingdata", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="JSON path; the markdown goes beside it (.md)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="only render the markdown of an earlier run's JSON")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, work: Path, command: str) -> dict[str, object]:
    candidates = [c for c in args.candidates.split(",") if c]
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    runs = []
    partial = None if args.out is None else args.out.with_suffix(".partial.json")
    jobs: list[Callable[[], dict[str, object]]] = []
    if not args.no_talkingdata:
        jobs += [functools.partial(run_talkingdata, fold, day, work, seed=args.seed,
                                   candidates=candidates) for fold, day in TALKINGDATA_FOLDS]
    for size in (int(s) for s in args.sizes.split(",")):
        jobs += [functools.partial(run_world, name, size, args.test_rows_per_day, work,
                                   seed=args.seed, candidates=candidates)
                 for name in args.worlds.split(",") if name]
    for job in jobs:
        runs.append(job())
        if partial is not None:  # a long run can be read while it goes on
            partial.parent.mkdir(parents=True, exist_ok=True)
            partial.write_text(json.dumps(runs, indent=1))
    return {"command": command, "uptime": uptime, "seed": args.seed, "cpus": os.cpu_count(),
            "runs": runs}


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    command = "python bench/multi_world.py " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.render:
        sys.stdout.write(render_markdown(json.loads(args.render.read_text())))
        return 0
    if args.work:
        results = run(args, args.work, command)
    else:
        with tempfile.TemporaryDirectory(prefix="multi_world-") as tmp:
            results = run(args, Path(tmp), command)
    markdown = render_markdown(results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))
        args.out.with_suffix(".md").write_text(markdown)
    sys.stdout.write(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
