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

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.feather as feather

from rtb.config import ProjectPaths
from rtb.data.make_dataset import read_interim
from rtb.dataset_config import DatasetConfig
from rtb.errors import RtbError
from rtb.features import derive_feature_table
from rtb.io_utils import atomic_path
from rtb.overlap import in_parallel

if TYPE_CHECKING:  # the stage runs on Arrow alone; pandas is imported by the readers
    import pandas as pd

log = logging.getLogger(__name__)


def preprocess(interim: pa.Table, cfg: DatasetConfig, *, source: str = "interim") -> pa.Table:
    """Pure core: typed interim table -> processed table (features, id, timestamp, target)."""
    # The raw input's fingerprint (make_dataset's `rtb.*` metadata) travels with the rows, so
    # a training report can name the raw files behind every hand-over it read.
    provenance = {k: v for k, v in (interim.schema.metadata or {}).items() if k.startswith(b"rtb.")}
    features = derive_feature_table(interim, cfg).replace_schema_metadata(provenance or None)
    for feature in cfg.datetimes.values():
        negative = pc.sum(pc.less(features.column(feature), 0)).as_py() or 0
        if negative:
            log.warning("%s: %d rows have %s < 0 (event after the request)", source, negative,
                        feature)
    return features


def write_processed(table: pa.Table, csv_path: Path, arrow_path: Path) -> None:
    """Write the CSV export and the Arrow hand-over; both are renamed into place after both
    were written."""
    text = pa.table([_as_plain(column) for column in table.columns], names=table.column_names)
    # One dictionary per column across all chunks: pandas then converts without unifying one
    # dictionary per chunk on every read.
    hand_over = table.unify_dictionaries()
    with (atomic_path(csv_path, overwrite=True) as csv_tmp,
          atomic_path(arrow_path, overwrite=True) as arrow_tmp):
        in_parallel(  # Arrow's CSV writer and the IPC writer both run without the GIL
            lambda: _writing(csv_path, lambda: pcsv.write_csv(text, csv_tmp)),
            lambda: _writing(arrow_path, lambda: feather.write_feather(
                hand_over, str(arrow_tmp), compression="uncompressed")),
        )


def _writing(final: Path, write: Callable[[], object]) -> None:
    """Run one of two concurrent writes; a failure names its own file (both run inside both
    files' atomic blocks, so the blocks cannot tell whose error it is)."""
    try:
        write()
    except OSError as exc:
        raise RtbError(f"{final}: write failed ({exc.strerror or exc})") from exc


def _as_plain(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_dictionary(column.type):
        return pc.cast(column, column.type.value_type)
    return column


def run_preprocess(paths: ProjectPaths, split: str, cfg: DatasetConfig) -> Path:
    """CLI stage: data/interim/<split>.arrow -> data/processed/<split>_df.arrow and .csv."""
    started = time.perf_counter()
    interim_path = paths.interim(split)
    features = preprocess(read_interim(interim_path), cfg, source=interim_path.name)
    out = paths.processed(split)
    write_processed(features, out, paths.processed_arrow(split))
    log.info(
        "%s: %d rows, %d features derived, wrote %s and %s in %.1f s",
        split,
        features.num_rows,
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
    """
    return _to_frame(_read_processed_table(path, cfg, require_target, with_id), cfg)


def read_processed_many(
    sources: list[Path], cfg: DatasetConfig, *, require_target: bool, with_id: bool = True
) -> pd.DataFrame:
    """Several hand-overs (the days of a training window) as one frame, in the given order.

    Concatenated in Arrow, then one dictionary per column: concatenating pandas categoricals
    whose categories differ would silently turn them into object columns.
    """
    tables = [
        _read_processed_table(path, cfg, require_target, with_id).replace_schema_metadata(None)
        for path in sources
    ]
    if not tables:
        raise RtbError("no processed hand-over to read")
    try:
        table = pa.concat_tables(tables).unify_dictionaries()
    except pa.ArrowInvalid as exc:
        raise RtbError(f"{sources[0].parent}: hand-overs of different layouts ({exc}); "
                       "run `rtb preprocess` again for each") from exc
    return _to_frame(table, cfg)


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


@dataclass
class ScoringInput:
    """What `rtb predict` scores: ids (kept in Arrow: they only go back out into the
    predictions file, so they never become Python strings) and the features as a frame."""

    ids: pa.ChunkedArray
    frame: pd.DataFrame


def read_scoring_input(path: Path, cfg: DatasetConfig) -> ScoringInput:
    """The processed test hand-over for `rtb predict`."""
    table = _read_processed_table(path, cfg, require_target=False, with_id=True)
    ids = table.column(cfg.id_column)
    return ScoringInput(ids, _to_frame(table.drop_columns([cfg.id_column]), cfg))


def _read_processed_table(
    path: Path, cfg: DatasetConfig, require_target: bool, with_id: bool
) -> pa.Table:
    if not path.exists():
        raise RtbError(f"{path}: file not found (run `rtb preprocess` first)")
    needed = ([cfg.id_column] if with_id else []) + [cfg.timestamp, *cfg.feature_columns]
    if require_target:
        needed.append(cfg.target)
    try:
        # Memory-mapped (see `read_interim` for why that is safe with rename-only writers).
        table = feather.read_table(path, memory_map=True)
    except (pa.ArrowInvalid, OSError) as exc:
        raise RtbError(f"{path}: not a readable Arrow IPC file ({str(exc).splitlines()[0]}); "
                       "run `rtb preprocess` again") from exc
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise RtbError(f"{path}: missing column(s) {missing} (expected processed {cfg.name} data)")
    return table.select(needed)


def _to_frame(table: pa.Table, cfg: DatasetConfig) -> pd.DataFrame:
    # Hand Arrow's buffers to pandas column by column instead of holding both copies at once,
    # then give the freed blocks back to the OS.
    frame = table.to_pandas(split_blocks=True, self_destruct=True)
    del table
    pa.default_memory_pool().release_unused()
    stamps = frame[cfg.timestamp]
    frame[cfg.timestamp] = stamps.dt.tz_localize("UTC") if stamps.dt.tz is None else stamps
    return frame
