"""Stage 4: score the processed test set with one verified model, keyed by a new version.

The hand-over is read, scored and written one batch at a time (the .npy's header takes the
row count from the hand-over's footer), so memory does not grow with the number of rows.

The model is resolved once (the champion, or `--model`), verified against its recorded
sha256, and named with that sha256 beside the predictions, so a training run promoting a new
champion halfway through cannot mix two models into one output.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rtb.config import ProjectPaths, claimed_version, new_version
from rtb.csv_export import write_csv_batches
from rtb.data.preprocessing import ScoringBatches, read_scoring_batches
from rtb.dataset_config import DatasetConfig
from rtb.errors import RtbError
from rtb.features import feature_frame
from rtb.io_utils import atomic_path, replace_set, sha256_file, write_yaml
from rtb.models import registry
from rtb.overlap import in_parallel
from rtb.prediction_sets import PredictionSet
from rtb.progress import Progress
from rtb.scoring.agreement import CHECK_ROWS
from rtb.scoring.artifact import ScoringTables
from rtb.scoring.batch import TableScorer, batch_scorer

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

CHUNK_ROWS = 250_000
SCORING_THREADS = 2


def predict(model: object, frame: pd.DataFrame, cfg: DatasetConfig) -> np.ndarray:
    """Pure core: probability of install for each row, in input order (the whole frame at
    once: `predict_batches` on its chunks)."""
    chunks = (frame.iloc[start : start + CHUNK_ROWS] for start in range(0, len(frame), CHUNK_ROWS))
    scored = list(predict_batches(model, chunks, cfg, chunks=-(-len(frame) // CHUNK_ROWS)))
    return np.concatenate(scored) if scored else np.empty(0, dtype=np.float64)


def predict_batches(
    model: object, frames: Iterable[pd.DataFrame], cfg: DatasetConfig, *, chunks: int
) -> Iterator[np.ndarray]:
    """Core, batch by batch: the probabilities of each frame of `frames` (`chunks` of them),
    in order, holding at most a few frames at a time.

    `model` is a pipeline or the `ScoringTables` training wrote and checked beside it
    (`load_scorer`). A pipeline's table scorer is checked against `predict_proba` on the first
    `CHECK_ROWS` rows (gathered across frames, so the check does not depend on how the input
    is batched)."""
    frames = iter(frames)
    head: list[pd.DataFrame] = []
    if isinstance(model, ScoringTables):
        fast: TableScorer | None = TableScorer(model)
        log.info("scoring through the model's scoring tables (checked against its predict_proba "
                 "when training wrote them)")
    else:
        head, fast = _checked_scorer(model, frames, cfg)
        if not head:
            return

    def score(features: pd.DataFrame) -> np.ndarray:
        try:
            if fast is not None:
                probabilities = np.asarray(fast.predict_positive(features), dtype=np.float64)
            else:
                probabilities = np.asarray(model.predict_proba(features)[:, 1], dtype=np.float64)
        except KeyError as exc:
            raise RtbError(f"model expects column(s) missing from the test data: {exc}") from exc
        if not np.all(np.isfinite(probabilities)):
            raise RtbError("model produced non-finite probabilities; refusing to write them")
        return probabilities

    progress, done = Progress(log, "predict", chunks), 0
    rest = (feature_frame(frame, cfg) for frame in frames)
    # The first frame alone: it builds the encoders' lazy hash indexes, which must not be
    # built by two threads at once. Then two frames at a time: the encoders and the model
    # spend their time in numpy and LightGBM kernels that release the GIL.
    with ThreadPoolExecutor(max_workers=SCORING_THREADS, thread_name_prefix="score") as pool:
        pending: deque[Future[np.ndarray]] = deque()
        for position, features in enumerate(itertools.chain(head, rest)):
            if position == 0:
                pending.append(_done(score(features)))
            else:
                pending.append(pool.submit(score, features))
            while pending and (len(pending) > SCORING_THREADS or position == 0):
                probabilities = pending.popleft().result()
                done += len(probabilities)
                progress.advance(f"scored rows {done - len(probabilities) + 1}-{done}")
                yield probabilities
        while pending:
            probabilities = pending.popleft().result()
            done += len(probabilities)
            progress.advance(f"scored rows {done - len(probabilities) + 1}-{done}")
            yield probabilities


def _checked_scorer(
    model: object, frames: Iterator[pd.DataFrame], cfg: DatasetConfig
) -> tuple[list[pd.DataFrame], TableScorer | None]:
    """The first frames (enough for the check) and the table scorer if it agrees with the
    pipeline on their first `CHECK_ROWS` rows; None: score with `predict_proba`."""
    head: list[pd.DataFrame] = []
    while sum(len(f) for f in head) < CHECK_ROWS and (frame := next(frames, None)) is not None:
        head.append(feature_frame(frame, cfg))
    if not head:
        return head, None
    import pandas as pd

    sample = pd.concat(head).iloc[:CHECK_ROWS] if len(head) > 1 else head[0].iloc[:CHECK_ROWS]
    try:
        fast = batch_scorer(model, sample)
    except KeyError as exc:
        raise RtbError(f"model expects column(s) missing from the test data: {exc}") from exc
    if fast is not None:
        log.info("scoring through per-level log-odds tables (equal to predict_proba within "
                 "1e-9 on the first %d rows)", len(sample))
    return head, fast


def _done(value: np.ndarray) -> Future[np.ndarray]:
    future: Future[np.ndarray] = Future()
    future.set_result(value)
    return future


def load_scorer(paths: ProjectPaths, entry: registry.ModelEntry) -> object:
    """What `predict_batches` scores with: the scoring tables training wrote and checked
    beside the model (no sklearn import), else the verified model itself."""
    tables = registry.load_scoring_tables(paths, entry)
    return tables if tables is not None else load_scoring_model(entry)


def load_scoring_model(entry: registry.ModelEntry) -> object:
    """The verified model, refused unless it can give probabilities."""
    model = registry.load_verified(entry)
    if not hasattr(model, "predict_proba"):
        raise RtbError(f"{entry.path}: holds a {type(model).__name__}, not a model with predict_proba")
    return model


@dataclass
class Scored:
    """What was written: rows and their mean probability (for the sidecar and the log)."""

    rows: int
    mean_probability: float | None


def write_prediction_set(
    paths: ProjectPaths, version: str, ids: pa.ChunkedArray | pa.Array, probabilities: np.ndarray,
    sidecar: dict[str, object],
) -> Path:
    """The three files of one versioned result: probabilities, ids with probabilities, the
    sidecar. If any write fails, the ones already renamed into place are removed again, so a
    predictions_<version> set is either complete or absent."""
    files = PredictionSet.versioned(paths, version).files
    chunks, start = [], 0
    for chunk in ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids]:
        chunks.append((chunk, probabilities[start : start + len(chunk)]))
        start += len(chunk)
    _write_set_files(files, chunks, len(probabilities), lambda _: sidecar)
    return files[0]


Chunks = Iterable[tuple[pa.Array, np.ndarray]]


def _write_set_files(
    files: list[Path], chunks: Chunks, rows: int, sidecar: Callable[[Scored], dict[str, object]],
) -> Scored:
    """Write (ids, probabilities) chunks as they come into the .npy and .csv (the .npy header
    needs the row count up front: the hand-over's footer gives it), then the sidecar, given
    what was written."""
    npy, csv, yaml_path = files
    written: list[Path] = []
    try:
        with atomic_path(npy) as npy_tmp:
            with atomic_path(csv) as csv_tmp:
                scored = _write_chunks(npy_tmp, csv_tmp, chunks, rows)
            written.append(csv)
        written.append(npy)
        write_yaml(yaml_path, sidecar(scored))
    except BaseException:
        for path in written:
            path.unlink(missing_ok=True)
        raise
    return scored


def _write_chunks(npy_path: Path, csv_path: Path, chunks: Chunks, rows: int) -> Scored:
    done, total = 0, 0.0
    schema = pa.schema([("id", pa.string()), ("probability", pa.float64())])
    with open(npy_path, "wb") as npy_out:
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float64)),
                  "fortran_order": False, "shape": (rows,)}
        np.lib.format.write_array_header_1_0(npy_out, header)  # what np.save writes

        def rows_of_csv() -> Iterator[pa.RecordBatch]:
            nonlocal done, total
            for ids, probabilities in chunks:
                npy_out.write(np.ascontiguousarray(probabilities, dtype=np.float64).tobytes())
                done, total = done + len(probabilities), total + float(probabilities.sum())
                yield pa.record_batch([pc.cast(ids, pa.string()), pa.array(probabilities)],
                                      schema=schema)

        write_csv_batches(csv_path, schema, rows_of_csv())
    if done != rows:
        raise RtbError(f"{npy_path.name}: {rows} rows announced, {done} written")
    return Scored(done, total / done if done else None)


def _scored_chunks(model: object, scoring: ScoringBatches, cfg: DatasetConfig) -> Chunks:
    """(ids, probabilities) per frame of the hand-over, scored as they are read."""
    ids_of: deque[pa.Array] = deque()

    def frames() -> Iterator[pd.DataFrame]:
        for ids, frame in scoring:
            ids_of.append(ids)
            yield frame

    for probabilities in predict_batches(model, frames(), cfg, chunks=len(scoring)):
        yield ids_of.popleft(), probabilities


def run_predicting(
    paths: ProjectPaths, cfg: DatasetConfig, *, model_path: Path | None, run_id: str | None = None
) -> Path:
    """CLI stage: processed test hand-over -> predictions_<version>.npy, .csv and .yaml."""
    started = time.perf_counter()
    entry = registry.resolve_model(paths, model_path)
    source = paths.processed_arrow("test")
    scoring, input_sha, model = _open(paths, entry, source, cfg)

    def taken(version: str) -> bool:
        return PredictionSet.versioned(paths, version).probabilities.exists()

    with claimed_version(paths.predictions_dir, taken) as version:

        def sidecar(scored: Scored) -> dict[str, object]:
            payload = _sidecar(version, scored, entry, source, input_sha, started)
            payload["outputs"] = [path.name for path in PredictionSet.versioned(paths, version).files[:2]]
            if run_id is not None:
                payload["run_id"] = run_id
            return payload

        files = PredictionSet.versioned(paths, version).files
        scored = _write_set_files(files, _scored_chunks(model, scoring, cfg), scoring.rows, sidecar)
    _log_done(scored, entry, files[0], started)
    return files[0]


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
    scoring, input_sha, model = _open(paths, entry, source, cfg)
    version = new_version()

    def sidecar(scored: Scored) -> dict[str, object]:
        payload = _sidecar(version, scored, entry, source, input_sha, started)
        payload.update({
            "partition": name,
            "interval": {"start": interval[0], "end": interval[1]} if interval else None,
            "run_id": run_id,
            "outputs": [path.name for path in PredictionSet.in_folder(Path()).files[:2]],
        })
        return payload

    results: list[Scored] = []
    final = replace_set(paths.prediction_set(name), lambda folder: results.append(_write_set_files(
        PredictionSet.in_folder(folder).files,
        _scored_chunks(model, scoring, cfg), scoring.rows, sidecar)))
    _log_done(results[0], entry, final, started)
    return final


def _open(
    paths: ProjectPaths, entry: registry.ModelEntry, source: Path, cfg: DatasetConfig
) -> tuple[ScoringBatches, str, object]:
    log.info("using model %s (version %s, sha256 %s)", entry.path.name, entry.version, entry.sha256)
    # Opening the input, hashing it for the sidecar and loading the scorer (which imports
    # sklearn when it is the model) are independent; an error in the input is reported first.
    return in_parallel(
        lambda: read_scoring_batches(source, cfg, CHUNK_ROWS),
        lambda: sha256_file(source) if source.exists() else "",
        lambda: load_scorer(paths, entry),
    )


def _sidecar(
    version: str, scored: Scored, entry: registry.ModelEntry, source: Path,
    input_sha: str, started: float,
) -> dict[str, object]:
    return {
        "version": version,
        "rows": scored.rows,
        "mean_probability": scored.mean_probability,
        "model": {"file": entry.path.name, "version": entry.version, "sha256": entry.sha256},
        "input": {"file": source.name, "sha256": input_sha},
        "seconds": round(time.perf_counter() - started, 2),
    }


def _log_done(scored: Scored, entry: registry.ModelEntry, out: Path, started: float) -> None:
    log.info(
        "scored %d rows (mean probability %.5f) with %s; wrote %s in %.1f s",
        scored.rows,
        scored.mean_probability if scored.rows else float("nan"),
        entry.path.name,
        out.name,
        time.perf_counter() - started,
    )
