"""Stage 1: validate a raw log against its dataset config and store it typed, as Arrow IPC.

Everything downstream trusts `data/interim/<split>.arrow`: ids are unique, timestamps are
UTC, numbers are numbers, the target is 0/1 with both classes present, categoricals are
dictionary-encoded strings. The raw file's sha256 is stored in the schema metadata so later
stages can tell which input they came from. The interim file is uncompressed Arrow IPC
(Feather v2) rather than Parquet: it is written and memory-mapped back without encoding or
decoding anything (bench/README.md has the figures), and it is a hand-over between two of
our own stages, not a file users keep.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather

from rtb import partitions
from rtb.config import ProjectPaths
from rtb.data.raw_reader import parse_timestamps, read_raw_table
from rtb.dataset_config import ROW_ID, DatasetConfig
from rtb.errors import RtbError
from rtb.io_utils import atomic_path, sha256_file
from rtb.overlap import in_parallel

log = logging.getLogger(__name__)

META_SOURCE_SHA = b"rtb.source_sha256"
META_SOURCE_FILE = b"rtb.source_file"
META_SOURCE_FILES = b"rtb.source_files"  # a partition's files and their sha256, as JSON


def validate_and_type(table: pa.Table, path: Path, cfg: DatasetConfig, split: str) -> pa.Table:
    """Check the contract the rest of the pipeline relies on and normalise dtypes."""
    if table.num_rows == 0:
        raise RtbError(f"{path}: no data rows after the header")
    columns: dict[str, pa.ChunkedArray] = {}
    if not cfg.id:
        columns[ROW_ID] = pa.chunked_array([pa.array(np.arange(table.num_rows, dtype=np.int64))])
        _type_other_columns(table, path, cfg, split, columns)
        return pa.table(columns)
    ids = table.column(cfg.id)
    if ids.null_count:
        row = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
        raise RtbError(f"{path}: column {cfg.id!r} line {row + 2}: expected an id, got empty")
    columns[cfg.id] = ids
    # The uniqueness check is the slowest one and runs in numpy and Arrow kernels without
    # the GIL: it overlaps everything else, and its error, if any, still comes first.
    in_parallel(
        lambda: _check_unique_ids(path, cfg.id, ids),
        lambda: _type_other_columns(table, path, cfg, split, columns),
    )
    return pa.table(columns)


def _type_other_columns(
    table: pa.Table, path: Path, cfg: DatasetConfig, split: str, columns: dict[str, pa.ChunkedArray]
) -> None:
    columns[cfg.timestamp] = parse_timestamps(path, cfg.timestamp, table.column(cfg.timestamp))
    if columns[cfg.timestamp].null_count:
        raise RtbError(f"{path}: column {cfg.timestamp!r}: {columns[cfg.timestamp].null_count} "
                       "empty timestamps (expected every row to have one)")
    for name in cfg.datetimes:
        columns[name] = parse_timestamps(path, name, table.column(name))
    if cfg.id and _has_control_bytes(table.column(cfg.id)):
        _check_no_control_characters(path, cfg.id, table.column(cfg.id))
    for name in cfg.categorical:
        columns[name] = pc.dictionary_encode(table.column(name))  # no-op if the reader did it
        levels = pa.chunked_array([chunk.dictionary for chunk in columns[name].chunks])
        if _has_control_characters(levels):  # checking the few levels is cheap; find the row
            _check_no_control_characters(path, name, pc.cast(columns[name], pa.string()))
    _warn_about_future(path, cfg.timestamp, columns[cfg.timestamp])
    for name in cfg.numerical:
        columns[name] = _checked_numbers(path, name, table.column(name), name in cfg.non_negative)
    if split == "train":
        columns[cfg.target] = _checked_target(path, cfg.target, table.column(cfg.target))


def _has_control_bytes(column: pa.ChunkedArray) -> bool:
    """Whether any byte of the column's text is below 0x20: a scan of the raw buffer, far
    cheaper than the regex, which then runs only to confirm and find the row (tabs, CR and LF
    are below 0x20 too but allowed, hence the confirmation)."""
    for chunk in column.chunks:
        if pa.types.is_dictionary(chunk.type) or not len(chunk):
            return True  # unusual layout: let the regex decide
        width = 8 if pa.types.is_large_string(chunk.type) else 4
        offsets = np.frombuffer(chunk.buffers()[1], np.int32 if width == 4 else np.int64)
        offsets = offsets[chunk.offset : chunk.offset + len(chunk) + 1]
        data = chunk.buffers()[2]
        if data is not None and (np.frombuffer(data, np.uint8)[offsets[0] : offsets[-1]] < 0x20).any():
            return True
    return False


CONTROL_CHARACTERS = r"[\x00-\x08\x0b\x0c\x0e-\x1f]"


def _has_control_characters(column: pa.ChunkedArray) -> bool:
    return bool(pc.any(pc.match_substring_regex(column, CONTROL_CHARACTERS)).as_py())


def _check_no_control_characters(path: Path, name: str, column: pa.ChunkedArray) -> None:
    """A NUL or other control byte inside a text field means a corrupt file, not a value."""
    bad = pc.fill_null(pc.match_substring_regex(column, CONTROL_CHARACTERS), False)
    if pc.any(bad).as_py():
        row = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
        raise RtbError(
            f"{path}: column {name!r} line {row + 2}: expected text without control characters "
            "(a NUL or similar byte: the file is corrupt)"
        )


def _warn_about_future(path: Path, name: str, stamps: pa.ChunkedArray) -> None:
    """Requests from the future are kept (clocks drift) but said out loud."""
    now = pa.scalar(datetime.now(UTC), type=pa.timestamp("ms", tz="UTC"))
    future = pc.sum(pc.greater(stamps, now)).as_py() or 0
    if future:
        log.warning("%s: %d rows have a %s in the future (latest %s)", path.name, future, name,
                    pc.max(stamps).as_py())


def _check_unique_ids(path: Path, name: str, ids: pa.ChunkedArray) -> None:
    hashes = _fixed_width_hashes(ids)
    if hashes is not None:
        hashes.sort()
        if not (hashes[1:] == hashes[:-1]).any():
            return  # distinct hashes prove distinct ids; a repeat (or a collision) is checked below
    if len(pc.unique(ids)) == len(ids):
        return
    counts = pc.value_counts(ids)
    repeated = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(repeated):
        first = repeated[0]["values"].as_py()
        raise RtbError(
            f"{path}: column {name!r}: {len(repeated)} duplicated id(s), e.g. {first!r} "
            f"appears {repeated[0]['counts'].as_py()} times (expected unique ids)"
        )


_MIX_1, _MIX_2, _SHIFT = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53), np.uint64(33)


def _fixed_width_hashes(ids: pa.ChunkedArray) -> np.ndarray | None:
    """A 64-bit hash of every id when all ids have the same byte length (as log ids do), else None.

    Each id's bytes are read straight from Arrow's buffer as 8-byte words and folded through
    MurmurHash3's finaliser. Sorting such hashes is much cheaper than Arrow's
    hash-table `unique()` on the strings, and most files have no repeated id at all.
    """
    lengths = pc.min_max(pc.binary_length(ids)).as_py()
    width = lengths["min"]
    if ids.null_count or width is None or width != lengths["max"] or not 0 < width <= 64:
        return None
    words = -(-width // 8)
    out = []
    for chunk in ids.chunks:
        if not pa.types.is_string(chunk.type) or not len(chunk):
            return None
        offsets = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
        data = np.frombuffer(chunk.buffers()[2], np.uint8)[offsets[0] : offsets[-1]].reshape(-1, width)
        if width % 8:
            data = np.pad(data, ((0, 0), (0, words * 8 - width)))
        packed = np.ascontiguousarray(data).view(np.uint64)
        hashes = np.full(len(packed), width, dtype=np.uint64)
        for word in range(words):
            hashes ^= packed[:, word]
            hashes ^= hashes >> _SHIFT
            hashes *= _MIX_1
            hashes ^= hashes >> _SHIFT
            hashes *= _MIX_2
            hashes ^= hashes >> _SHIFT
        out.append(hashes)
    return np.concatenate(out)


def _checked_numbers(
    path: Path, name: str, column: pa.ChunkedArray, non_negative: bool
) -> pa.ChunkedArray:
    values = column.to_numpy()
    bad = np.flatnonzero(np.isinf(values))
    if bad.size:
        raise RtbError(f"{path}: column {name!r} line {int(bad[0]) + 2}: expected a finite number")
    if non_negative:
        bad = np.flatnonzero(values < 0)
        if bad.size:
            row = int(bad[0])
            raise RtbError(
                f"{path}: column {name!r} line {row + 2}: expected a count >= 0, got {values[row]:g}"
            )
    return pa.chunked_array([pa.array(values.astype(np.float32), from_pandas=True)])


def _checked_target(path: Path, name: str, column: pa.ChunkedArray) -> pa.ChunkedArray:
    values = column.to_numpy()
    bad = np.flatnonzero(~np.isin(values, (0.0, 1.0)))
    if bad.size:
        row = int(bad[0])
        raise RtbError(
            f"{path}: column {name!r} line {row + 2}: expected 0 or 1, got {values[row]:g}"
        )
    positives = int(values.sum())
    if positives in (0, len(values)):
        only = int(values[0])
        raise RtbError(
            f"{path}: column {name!r}: every row is {only} (expected both classes to train a model)"
        )
    return pa.chunked_array([pa.array(values.astype(np.int8))])


def make_dataset(raw_path: Path, cfg: DatasetConfig, split: str) -> pa.Table:
    """Core: raw file -> validated, typed table."""
    return validate_and_type(read_raw_table(raw_path, cfg, split), raw_path, cfg, split)


def read_and_fingerprint(raw_path: Path, cfg: DatasetConfig, split: str) -> pa.Table:
    """`make_dataset`, with the raw file's sha256 and name in the table's metadata.

    The sha256 is computed while the file is parsed. The file's identity (inode, size, mtime)
    is compared before and after, so a raw file replaced while it is being read fails the run
    instead of yielding the rows of one file with the sha256 of another.
    """
    before = _identity(raw_path)
    typed, digest = in_parallel(
        lambda: make_dataset(raw_path, cfg, split),
        lambda: sha256_file(raw_path) if raw_path.is_file() else "",
    )
    if _identity(raw_path) != before:
        raise RtbError(f"{raw_path}: file changed while it was being read; run again")
    metadata = {
        META_SOURCE_SHA: digest.encode(),
        META_SOURCE_FILE: raw_path.name.encode(),
    }
    return typed.replace_schema_metadata(metadata)


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def read_partition(partition: Path, cfg: DatasetConfig) -> pa.Table:
    """Every file of one complete raw partition, validated and typed, as one table.

    Request partitions are read like the test file (no target), labelled ones like the
    training file. Each file is checked on its own, so an error names the file, column and
    line; ids must be unique across the whole partition. The metadata records every file's
    sha256; the partition's own `rtb.source_sha256` is the file's for a single file, else the
    sha256 of the sorted list of (name, sha256).
    """
    key = partitions.parse_partition(partition)
    split = "train" if key.kind == partitions.LABELLED else "test"
    files = partitions.partition_files(partition)
    if not files:
        raise RtbError(f"{partition}: complete but holds no {partitions.DATA_SUFFIX} file")
    tables = [read_and_fingerprint(path, cfg, split) for path in files]
    digests = {path.name: (table.schema.metadata or {})[META_SOURCE_SHA].decode()
               for path, table in zip(files, tables, strict=True)}
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables])
    if cfg.id:
        _check_unique_ids(partition, cfg.id, table.column(cfg.id))
    combined = next(iter(digests.values())) if len(digests) == 1 else hashlib.sha256(
        "\n".join(f"{name} {digest}" for name, digest in sorted(digests.items())).encode()
    ).hexdigest()
    return table.replace_schema_metadata({
        META_SOURCE_SHA: combined.encode(),
        META_SOURCE_FILE: str(Path(*partition.parts[-3 if key.hour else -2:])).encode(),
        META_SOURCE_FILES: json.dumps(digests, sort_keys=True).encode(),
    })


def run_make_dataset(paths: ProjectPaths, split: str, cfg: DatasetConfig) -> Path:
    """CLI stage: data/raw/<file> -> data/interim/<split>.arrow (atomically replaced)."""
    started = time.perf_counter()
    raw_path = paths.raw_dir / cfg.files[split]
    return _write_interim(paths, split, read_and_fingerprint(raw_path, cfg, split), cfg,
                          raw_path.name, started)


def run_make_dataset_partition(paths: ProjectPaths, name: str, cfg: DatasetConfig) -> Path:
    """CLI stage: data/raw/<partition> -> data/interim/<partition>.arrow (atomically replaced)."""
    started = time.perf_counter()
    return _write_interim(paths, name, read_partition(paths.raw_dir / name, cfg), cfg, name, started)


def _write_interim(
    paths: ProjectPaths, name: str, typed: pa.Table, cfg: DatasetConfig, source: str, started: float
) -> Path:
    out = paths.interim(name)
    with atomic_path(out, overwrite=True) as tmp:
        feather.write_feather(typed, tmp, compression="uncompressed")
    seconds = time.perf_counter() - started
    message = "%s: read %d rows x %d columns, wrote %s in %.1f s"
    log.info(message, source, typed.num_rows, typed.num_columns, out, seconds)
    if cfg.target in typed.column_names:
        rate = pc.mean(typed.column(cfg.target)).as_py()
        log.info("%s base rate %.4f (%d positives)", name, rate, int(rate * typed.num_rows))
    return out


def read_interim(path: Path) -> pa.Table:
    """The typed table `make_dataset` wrote, memory-mapped: no copy and no system time spent
    reading pages the stage may never touch. Our writers only ever replace the file by
    rename, which leaves a mapping intact; only a file cut short in place *during* a run
    would end that attempt with SIGBUS, and Airflow's retry then starts from a clean read."""
    if not path.exists():
        raise RtbError(f"{path}: file not found (run `rtb make-dataset` first)")
    try:
        return feather.read_table(path, memory_map=True)
    except (pa.ArrowInvalid, OSError) as exc:
        raise RtbError(f"{path}: not a readable Arrow IPC file ({str(exc).splitlines()[0]}); "
                       "run `rtb make-dataset` again") from exc
