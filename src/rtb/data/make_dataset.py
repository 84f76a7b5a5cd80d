"""Stage 1: validate a raw log against its dataset config and store it typed, as Arrow IPC.

Everything downstream trusts `data/interim/<split>.arrow`: ids are unique, timestamps are
UTC, numbers are numbers, the target is 0/1 with both classes present, categoricals are
dictionary-encoded strings. The raw file's sha256 is stored in the schema metadata so later
stages can tell which input they came from. The interim file is
uncompressed Arrow IPC (Feather v2) rather than Parquet: it is written and read back without
encoding or decoding anything (bench/README.md has the figures), and it is a hand-over
between two of our own stages, not a file users keep.

The file is read, checked and written one block of rows at a time, so the stage's memory
does not grow with the number of rows: each check works on a batch and names the file line
of a bad value, whole-file checks (unique ids, both classes) keep running totals, and each
categorical column keeps one dictionary that grows by deltas (readers see one dictionary per
column, as if the table had been written at once).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rtb import partitions
from rtb.config import ProjectPaths
from rtb.data.raw_reader import READ_BLOCK_BYTES, parse_timestamps, read_raw_batches
from rtb.dataset_config import ROW_ID, DatasetConfig
from rtb.errors import RtbError
from rtb.field_rules import FieldRule, field_rules
from rtb.io_utils import atomic_path, sha256_file
from rtb.overlap import in_parallel, prefetched

log = logging.getLogger(__name__)
T = TypeVar("T")

META_SOURCE_SHA = b"rtb.source_sha256"
META_SOURCE_FILE = b"rtb.source_file"
META_SOURCE_FILES = b"rtb.source_files"  # a partition's files and their sha256, as JSON
# Deltas let a dictionary grow batch by batch in an IPC file; a reader of the file sees the
# final dictionary on every batch.
IPC_OPTIONS = pa.ipc.IpcWriteOptions(emit_dictionary_deltas=True)


# --------------------------------------------------------------------------- one batch
def validate_batch(
    batch: pa.RecordBatch, path: Path, cfg: DatasetConfig, split: str, first_line: int
) -> pa.RecordBatch:
    """Check the contract the rest of the pipeline relies on and normalise dtypes, for the
    rows of one batch whose first row is line `first_line` of `path`. The per-value rules
    are the ones the scoring service applies to a request (`rtb.field_rules`)."""
    rules = field_rules(cfg, split=split)
    columns: dict[str, pa.Array] = {}
    if not cfg.id:
        start = first_line - 2
        columns[ROW_ID] = pa.array(np.arange(start, start + batch.num_rows, dtype=np.int64))
    else:
        ids = batch.column(cfg.id)
        if ids.null_count:
            row = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
            raise RtbError(f"{path}: column {cfg.id!r} line {first_line + row}: expected an id, got empty")
        _check(rules[cfg.id], path, ids, first_line)
        columns[cfg.id] = ids
    columns[cfg.timestamp] = parse_timestamps(path, cfg.timestamp, batch.column(cfg.timestamp),
                                              first_line, cfg.timestamp_format)
    if columns[cfg.timestamp].null_count:
        row = int(np.flatnonzero(columns[cfg.timestamp].is_null().to_numpy(zero_copy_only=False))[0])
        raise RtbError(f"{path}: column {cfg.timestamp!r} line {first_line + row}: expected a "
                       "timestamp on every row, got empty")
    for name in cfg.datetimes:
        columns[name] = parse_timestamps(path, name, batch.column(name), first_line,
                                         cfg.timestamp_format)
    for name in (cfg.timestamp, *cfg.datetimes):
        _check(rules[name], path, columns[name], first_line)
    for name in cfg.categorical:
        columns[name] = pc.dictionary_encode(batch.column(name))  # no-op if the reader did it
        _check(rules[name], path, columns[name], first_line)  # the few levels first, rows if bad
    for name in cfg.numerical:
        _check(rules[name], path, batch.column(name), first_line)
        columns[name] = pa.array(batch.column(name).to_numpy(zero_copy_only=False).astype(np.float32),
                                 from_pandas=True)
    if split == "train":
        columns[cfg.target] = _checked_target(rules[cfg.target], path, batch.column(cfg.target),
                                              first_line)
    return pa.record_batch(list(columns.values()), names=list(columns))


def _check(rule: FieldRule, path: Path, column: pa.Array, first_line: int) -> None:
    """One line naming file, column, line and what was expected, for the first row that
    breaks `rule`."""
    found = rule.first_violation(column)
    if found is not None:
        row, message = found
        raise RtbError(f"{path}: column {rule.name!r} line {first_line + row}: {message}")


def _checked_target(rule: FieldRule, path: Path, column: pa.Array, first_line: int) -> pa.Array:
    """The label: 0 or 1 on every row (a gap is not a label), as int8."""
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise RtbError(f"{path}: column {rule.name!r} line {first_line + row}: expected 0 or 1, got empty")
    _check(rule, path, column, first_line)
    return pa.array(column.to_numpy(zero_copy_only=False).astype(np.int8))


def _check_both_classes(path: Path, name: str, positives: int, rows: int) -> None:
    """Whole-file rule, on the running count of positives."""
    if positives in (0, rows):
        raise RtbError(f"{path}: column {name!r}: every row is {1 if positives else 0} "
                       "(expected both classes to train a model)")


# --------------------------------------------------------------------------- unique ids
_MIX_1, _MIX_2, _SHIFT = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53), np.uint64(33)
_MAX_HASHED_BYTES = 64
_BUCKET_SHIFT = np.uint64(61)  # 8 buckets by the top 3 bits: only one is sorted at a time


def id_hashes(ids: pa.Array) -> np.ndarray:
    """A 64-bit hash of every id (of at most 64 bytes; longer ones go through pandas).

    Each id's bytes are read straight from Arrow's buffer as 8-byte words (zero-padded, the
    length as the seed) and folded through MurmurHash3's finaliser: 8 bytes per row is what
    the uniqueness check keeps of the ids, and sorting them is much cheaper than a hash table
    of the strings."""
    if not pa.types.is_string(ids.type) or ids.null_count:
        import pandas as pd

        return pd.util.hash_array(np.asarray(ids.to_numpy(zero_copy_only=False), dtype=object))
    offsets = np.frombuffer(ids.buffers()[1], np.int32)[ids.offset : ids.offset + len(ids) + 1]
    lengths = np.diff(offsets).astype(np.int64)
    width = int(lengths.max()) if len(lengths) else 0
    if width > _MAX_HASHED_BYTES:
        import pandas as pd

        return pd.util.hash_array(np.asarray(ids.to_numpy(zero_copy_only=False), dtype=object))
    buffer = ids.buffers()[2]
    data = np.frombuffer(buffer, np.uint8) if buffer is not None else np.zeros(0, np.uint8)
    words = max(1, -(-width // 8))
    if int(lengths.min(initial=width)) == width:  # fixed width, as log ids are: one reshape
        block = data[offsets[0] : offsets[-1]].reshape(len(ids), width)
        if width % 8 or not width:
            block = np.pad(block, ((0, 0), (0, words * 8 - width)))
    else:
        columns = np.arange(words * 8)
        inside = columns[None, :] < lengths[:, None]
        block = np.zeros((len(ids), words * 8), dtype=np.uint8)
        block[inside] = data[(offsets[:-1, None] + columns[None, :])[inside]]
    packed = np.ascontiguousarray(block).view(np.uint64)
    hashes = lengths.astype(np.uint64)
    for word in range(words):
        hashes ^= packed[:, word]
        hashes ^= hashes >> _SHIFT
        hashes *= _MIX_1
        hashes ^= hashes >> _SHIFT
        hashes *= _MIX_2
        hashes ^= hashes >> _SHIFT
    return hashes


class IdHashes:
    """The hashes of every id seen so far, in 8 buckets: 8 bytes per row, and finding repeats
    sorts one bucket at a time."""

    def __init__(self) -> None:
        self._buckets: list[list[np.ndarray]] = [[] for _ in range(8)]

    def add(self, hashes: np.ndarray) -> None:
        top = hashes >> _BUCKET_SHIFT
        for bucket, parts in enumerate(self._buckets):
            parts.append(hashes[top == bucket])

    def extend(self, other: IdHashes) -> None:
        for mine, theirs in zip(self._buckets, other._buckets, strict=True):
            mine.extend(theirs)

    def repeated(self) -> np.ndarray:
        """Hash values seen more than once (a repeated id, or rarely two ids that collide)."""
        found = []
        for parts in self._buckets:
            values = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)
            found.append(np.unique(values[1:][values[1:] == values[:-1]]))
        return np.concatenate(found)


def _check_unique_ids(
    label: Path, name: str, hashes: IdHashes, ids: Callable[[], Iterable[pa.Array]]
) -> None:
    """Distinct hashes prove distinct ids; for a repeated hash the ids are read again (`ids`)
    and only those with a repeated hash are compared, so a collision is not an error."""
    repeated = hashes.repeated()
    if not len(repeated):
        return
    candidates = [chunk.filter(pa.array(np.isin(id_hashes(chunk), repeated))) for chunk in ids()]
    counts = pc.value_counts(pa.chunked_array(candidates, type=pa.string()))
    duplicated = pc.filter(counts, pc.greater(counts.field("counts"), 1))
    if len(duplicated):
        raise RtbError(
            f"{label}: column {name!r}: {len(duplicated)} duplicated id(s), e.g. "
            f"{duplicated[0]['values'].as_py()!r} appears {duplicated[0]['counts'].as_py()} times "
            "(expected unique ids)"
        )


# --------------------------------------------------------------------------- whole files
class DictionaryUnifier:
    """One dictionary per categorical column across record batches, grown by appending the
    levels each batch brings (in order of first appearance, as Arrow's `unify_dictionaries`
    orders them), so that an IPC writer stores it as one dictionary plus deltas."""

    def __init__(self) -> None:
        self._levels: dict[str, pa.Array] = {}

    def unify(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        columns = list(batch.columns)
        for position, field in enumerate(batch.schema):
            if pa.types.is_dictionary(field.type):
                columns[position] = self._unified(field.name, columns[position])
        return pa.record_batch(columns, names=batch.schema.names)

    def _unified(self, name: str, column: pa.DictionaryArray) -> pa.DictionaryArray:
        known, dictionary = self._levels.get(name), column.dictionary
        if known is None or (len(dictionary) >= len(known)
                             and dictionary.slice(0, len(known)).equals(known)):
            self._levels[name] = dictionary  # the first, the same, or the same plus new levels
            return column
        if known.slice(0, len(dictionary)).equals(dictionary):  # fewer levels, in the same order
            return pa.DictionaryArray.from_arrays(column.indices, known)
        positions = np.array(pc.fill_null(pc.index_in(dictionary, value_set=known), -1))
        new = positions < 0
        positions[new] = len(known) + np.arange(int(new.sum()))
        if new.any():
            known = pa.concat_arrays([known, dictionary.filter(pa.array(new))])
            self._levels[name] = known
        indices = pc.take(pa.array(positions.astype(np.int32)), column.indices)
        return pa.DictionaryArray.from_arrays(indices, known)


class IpcBatchWriter:
    """Record batches to an Arrow IPC file as they come, in bounded memory.

    `metadata` goes into the schema. Values only known once every batch was produced (the
    sha256 of the input the rows came from, computed beside the parse) are written as
    placeholders of their final length and given to `close`: they are then overwritten in
    place in the two copies of the schema (the stream's first message and the footer), so no
    batch waits for them and none is held back."""

    def __init__(self, tmp: Path, metadata: dict[bytes, bytes] | None = None) -> None:
        self.tmp, self.metadata, self.rows = tmp, metadata, 0
        self._writer: pa.ipc.RecordBatchFileWriter | None = None

    def write(self, batch: pa.RecordBatch) -> None:
        if self._writer is None:
            schema = batch.schema.with_metadata(self.metadata) if self.metadata else batch.schema
            self._writer = pa.ipc.new_file(str(self.tmp), schema, options=IPC_OPTIONS)
        self._writer.write_batch(batch)
        self.rows += batch.num_rows

    def write_all(self, batches: Iterable[pa.RecordBatch]) -> None:
        for batch in batches:
            self.write(batch)

    def close(self, final_metadata: dict[bytes, bytes] | None = None) -> int:
        """Finish the file; the number of rows written."""
        if self._writer is None:
            raise RtbError(f"{self.tmp}: nothing to write (no rows)")
        self._writer.close()
        if final_metadata is not None and self.metadata:
            _fill_in_metadata(self.tmp, self.metadata, final_metadata)
        return self.rows

    def abandon(self) -> None:
        """Close the file after a failure (the caller removes it)."""
        if self._writer is not None:
            with contextlib.suppress(pa.ArrowException, OSError):
                self._writer.close()


_IPC_MAGIC = b"ARROW1"


def _fill_in_metadata(path: Path, placeholders: dict[bytes, bytes], final: dict[bytes, bytes]) -> None:
    """Overwrite each placeholder value with its final value (of the same length) in the
    schema message at the start of the IPC file and in its footer."""
    changes = [(placeholders[key], final[key]) for key in placeholders if placeholders[key] != final[key]]
    if any(len(old) != len(new) for old, new in changes):
        raise ValueError("final metadata values must have their placeholders' length")
    with open(path, "r+b") as handle:
        size = handle.seek(0, 2)
        handle.seek(len(_IPC_MAGIC) + 2)
        _, schema_length = struct.unpack("<Ii", handle.read(8))
        handle.seek(size - len(_IPC_MAGIC) - 4)
        (footer_length,) = struct.unpack("<i", handle.read(4))
        regions = [(len(_IPC_MAGIC) + 10, schema_length),
                   (size - len(_IPC_MAGIC) - 4 - footer_length, footer_length)]
        for start, length in regions:
            handle.seek(start)
            region = handle.read(length)
            for old, new in changes:
                at = region.find(old)
                if at < 0 or region.find(old, at + 1) >= 0:
                    raise RtbError(f"{path}: metadata placeholder not found once in the schema")
                handle.seek(start + at)
                handle.write(new)


def _typed_batches(
    files: list[Path], cfg: DatasetConfig, split: str, label: Path, block_bytes: int,
    totals: dict[str, int],
) -> Iterator[pa.RecordBatch]:
    """Every file's validated batches, in order, with one dictionary per column; ids unique
    within each file and across all of them. `totals` receives rows and positives."""
    unifier, everything = DictionaryUnifier(), IdHashes()
    now = pa.scalar(datetime.now(UTC), type=pa.timestamp("ms", tz="UTC"))
    for path in files:
        seen, rows, positives, future, latest = IdHashes(), 0, 0, 0, None
        # The next block is parsed while this one is checked, unified and written.
        for raw in prefetched(read_raw_batches(path, cfg, split, block_bytes=block_bytes)):
            typed = validate_batch(raw.batch, path, cfg, split, raw.first_line)
            if cfg.id:
                seen.add(id_hashes(typed.column(cfg.id)))
            rows += typed.num_rows
            if split == "train":
                positives += int(pc.sum(typed.column(cfg.target)).as_py() or 0)
            stamps = typed.column(cfg.timestamp)
            ahead = pc.sum(pc.greater(stamps, now)).as_py() or 0
            if ahead:  # requests from the future are kept (clocks drift) but said out loud
                future += ahead
                latest = max(filter(None, [latest, pc.max(stamps).as_py()]))
            totals["columns"] = typed.num_columns
            yield unifier.unify(typed)
        if not rows:
            raise RtbError(f"{path}: no data rows after the header")
        if split == "train":
            _check_both_classes(path, cfg.target, positives, rows)
        if future:
            log.warning("%s: %d rows have a %s in the future (latest %s)", path.name, future,
                        cfg.timestamp, latest)
        if cfg.id:
            _check_unique_ids(path, cfg.id, seen, lambda path=path: _raw_ids(path, cfg, split, block_bytes))
            everything.extend(seen)
        totals["rows"] += rows
        totals["positives"] += positives
    if cfg.id and len(files) > 1:
        _check_unique_ids(label, cfg.id, everything, lambda: (
            chunk for path in files for chunk in _raw_ids(path, cfg, split, block_bytes)))


def _raw_ids(path: Path, cfg: DatasetConfig, split: str, block_bytes: int) -> Iterator[pa.Array]:
    """The ids of a file read again (only after a repeated hash: an error, or a collision)."""
    for raw in read_raw_batches(path, cfg, split, block_bytes=block_bytes):
        yield raw.batch.column(cfg.id)


def _fingerprinted(files: list[Path], read: Callable[[], T]) -> tuple[T, dict[str, str]]:
    """`read()` and the sha256 of each raw file, computed on another core while the files are
    parsed. A file whose identity (inode, size, mtime) changed in the meantime fails the run
    instead of yielding the rows of one file with the sha256 of another."""
    before = [_identity(path) for path in files]
    result, digests = in_parallel(
        read, lambda: {path.name: sha256_file(path) if path.is_file() else "" for path in files})
    for path, identity in zip(files, before, strict=True):
        if _identity(path) != identity:
            raise RtbError(f"{path}: file changed while it was being read; run again")
    return result, digests


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _provenance(digests: dict[str, str], source_file: str, partition: bool) -> dict[bytes, bytes]:
    """A single file's sha256 and name; for a partition also every file's sha256, and as the
    partition's own sha256 the file's (one file) or that of the sorted (name, sha256) list."""
    combined = next(iter(digests.values())) if len(digests) == 1 else hashlib.sha256(
        "\n".join(f"{name} {digest}" for name, digest in sorted(digests.items())).encode()
    ).hexdigest()
    metadata = {META_SOURCE_SHA: combined.encode(), META_SOURCE_FILE: source_file.encode()}
    if partition:
        metadata[META_SOURCE_FILES] = json.dumps(digests, sort_keys=True).encode()
    return metadata


def _provenance_placeholders(files: list[Path], source_file: str, partition: bool) -> dict[bytes, bytes]:
    """`_provenance` with a distinct random stand-in of a sha256's length for every digest."""
    stand_in = secrets.token_hex(32)
    template = _provenance({path.name: stand_in for path in files}, source_file, partition)
    if partition:  # every file's stand-in distinct, so each is found once where it belongs
        template[META_SOURCE_FILES] = json.dumps(
            {path.name: secrets.token_hex(32) for path in files}, sort_keys=True).encode()
    if len(files) > 1:
        template[META_SOURCE_SHA] = secrets.token_hex(32).encode()
    return template


def _partition_source(partition: Path) -> tuple[list[Path], str, str]:
    """A complete raw partition's files, the split they are read as (request partitions like
    the test file, labelled ones like the training file) and its name in the metadata."""
    key = partitions.parse_partition(partition)
    files = partitions.partition_files(partition)
    if not files:
        raise RtbError(f"{partition}: complete but holds no {partitions.DATA_SUFFIX} file")
    split = "train" if key.kind == partitions.LABELLED else "test"
    return files, split, str(Path(*partition.parts[-3 if key.hour else -2:]))


def _read_table(files: list[Path], cfg: DatasetConfig, split: str, label: Path,
                source_file: str, partition: bool, block_bytes: int) -> pa.Table:
    totals = {"rows": 0, "positives": 0, "columns": 0}
    table, digests = _fingerprinted(files, lambda: pa.Table.from_batches(
        list(_typed_batches(files, cfg, split, label, block_bytes, totals))))
    return table.replace_schema_metadata(_provenance(digests, source_file, partition))


def make_dataset(
    raw_path: Path, cfg: DatasetConfig, split: str, *, block_bytes: int = READ_BLOCK_BYTES
) -> pa.Table:
    """Core: raw file -> validated, typed table with its sha256 and name in the metadata (in
    memory: for tests and tools; the stage streams the same batches to disk)."""
    return _read_table([raw_path], cfg, split, raw_path, raw_path.name, False, block_bytes)


def read_partition(
    partition: Path, cfg: DatasetConfig, *, block_bytes: int = READ_BLOCK_BYTES
) -> pa.Table:
    """Every file of one complete raw partition, validated and typed, as one table (in
    memory), with every file's sha256 in the metadata.

    Each file is checked on its own, so an error names the file, column and line; ids must be
    unique across the whole partition."""
    files, split, name = _partition_source(partition)
    return _read_table(files, cfg, split, partition, name, True, block_bytes)


def run_make_dataset(
    paths: ProjectPaths, split: str, cfg: DatasetConfig, *, block_bytes: int = READ_BLOCK_BYTES
) -> Path:
    """CLI stage: data/raw/<file> -> data/interim/<split>.arrow (atomically replaced)."""
    raw_path = paths.raw_dir / cfg.files[split]
    return _write_interim(paths, split, [raw_path], cfg, split, raw_path, raw_path.name, False,
                          block_bytes)


def run_make_dataset_partition(
    paths: ProjectPaths, name: str, cfg: DatasetConfig, *, block_bytes: int = READ_BLOCK_BYTES
) -> Path:
    """CLI stage: data/raw/<partition> -> data/interim/<partition>.arrow (atomically replaced)."""
    partition = paths.raw_dir / name
    files, split, source_file = _partition_source(partition)
    return _write_interim(paths, name, files, cfg, split, partition, source_file, True, block_bytes)


def _write_interim(
    paths: ProjectPaths, name: str, files: list[Path], cfg: DatasetConfig, split: str,
    label: Path, source_file: str, partition: bool, block_bytes: int,
) -> Path:
    started = time.perf_counter()
    out = paths.interim(name)
    totals = {"rows": 0, "positives": 0, "columns": 0}
    placeholders = _provenance_placeholders(files, source_file, partition)
    with atomic_path(out, overwrite=True) as tmp:
        writer = IpcBatchWriter(tmp, placeholders)
        try:
            _, digests = _fingerprinted(files, lambda: writer.write_all(
                _typed_batches(files, cfg, split, label, block_bytes, totals)))
        except BaseException:
            writer.abandon()
            raise
        writer.close(_provenance(digests, source_file, partition))
    message = "%s: read %d rows x %d columns, wrote %s in %.1f s"
    log.info(message, label.name if not partition else name, totals["rows"], totals["columns"], out,
             time.perf_counter() - started)
    if split == "train":
        rate = totals["positives"] / totals["rows"]
        log.info("%s base rate %.4f (%d positives)", name, rate, totals["positives"])
    return out


def open_batches(path: Path, stage: str) -> pa.ipc.RecordBatchFileReader:
    """An Arrow IPC file of ours, to read batch by batch (`reader.get_batch(i)`).

    Read through a plain file, not memory-mapped: a mapping keeps every page it touched in
    the process's resident set, so a stage streaming a file would still peak at its size."""
    if not path.exists():
        raise RtbError(f"{path}: file not found (run `rtb {stage}` first)")
    try:
        return pa.ipc.open_file(pa.OSFile(str(path)))
    except (pa.ArrowInvalid, OSError) as exc:
        raise RtbError(f"{path}: not a readable Arrow IPC file ({str(exc).splitlines()[0]}); "
                       f"run `rtb {stage}` again") from exc
