"""Stage 4: score the processed test set with one verified model, keyed by a new version.

The model is resolved once (the champion, or `--model`), verified against its recorded
sha256, and named with that sha256 beside the predictions, so a training run promoting a new
champion halfway through cannot mix two models into one output.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from rtb.config import ProjectPaths, claim_version
from rtb.data.preprocessing import ScoringInput, read_scoring_input
from rtb.dataset_config import DatasetConfig
from rtb.errors import RtbError
from rtb.io_utils import atomic_path, write_yaml
from rtb.models import registry
from rtb.models.batch_scoring import batch_scorer
from rtb.models.pipeline import feature_frame
from rtb.progress import Progress

log = logging.getLogger(__name__)

CHUNK_ROWS = 250_000
SCORING_THREADS = 2
CHECK_ROWS = 20_000


def predict(model: object, frame: pd.DataFrame, cfg: DatasetConfig) -> np.ndarray:
    """Pure core: probability of install for each row, in input order.

    Rows are scored in chunks: the encoded feature matrix of 3.7M rows would otherwise need
    about 1 GB on top of the frame, for results that are the same row by row.
    """
    features = feature_frame(frame, cfg)
    probabilities = np.empty(len(features), dtype=np.float64)
    starts = range(0, len(features), CHUNK_ROWS)
    progress = Progress(log, "predict", len(starts))
    try:
        fast = batch_scorer(model, features.iloc[:CHECK_ROWS])
    except KeyError as exc:
        raise RtbError(f"model expects column(s) missing from the test data: {exc}") from exc
    if fast is not None:
        log.info("scoring through per-level log-odds tables (equal to predict_proba within "
                 "1e-9 on the first %d rows)", min(CHECK_ROWS, len(features)))

    def score(start: int) -> int:
        chunk = features.iloc[start : start + CHUNK_ROWS]
        if fast is not None:
            probabilities[start : start + len(chunk)] = fast.predict_positive(chunk)
        else:
            probabilities[start : start + len(chunk)] = model.predict_proba(chunk)[:, 1]
        return start + len(chunk)

    try:
        # The first chunk alone: it builds the encoders' lazy hash indexes, which must not be
        # built by two threads at once. Then two chunks at a time: the encoders and the model
        # spend their time in numpy and LightGBM kernels that release the GIL; each chunk
        # writes its own slice.
        for start in starts[:1]:
            progress.advance(f"scored rows {start + 1}-{score(start)} of {len(features)}")
        with ThreadPoolExecutor(max_workers=SCORING_THREADS, thread_name_prefix="score") as pool:
            for start, end in zip(starts[1:], pool.map(score, starts[1:]), strict=True):
                progress.advance(f"scored rows {start + 1}-{end} of {len(features)}")
    except KeyError as exc:
        raise RtbError(f"model expects column(s) missing from the test data: {exc}") from exc
    if not np.all(np.isfinite(probabilities)):
        raise RtbError("model produced non-finite probabilities; refusing to write them")
    return probabilities


def run_predicting(
    paths: ProjectPaths,
    cfg: DatasetConfig,
    *,
    model_path: Path | None,
    reading: Future[ScoringInput] | None = None,
) -> Path:
    """CLI stage: processed test CSV -> predictions_<version>.npy, .csv and .yaml sidecar.

    `reading` is the input already being read (see `rtb.cli.predict`); else it is read here.
    """
    started = time.perf_counter()
    entry = registry.resolve_model(paths.models_dir, model_path)
    log.info("using model %s (version %s, sha256 %s)", entry.path.name, entry.version, entry.sha256)
    model = registry.load_verified(entry)
    if not hasattr(model, "predict_proba"):
        raise RtbError(f"{entry.path}: holds a {type(model).__name__}, not a model with predict_proba")
    source = paths.processed("test")
    scoring_input = reading.result() if reading is not None else read_scoring_input(source, cfg)
    ids, frame, input_sha = scoring_input.ids, scoring_input.frame, scoring_input.sha256 or None
    probabilities = predict(model, frame, cfg)
    version = claim_version(lambda v: (paths.predictions_dir / f"predictions_{v}.npy").exists())
    stem = paths.predictions_dir / f"predictions_{version}"
    table = pa.table({"id": pc.cast(ids, pa.string()), "probability": pa.array(probabilities)})
    sidecar = {
        "version": version,
        "rows": int(len(probabilities)),
        "mean_probability": float(probabilities.mean()),
        "model": {"file": entry.path.name, "version": entry.version, "sha256": entry.sha256},
        "input": {"file": source.name, "sha256": input_sha},
        "outputs": [stem.with_suffix(".npy").name, stem.with_suffix(".csv").name],
        "seconds": round(time.perf_counter() - started, 2),
    }
    # The three files are one result: if any write fails, the ones already renamed into place
    # are removed again, so a predictions_<version> set is either complete or absent.
    written: list[Path] = []
    try:
        with atomic_path(stem.with_suffix(".npy")) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, probabilities)
        written.append(stem.with_suffix(".npy"))
        with atomic_path(stem.with_suffix(".csv")) as tmp:
            pcsv.write_csv(table, tmp)
        written.append(stem.with_suffix(".csv"))
        write_yaml(stem.with_suffix(".yaml"), sidecar)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    log.info(
        "scored %d rows (mean probability %.5f) with %s; wrote %s in %.1f s",
        len(probabilities),
        probabilities.mean(),
        entry.path.name,
        stem.with_suffix(".npy").name,
        time.perf_counter() - started,
    )
    return stem.with_suffix(".npy")

