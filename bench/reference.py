"""Re-enactment of the reference solution this project replaces, one stage per process.

Why it exists: speed-up and quality claims against "the old pipeline" are only worth something
if the old pipeline runs on the same files, on the same machine, in the same session as ours.
So this file redoes what the reference did (its code is public), including its costly habits:

- make_dataset, one process per split: `pd.read_csv(..., parse_dates=[...])`, then
  `fromLastStart` as `(timestamp - lastStart).apply(lambda x: x.total_seconds() / 3600)` (a
  per-element apply over one timedelta Series, on a copy of the frame), categorical gaps
  filled with "Unknown" and numeric ones with -1, and the processed CSV written. The
  reference has no separate preprocessing stage: this one does all of it;
- training: scaler + one-hot + `LogisticRegression(random_state=...)` in a Pipeline, one fit
  on all rows, then three separate 3-fold `cross_val_score` calls (ROC AUC, Brier score, log
  loss: nine extra fits);
- predicting: read the processed test CSV, `predict_proba`, save a `.npy`.

Do not "fix" any of this: the point is to measure what we replace. Each stage is one
invocation (`python bench/reference.py STAGE ...`) so that the benchmark can read the stage's
own peak RSS from `os.wait4`.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

log = logging.getLogger("bench.reference")

STAGES = ("make_dataset", "training", "predicting")
RAW_FILES = {"train": "training_data.csv.gz", "test": "test_data.csv.gz"}
CATEGORICAL = [
    "campaignId",
    "platform",
    "softwareVersion",
    "sourceGameId",
    "country",
    "connectionType",
    "deviceType",
]
NUMERICAL = [
    "startCount",
    "viewCount",
    "clickCount",
    "installCount",
    "startCount1d",
    "startCount7d",
    "fromLastStart",
]
TARGET = "install"
RANDOM_SEED = 42
CV_SCORINGS = ("roc_auc", "neg_brier_score", "neg_log_loss")


@dataclass(frozen=True)
class ReferencePaths:
    """Where the re-enacted reference reads and writes: raw files in, everything else under root."""

    raw_dir: Path
    root: Path

    def raw(self, split: str) -> Path:
        return self.raw_dir / RAW_FILES[split]

    def processed(self, split: str) -> Path:
        return self.root / "processed" / f"{split}_df.csv"

    @property
    def model(self) -> Path:
        return self.root / "models" / "model.pkl"

    @property
    def training_detail(self) -> Path:
        """CV scores and sub-timings of the training stage, for the benchmark's JSON."""
        return self.root / "models" / "training_detail.json"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions" / "predictions.npy"


def _prepare(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def make_dataset(paths: ReferencePaths, split: str) -> None:
    """Raw gzip CSV -> processed CSV in one process, as the reference's make_dataset did."""
    df = pd.read_csv(paths.raw(split), sep=";", header=0, compression="gzip",
                     parse_dates=["timestamp", "lastStart"])
    log.info("make_dataset %s: read %d rows x %d columns", split, len(df), df.shape[1])
    data = df.copy()
    data["fromLastStart"] = (data["timestamp"] - data["lastStart"]).apply(
        lambda x: x.total_seconds() / 3600
    )
    data[CATEGORICAL] = data[CATEGORICAL].fillna(value="Unknown")
    data[NUMERICAL] = data[NUMERICAL].fillna(value=-1)
    columns = CATEGORICAL + NUMERICAL + ([TARGET] if split == "train" else [])
    data[columns].to_csv(_prepare(paths.processed(split)), index=False)
    log.info("make_dataset %s: wrote %d rows", split, len(data))


def build_pipeline() -> object:
    """Scaled numerics, one-hot categoricals, default logistic regression: the reference model."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    preprocessor = ColumnTransformer(
        [
            ("scaler", StandardScaler(), NUMERICAL),
            ("ohe", OneHotEncoder(handle_unknown="ignore"), CATEGORICAL),
        ]
    )
    return Pipeline([("preprocessor", preprocessor),
                     ("classifier", LogisticRegression(random_state=RANDOM_SEED))])


def training(paths: ReferencePaths) -> None:
    """One fit on all rows, then three separate CV runs (one per metric): the reference's cost."""
    from sklearn.model_selection import cross_val_score

    df = pd.read_csv(paths.processed("train"))
    X, y = df[CATEGORICAL + NUMERICAL], df[TARGET]
    pipe = build_pipeline()
    started = time.perf_counter()
    pipe.fit(X, y)
    fit_seconds = time.perf_counter() - started
    cv: dict[str, dict[str, object]] = {}
    for scoring in CV_SCORINGS:
        started = time.perf_counter()
        scores = cross_val_score(pipe, X, y, cv=3, scoring=scoring)
        seconds = time.perf_counter() - started
        cv[scoring] = {"scores": scores.tolist(), "mean": float(scores.mean()), "seconds": seconds}
        log.info("training: cv %s = %.5f (%.1f s)", scoring, scores.mean(), seconds)
    detail = {"rows": len(df), "cv": cv, "final_fit_seconds": fit_seconds}
    with open(_prepare(paths.model), "wb") as fh:
        pickle.dump(pipe, fh)
    paths.training_detail.write_text(json.dumps(detail, indent=2))


def predicting(paths: ReferencePaths) -> None:
    """Score the processed test CSV with the pickled pipeline; one probability per input row."""
    with open(paths.model, "rb") as fh:
        pipe = pickle.load(fh)
    df = pd.read_csv(paths.processed("test"))
    proba = pipe.predict_proba(df[CATEGORICAL + NUMERICAL])[:, 1]
    log.info("predicting: %d rows, mean p %.5f", len(proba), float(proba.mean()))
    np.save(_prepare(paths.predictions), proba)


def main(argv: list[str] | None = None) -> int:
    """Run one stage; the benchmark calls this once per stage in a fresh process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=STAGES)
    parser.add_argument("--raw-dir", type=Path, required=True)
    parser.add_argument("--root", type=Path, required=True, help="Folder for all outputs.")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    paths = ReferencePaths(raw_dir=args.raw_dir, root=args.root)
    if args.stage == "make_dataset":
        make_dataset(paths, args.split)
    elif args.stage == "training":
        training(paths)
    else:
        predicting(paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
