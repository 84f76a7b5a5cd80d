"""Stage 2: derive the features of every row and hand them over to training and prediction.

The features themselves are defined in `rtb.features` (the same definition serves single
requests). This stage writes two files per split:

- `data/processed/<split>_df.arrow`: the hand-over. Typed Arrow IPC (categoricals as
  dictionaries with one dictionary per column, numerics float32, naive-UTC timestamps) that
  `rtb train` and `rtb predict` memory-map instead of parsing text.
- `data/processed/<split>_df.csv`: the same table as text, the export a person reads or
  loads elsewhere. The stages never read it back, so editing it changes nothing downstream;
  re-run `rtb preprocess` to change what they see.

Both are written to temporary names and renamed into place only once both are complete (a
full disk or a kill leaves the previous pair as it was).
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather

from rtb.config import ProjectPaths
from rtb.csv_export import write_csv_batches
from rtb.data.make_dataset import DictionaryUnifier, IpcBatchWriter, open_batches
from rtb.dataset_config import DatasetConfig
from rtb.errors import RtbError
from rtb.features import derive_feature_table
from rtb.io_utils import atomic_path

if TYPE_CHECKING:  # the stage runs on Arrow alone; pandas is imported by the readers
    import pandas as pd

log = logging.getLogger(__name__)
T = TypeVar("T")


def preprocess(interim: pa.Table, cfg: DatasetConfig, *, source: str = "interim") -> pa.Table:
    """Pure core: typed interim table -> processed table (features, id, timestamp, target)."""
    # The raw input's fingerprint (make_dataset's `rtb.*` metadata) travels with the rows, so
    # a training report can name the raw files behind every hand-over it read.
    features = derive_feature_table(interim, cfg).replace_schema_metadata(
        _provenance(interim.schema) or None)
    _warn_about_negative_recency(_negative_recency(features, cfg), source)
    return features


def _provenance(schema: pa.Schema) -> dict[bytes, bytes]:
    return {k: v for k, v in (schema.metadata or {}).items() if k.startswith(b"rtb.")}


def _warn_about_negative_recency(counts: dict[str, int], source: str) -> None:
    for feature, negative in counts.items():
        if negative:
            log.warning("%s: %d rows have %s < 0 (event after the request)", source, negative,
                        feature)


def _negative_recency(features: pa.Table | pa.RecordBatch, cfg: DatasetConfig) -> dict[str, int]:
    return {feature: pc.sum(pc.less(features.column(feature), 0)).as_py() or 0
            for feature in cfg.datetimes.values()}


def preprocess_batches(
    batches: Iterable[pa.RecordBatch], cfg: DatasetConfig, *, source: str = "interim"
) -> Iterator[pa.RecordBatch]:
    """Core, batch by batch: interim batches -> processed batches, with one dictionary per
    categorical column across them (`__missing__` appended where the first gap appears, which
    is where a whole-table derivation puts it too)."""
    unifier, negative = DictionaryUnifier(), dict.fromkeys(cfg.datetimes.values(), 0)
    for batch in batches:
        features = derive_feature_table(pa.Table.from_batches([batch]), cfg)
        for feature, count in _negative_recency(features, cfg).items():
            negative[feature] += count
        for derived in features.to_batches():
            yield unifier.unify(derived)
    _warn_about_negative_recency(negative, source)


def write_processed(table: pa.Table, csv_path: Path, arrow_path: Path) -> None:
    """Write the CSV export and the Arrow hand-over of a whole table; both are renamed into
    place after both were written."""
    write_processed_batches(table.unify_dictionaries().to_batches(), csv_path, arrow_path,
                            metadata=table.schema.metadata)


def write_processed_batches(
    batches: Iterable[pa.RecordBatch], csv_path: Path, arrow_path: Path, *,
    metadata: dict[bytes, bytes] | None = None,
) -> int:
    """Write the CSV export and the Arrow hand-over batch by batch (categoricals with one
    dictionary per column, so pandas converts without unifying one per batch on every read);
    both are renamed into place after both were written. The number of rows written.

    Each batch is appended to the hand-over as it is derived; its CSV text is formatted on
    both cores by `write_csv_batches` while the next batches are derived."""
    with (atomic_path(csv_path, overwrite=True) as csv_tmp,
          atomic_path(arrow_path, overwrite=True) as arrow_tmp):
        hand_over = IpcBatchWriter(arrow_tmp, metadata)
        stream = iter(batches)
        try:
            first = next(stream, None)
            if first is None:
                raise RtbError(f"{arrow_path}: nothing to write (no rows)")

            def handed_over() -> Iterator[pa.RecordBatch]:
                for batch in itertools.chain([first], stream):
                    _writing(arrow_path, hand_over.write, batch)
                    yield batch

            _writing(csv_path, write_csv_batches, csv_tmp, first.schema, handed_over())
        except BaseException:
            hand_over.abandon()
            raise
        return _writing(arrow_path, hand_over.close)


def _writing(final: Path, write: Callable[..., T], *args: object) -> T:
    """Run one of the two writes; a failure names its own file (both run inside both files'
    atomic blocks, so the blocks cannot tell whose error it is)."""
    try:
        return write(*args)
    except OSError as exc:
        raise RtbError(f"{final}: write failed ({exc.strerror or exc})") from exc


def run_preprocess(paths: ProjectPaths, split: str, cfg: DatasetConfig) -> Path:
    """CLI stage: data/interim/<split>.arrow -> data/processed/<split>_df.arrow and .csv,
    streamed one interim batch at a time."""
    started = time.perf_counter()
    interim_path = paths.interim(split)
    reader = open_batches(interim_path, "make-dataset")
    out = paths.processed(split)
    batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
    rows = write_processed_batches(
        preprocess_batches(batches, cfg, source=interim_path.name), out,
        paths.processed_arrow(split), metadata=_provenance(reader.schema) or None,
    )
    log.info(
        "%s: %d rows, %d features derived, wrote %s and %s in %.1f s",
        split,
        rows,
        len(cfg.feature_columns),
        out.name,
        paths.processed_arrow(split).name,
        time.perf_counter() - started,
    )
    return out


def read_processed(
    path: Path, cfg: DatasetConfig, *, require_target: bool, with_id: bool = True
) -> pd.DataFrame:
    """The processed hand-over with the dtypes the model pipeline expects (categoricals as
    category, numerics float32, timestamps UTC).

    A hand-over from another dataset config fails here with the missing column named, not
    deep inside sklearn. Training passes `with_id=False`: millions of id strings it never
    looks at.

    Read batch by batch into columns allocated once for all rows (the row count is in the
    file's footer): the frame is the only full-size copy ever held, and no page of the file
    stays mapped.
    """
    import pandas as pd

    reader = open_batches(path, "preprocess")
    needed = needed_columns(cfg, require_target, with_id)
    check_columns(path, reader.schema.names, needed, cfg)
    if not reader.num_record_batches:
        return table_to_frame(_read_processed_table(path, cfg, require_target, with_id), cfg)
    _, rows = hand_over_info(path)
    types = {name: reader.schema.field(name).type for name in needed}
    texts: dict[str, list[pa.Array]] = {n: [] for n, t in types.items() if not _fills(t)}
    filled = {n: np.empty(rows, dtype=np.int32 if pa.types.is_dictionary(t) else t.to_pandas_dtype())
              for n, t in types.items() if _fills(t)}
    unifier, dictionaries, offset = DictionaryUnifier(), {}, 0
    for i in range(reader.num_record_batches):
        batch = unifier.unify(reader.get_batch(i).select(needed))
        end = offset + batch.num_rows
        for name, column in zip(needed, batch.columns, strict=True):
            if name in texts:
                texts[name].append(column)
            elif pa.types.is_dictionary(column.type):
                filled[name][offset:end] = pc.fill_null(column.indices, -1).to_numpy()
                dictionaries[name] = column.dictionary
            else:
                filled[name][offset:end] = column.to_numpy(zero_copy_only=False)
        offset = end
    data: dict[str, object] = {}
    for name, kind in types.items():
        if name in texts:
            data[name] = pa.chunked_array(texts.pop(name), type=kind).to_pandas()
        elif pa.types.is_dictionary(kind):
            empty = pa.DictionaryArray.from_arrays(pa.array([], pa.int32()), dictionaries[name])
            data[name] = pd.Categorical.from_codes(filled.pop(name), dtype=empty.to_pandas().dtype)
        else:
            data[name] = filled.pop(name)
    frame = pd.DataFrame(data, copy=False)
    stamps = frame[cfg.timestamp]
    frame[cfg.timestamp] = stamps.dt.tz_localize("UTC") if stamps.dt.tz is None else stamps
    return frame


def _fills(kind: pa.DataType) -> bool:
    """Whether a column is read into a preallocated numpy array (all but text)."""
    return not (pa.types.is_string(kind) or pa.types.is_large_string(kind))


def hand_over_info(path: Path) -> tuple[dict[str, str], int]:
    """The `rtb.*` schema metadata of a processed hand-over (its raw input's fingerprint) and
    its row count, read from the memory-mapped file without decoding any column."""
    try:
        with pa.memory_map(str(path)) as source:
            reader = pa.ipc.open_file(source)
            rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
            metadata = reader.schema.metadata or {}
    except (pa.ArrowInvalid, OSError) as exc:
        raise RtbError(f"{path}: not a readable Arrow IPC file ({str(exc).splitlines()[0]})") from exc
    return {k.decode(): v.decode() for k, v in metadata.items() if k.startswith(b"rtb.")}, rows


class FrameConverter:
    """Record batches of one hand-over -> pandas frames with the dtypes `_to_frame` gives, the
    categories of each column built once: converting each batch on its own would rebuild
    tens of thousands of category strings per column per batch."""

    def __init__(self, cfg: DatasetConfig) -> None:
        self.cfg = cfg
        self._dtypes: dict[str, tuple[pa.Array, object]] = {}

    def frame(self, batch: pa.RecordBatch) -> pd.DataFrame:
        import pandas as pd

        data: dict[str, object] = {}
        for name, column in zip(batch.schema.names, batch.columns, strict=True):
            if pa.types.is_dictionary(column.type):
                cached = self._dtypes.get(name)
                if cached is None or not cached[0].equals(column.dictionary):
                    cached = (column.dictionary, column.slice(0, 0).to_pandas().dtype)
                    self._dtypes[name] = cached
                codes = pc.fill_null(column.indices, -1).to_numpy()
                data[name] = pd.Categorical.from_codes(codes, dtype=cached[1])
            else:
                data[name] = column.to_pandas()
        frame = pd.DataFrame(data)
        if self.cfg.timestamp in frame:
            stamps = frame[self.cfg.timestamp]
            frame[self.cfg.timestamp] = stamps.dt.tz_localize("UTC") if stamps.dt.tz is None else stamps
        return frame


@dataclass
class ScoringBatches:
    """What `rtb predict` scores, one hand-over batch at a time: ids (kept in Arrow: they only
    go back out into the predictions file, so they never become Python strings) and the
    features as a frame. `rows` is known before any batch is read (the IPC footer)."""

    path: Path
    reader: pa.ipc.RecordBatchFileReader
    columns: list[str]
    converter: FrameConverter
    rows: int
    frame_rows: int  # rows per frame handed out, whatever the file's batches

    def __len__(self) -> int:
        return -(-self.rows // self.frame_rows)

    def __iter__(self) -> Iterator[tuple[pa.Array, pd.DataFrame]]:
        id_column = self.converter.cfg.id_column
        batches = (self.reader.get_batch(i).select(self.columns)
                   for i in range(self.reader.num_record_batches))
        for batch in rechunked(batches, self.frame_rows):
            yield batch.column(id_column), self.converter.frame(batch.drop_columns([id_column]))


def rechunked(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """The same rows in batches of exactly `rows` (the last one shorter), holding at most one
    output batch's worth of input: what is computed per chunk (BLAS kernels round by block)
    then does not depend on how a file happens to be batched."""
    parts: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        while batch.num_rows:
            take = min(rows - held, batch.num_rows)
            parts.append(batch.slice(0, take))
            batch, held = batch.slice(take), held + take
            if held == rows:
                yield _combined(parts)
                parts, held = [], 0
    if held:
        yield _combined(parts)


def _combined(parts: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(parts) == 1:
        return parts[0]
    return pa.Table.from_batches(parts).combine_chunks().to_batches()[0]


def read_scoring_batches(path: Path, cfg: DatasetConfig, frame_rows: int) -> ScoringBatches:
    """The processed test hand-over for `rtb predict`, to stream in frames of `frame_rows`."""
    reader = open_batches(path, "preprocess")
    needed = [cfg.id_column, cfg.timestamp, *cfg.feature_columns]
    check_columns(path, reader.schema.names, needed, cfg)
    _, rows = hand_over_info(path)
    return ScoringBatches(path, reader, [cfg.id_column, *cfg.feature_columns], FrameConverter(cfg), rows,
                          frame_rows)


def check_columns(path: Path, present: list[str], needed: list[str], cfg: DatasetConfig) -> None:
    missing = [c for c in needed if c not in present]
    if missing:
        raise RtbError(f"{path}: missing column(s) {missing} (expected processed {cfg.name} data)")


def _read_processed_table(
    path: Path, cfg: DatasetConfig, require_target: bool, with_id: bool
) -> pa.Table:
    if not path.exists():
        raise RtbError(f"{path}: file not found (run `rtb preprocess` first)")
    needed = needed_columns(cfg, require_target, with_id)
    try:
        # Memory-mapped: our writers only ever replace the file by rename, which leaves a
        # mapping intact (a file cut short in place *during* a run would end it with SIGBUS).
        table = feather.read_table(path, memory_map=True)
    except (pa.ArrowInvalid, OSError) as exc:
        raise RtbError(f"{path}: not a readable Arrow IPC file ({str(exc).splitlines()[0]}); "
                       "run `rtb preprocess` again") from exc
    check_columns(path, table.column_names, needed, cfg)
    return table.select(needed)


def needed_columns(cfg: DatasetConfig, require_target: bool, with_id: bool) -> list[str]:
    needed = ([cfg.id_column] if with_id else []) + [cfg.timestamp, *cfg.feature_columns]
    return needed + [cfg.target] if require_target else needed


def table_to_frame(table: pa.Table, cfg: DatasetConfig) -> pd.DataFrame:
    # Hand Arrow's buffers to pandas column by column instead of holding both copies at once,
    # then give the freed blocks back to the OS.
    frame = table.to_pandas(split_blocks=True, self_destruct=True)
    del table
    pa.default_memory_pool().release_unused()
    stamps = frame[cfg.timestamp]
    frame[cfg.timestamp] = stamps.dt.tz_localize("UTC") if stamps.dt.tz is None else stamps
    return frame
