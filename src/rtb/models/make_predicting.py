"""Stage 4: score the processed test set with one verified model, keyed by a new version.

The model is resolved once (the champion, or `--model`), verified against its recorded
sha256, and named with that sha256 beside the predictions, so a training run promoting a new
champion halfway through cannot mix two models into one output.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from rtb.config import ProjectPaths, claim_version, new_version
from rtb.data.preprocessing import read_scoring_input
from rtb.dataset_config import DatasetConfig
from rtb.errors import RtbError
from rtb.features import feature_frame
from rtb.io_utils import atomic_path, replace_set, sha256_file, write_yaml
from rtb.models import registry
from rtb.overlap import in_parallel
from rtb.progress import Progress

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

CHUNK_ROWS = 250_000
SCORING_THREADS = 2
CHECK_ROWS = 20_000
SUFFIXES = (".npy", ".csv", ".yaml")  # the .yaml sidecar is written last: it marks a complete set
PREDICTIONS_STEM = "predictions"  # the file names inside a partition's prediction set


def predict(model: object, frame: pd.DataFrame, cfg: DatasetConfig) -> np.ndarray:
    """Pure core: probability of install for each row, in input order.

    Rows are scored in chunks: the encoded feature matrix of the whole input would otherwise
    sit in memory beside the frame, for results that are the same row by row.
    """
    # Imported here, not at module level: sklearn's import is what `run_predicting` overlaps
    # with reading the input, and it happens while the model is unpickled.
    from rtb.scoring.batch import batch_scorer

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


def load_scoring_model(entry: registry.ModelEntry) -> object:
    """The verified model, refused unless it can give probabilities."""
    model = registry.load_verified(entry)
    if not hasattr(model, "predict_proba"):
        raise RtbError(f"{entry.path}: holds a {type(model).__name__}, not a model with predict_proba")
    return model


def write_prediction_set(
    paths: ProjectPaths, version: str, ids: pa.ChunkedArray, probabilities: np.ndarray,
    sidecar: dict[str, object],
) -> Path:
    """The three files of one versioned result: probabilities, ids with probabilities, the
    sidecar. If any write fails, the ones already renamed into place are removed again, so a
    predictions_<version> set is either complete or absent."""
    return _write_set_files([paths.predictions(version, suffix) for suffix in SUFFIXES], ids,
                            probabilities, sidecar)


def _write_set_files(
    files: list[Path], ids: pa.ChunkedArray, probabilities: np.ndarray, sidecar: dict[str, object]
) -> Path:
    npy, csv, yaml_path = files
    table = pa.table({"id": pc.cast(ids, pa.string()), "probability": pa.array(probabilities)})
    written: list[Path] = []
    try:
        with atomic_path(npy) as tmp:
            with open(tmp, "wb") as handle:
                np.save(handle, probabilities)
        written.append(npy)
        with atomic_path(csv) as tmp:
            pcsv.write_csv(table, tmp)
        written.append(csv)
        write_yaml(yaml_path, sidecar)
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return npy


def run_predicting(
    paths: ProjectPaths, cfg: DatasetConfig, *, model_path: Path | None, run_id: str | None = None
) -> Path:
    """CLI stage: processed test hand-over -> predictions_<version>.npy, .csv and .yaml."""
    started = time.perf_counter()
    entry = registry.resolve_model(paths, model_path)
    source = paths.processed_arrow("test")
    ids, probabilities, input_sha = _score(entry, source, cfg)
    version = claim_version(lambda v: paths.predictions(v, SUFFIXES[0]).exists())
    sidecar = _sidecar(version, probabilities, entry, source, input_sha, started)
    sidecar["outputs"] = [paths.predictions(version, suffix).name for suffix in SUFFIXES[:2]]
    if run_id is not None:
        sidecar["run_id"] = run_id
    npy = write_prediction_set(paths, version, ids, probabilities, sidecar)
    _log_done(probabilities, entry, npy, started)
    return npy


def run_predicting_partition(
    paths: ProjectPaths,
    cfg: DatasetConfig,
    name: str,
    *,
    model_path: Path | None,
    interval: tuple[str, str] | None = None,
    run_id: str | None = None,
) -> Path:
    """CLI stage for one request partition: its processed hand-over -> the partition's one
    prediction set, `data/predictions/<partition>/` (replaced as a whole on a re-run)."""
    started = time.perf_counter()
    entry = registry.resolve_model(paths, model_path)
    source = paths.processed_arrow(name)
    ids, probabilities, input_sha = _score(entry, source, cfg)
    version = new_version()
    sidecar = _sidecar(version, probabilities, entry, source, input_sha, started)
    sidecar.update({
        "partition": name,
        "interval": {"start": interval[0], "end": interval[1]} if interval else None,
        "run_id": run_id,
        "outputs": [f"{PREDICTIONS_STEM}{suffix}" for suffix in SUFFIXES[:2]],
    })
    final = replace_set(paths.prediction_set(name), lambda folder: _write_set_files(
        [folder / f"{PREDICTIONS_STEM}{suffix}" for suffix in SUFFIXES], ids, probabilities, sidecar))
    _log_done(probabilities, entry, final, started)
    return final


def _score(
    entry: registry.ModelEntry, source: Path, cfg: DatasetConfig
) -> tuple[pa.ChunkedArray, np.ndarray, str]:
    log.info("using model %s (version %s, sha256 %s)", entry.path.name, entry.version, entry.sha256)
    # Reading the input, hashing it for the sidecar and unpickling the model (which imports
    # sklearn) are independent; an error in the input is reported before one of the model.
    scoring_input, input_sha, model = in_parallel(
        lambda: read_scoring_input(source, cfg),
        lambda: sha256_file(source) if source.exists() else "",
        lambda: load_scoring_model(entry),
    )
    return scoring_input.ids, predict(model, scoring_input.frame, cfg), input_sha


def _sidecar(
    version: str, probabilities: np.ndarray, entry: registry.ModelEntry, source: Path,
    input_sha: str, started: float,
) -> dict[str, object]:
    return {
        "version": version,
        "rows": int(len(probabilities)),
        "mean_probability": float(probabilities.mean()) if len(probabilities) else None,
        "model": {"file": entry.path.name, "version": entry.version, "sha256": entry.sha256},
        "input": {"file": source.name, "sha256": input_sha},
        "seconds": round(time.perf_counter() - started, 2),
    }


def _log_done(probabilities: np.ndarray, entry: registry.ModelEntry, out: Path, started: float) -> None:
    log.info(
        "scored %d rows (mean probability %.5f) with %s; wrote %s in %.1f s",
        len(probabilities),
        probabilities.mean() if len(probabilities) else float("nan"),
        entry.path.name,
        out.name,
        time.perf_counter() - started,
    )
