"""Re-enactment of the reference solution this project replaces, one stage per process.

Why it exists: speed-up and quality claims against "the old pipeline" are only worth something
if the old pipeline runs on the same files, on the same machine, in the same session as ours.
So this file redoes what the reference did, including its costly habits, on purpose:

- make_dataset: `pd.read_csv(..., parse_dates=[...])` and a pickle of the whole frame;
- preprocessing: `fromLastStart` computed by a per-row `DataFrame.apply(axis=1)`, the raw
  id and datetime columns dropped, fillna, then a processed CSV;
- training: one-hot + scaler + default `LogisticRegression` in a Pipeline, scored by three
  separate `cross_val_score` calls (one per metric: nine extra fits), then a fit on all rows;
- predicting: read the processed test CSV, `predict_proba`, save a `.npy`.

Do not "fix" any of this: the point is to measure what we replace. Each stage is one
invocation (`python bench/reference.py STAGE ...`) so that the benchmark can read the stage's
own peak RSS from `os.wait4`.

The reference's exact fillna values are not on record; numeric gaps (only `fromLastStart`,
where `lastStart` is missing) become 0 and categorical gaps become "unknown", the simplest
choice that lets its one-hot encoder run.
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

STAGES = ("make_dataset", "preprocessing", "training", "predicting")
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
CV_SCORINGS = ("roc_auc", "neg_log_loss", "accuracy")


@dataclass(frozen=True)
class ReferencePaths:
    """Where the re-enacted reference reads and writes: raw files in, everything else under root."""

    raw_dir: Path
    root: Path

    def raw(self, split: str) -> Path:
        return self.raw_dir / RAW_FILES[split]

    def interim(self, split: str) -> Path:
        return self.root / "interim" / f"{split}.pkl"

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
    """Parse the raw gzip CSV with pandas' date parsing and pickle it, as the reference did."""
    df = pd.read_csv(paths.raw(split), sep=";", parse_dates=["timestamp", "lastStart"])
    log.info("make_dataset %s: %d rows x %d columns", split, len(df), df.shape[1])
    df.to_pickle(_prepare(paths.interim(split)))


def _fillna(df: pd.DataFrame) -> pd.DataFrame:
    """Numeric gaps to 0, everything else to "unknown" (see the module docstring)."""
    numeric = df.select_dtypes(include="number").columns
    other = [c for c in df.columns if c not in numeric]
    df[numeric] = df[numeric].fillna(0)
    df[other] = df[other].fillna("unknown")
    return df


def preprocessing(paths: ReferencePaths, split: str) -> None:
    """The reference's feature step, with its per-row apply kept on purpose (it is the cost)."""
    df = pd.read_pickle(paths.interim(split))
    df["fromLastStart"] = df.apply(
        lambda r: (r.timestamp - r.lastStart).total_seconds() / 3600, axis=1
    )
    df = df.drop(columns=["id", "timestamp", "lastStart"])
    df = _fillna(df)
    log.info("preprocessing %s: %d rows", split, len(df))
    df.to_csv(_prepare(paths.processed(split)), index=False)


def build_pipeline() -> object:
    """One-hot categoricals, scaled numerics, default logistic regression: the reference model."""
    from sklearn.compose import ColumnTransformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    preprocessor = ColumnTransformer(
        [
            ("cat", OneHotEncoder(handle_unknown="ignore"), CATEGORICAL),
            ("num", StandardScaler(), NUMERICAL),
        ]
    )
    return Pipeline([("preprocessor", preprocessor), ("classifier", LogisticRegression())])


def training(paths: ReferencePaths) -> None:
    """Three separate CV runs (one per metric) and a final fit, exactly the reference's cost."""
    from sklearn.model_selection import cross_val_score

    df = pd.read_csv(paths.processed("train"))
    X, y = df.drop(columns=[TARGET]), df[TARGET]
    pipe = build_pipeline()
    cv: dict[str, dict[str, object]] = {}
    for scoring in CV_SCORINGS:
        started = time.perf_counter()
        scores = cross_val_score(pipe, X, y, cv=3, scoring=scoring)
        seconds = time.perf_counter() - started
        cv[scoring] = {"scores": scores.tolist(), "mean": float(scores.mean()), "seconds": seconds}
        log.info("training: cv %s = %.5f (%.1f s)", scoring, scores.mean(), seconds)
    started = time.perf_counter()
    pipe.fit(X, y)
    detail = {"rows": len(df), "cv": cv, "final_fit_seconds": time.perf_counter() - started}
    with open(_prepare(paths.model), "wb") as fh:
        pickle.dump(pipe, fh)
    paths.training_detail.write_text(json.dumps(detail, indent=2))


def predicting(paths: ReferencePaths) -> None:
    """Score the processed test CSV with the pickled pipeline; one probability per input row."""
    with open(paths.model, "rb") as fh:
        pipe = pickle.load(fh)
    df = pd.read_csv(paths.processed("test"))
    proba = pipe.predict_proba(df)[:, 1]
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
    elif args.stage == "preprocessing":
        preprocessing(paths, args.split)
    elif args.stage == "training":
        training(paths)
    else:
        predicting(paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
