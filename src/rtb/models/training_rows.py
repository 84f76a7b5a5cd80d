"""The rows training learns from, with negative downsampling applied while they are read.

A training window grows with the days it spans, but what training fits on does not: every
candidate sees all positives and at most `fit_max_negatives` negatives, the shipped refit at
most `refit_max_negatives`. Holding every negative of the window only to drop most of them
made train's memory grow with the window (2.4 GB at 15M rows). So the window is read twice:

1. the timestamp and target columns only, to place the time holdout and count the classes,
   which fixes the share `r` of negatives the fits can use at most;
2. every column, batch by batch, keeping each holdout row (calibration and the metrics judge
   on the untouched holdout), each positive, and each earlier negative whose uniform draw is
   below `r`.

Memory is then bounded by the holdout plus the sample, not by the window. Each row's draw
stays with it, so later steps can still take unbiased subsets: `sampled` (every positive and
the share `r` of the negatives, over the whole window: the refit's pool) and `uniform` (the
share `r` of all rows: the drift profile's and the cross-validation's sample). When the
window is small enough `r` is 1 and every row is kept, as before.

`rows_from_frame` applies the same rule to a frame in memory: for the same rows in the same
order both give the same `TrainingRows`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from rtb.data.make_dataset import DictionaryUnifier, open_batches
from rtb.data.preprocessing import check_columns, needed_columns, table_to_frame
from rtb.dataset_config import DatasetConfig
from rtb.errors import RtbError
from rtb.models.limits import TrainingLimits
from rtb.monitoring.profile import seen_levels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingPlan:
    """Where the holdout starts and which share of the earlier negatives is kept, decided
    from the timestamps and labels of every row before any feature is read."""

    rows: int
    positives: int
    holdout_rows: int
    holdout_positives: int
    holdout_starts: pd.Timestamp  # the earliest timestamp in the holdout
    negative_share: float  # r: the share of the earlier negatives kept
    parts: tuple[str, str]  # how the early rows and the holdout are named

    @property
    def base_rate(self) -> float:
        return self.positives / self.rows

    def describe(self) -> str:
        early = self.rows - self.holdout_rows
        return (f"{self.rows} rows ({early} early, {self.holdout_rows} holdout from "
                f"{self.holdout_starts}), base rate {self.base_rate:.4f}; negatives of the early "
                f"rows kept at a share of {self.negative_share:.4f}")


@dataclass
class TrainingRows:
    """The kept rows in time order, which of them are the holdout, each one's uniform draw,
    and the levels every early row had (kept or not: the rate of new levels a model should
    expect is measured against all of them)."""

    frame: pd.DataFrame
    holdout: np.ndarray  # bool per kept row
    draws: np.ndarray  # the uniform draw in [0, 1) of each kept row
    plan: SamplingPlan
    early_levels: dict[str, pd.Index]

    @property
    def negative_share(self) -> float:
        return self.plan.negative_share

    def sampled(self, y: np.ndarray) -> np.ndarray:
        """Every positive and the share `r` of the negatives, over the whole window."""
        return (y == 1) | (self.draws < self.plan.negative_share)

    @property
    def uniform(self) -> np.ndarray:
        """The share `r` of all rows, whatever their label: a uniform sample of the window."""
        return self.draws < self.plan.negative_share


def time_holdout_split(
    stamps: pd.Series, share: float, *, starts: pd.Timestamp | None = None, source: str = "train_df",
) -> np.ndarray:
    """Boolean mask of the latest `share` of rows by timestamp (ties kept together), or, with
    `starts`, of the rows at or after that moment (a training window holds out its latest day:
    the early fit then never saw the day the promotion gate judges it on).

    When the latest timestamp alone holds more than `share` of the rows, the rows of that
    moment are split by their order in the input, and the log says so; when every row has
    the same timestamp there is no time to split by: an error."""
    if starts is not None:
        return (stamps >= starts).to_numpy()
    cutoff = stamps.quantile(1.0 - share)
    holdout = (stamps > cutoff).to_numpy()
    if holdout.any() and not holdout.all():
        return holdout
    if len(stamps) and stamps.min() == stamps.max():
        raise RtbError(f"{source}: column {stamps.name!r}: every one of the {len(stamps)} rows has "
                       f"the timestamp {stamps.iloc[0]}; a time holdout needs rows from at least "
                       "two moments")
    order = np.argsort(_instants(stamps), kind="stable")
    holdout = np.zeros(len(stamps), dtype=bool)
    holdout[order[int(len(stamps) * (1.0 - share)) :]] = True
    tied = int((stamps == cutoff).sum())
    log.warning("%s: %d rows (%.0f%%) share the timestamp %s, more than the holdout's %.0f%%: the "
                "holdout is the last %d of the rows in time order, those of that moment taken in "
                "input order", source, tied, 100 * tied / len(stamps), cutoff, 100 * share,
                int(holdout.sum()))
    return holdout


def latest_rows(stamps: pd.Series, holdout: np.ndarray, max_rows: int) -> np.ndarray:
    """`holdout` itself, or its latest rows when it holds more than `max_rows`: the rows after
    the moment that leaves at most `max_rows` (ties kept together, so there may be fewer;
    if the latest moment alone holds more, the holdout stays as it is)."""
    count = int(holdout.sum())
    if count <= max_rows:
        return holdout
    values = _instants(stamps)
    boundary = np.partition(values, len(values) - max_rows - 1)[len(values) - max_rows - 1]
    latest = values > boundary
    return latest if latest.any() else holdout


def holdout_parts(share: float, starts: pd.Timestamp | None = None) -> tuple[str, str]:
    """How the report and errors name the early rows and the holdout, e.g. "earliest 80% of
    rows" and "latest 20% of rows"."""
    if starts is not None:
        return f"rows before {starts}", f"rows from {starts}"
    return f"earliest {100 - round(100 * share)}% of rows", f"latest {round(100 * share)}% of rows"


def plan_sampling(
    stamps: pd.Series,
    y: np.ndarray,
    limits: TrainingLimits,
    *,
    starts: pd.Timestamp | None = None,
    source: str = "train_df",
    target: str = "install",
) -> tuple[SamplingPlan, np.ndarray]:
    """The plan and the holdout mask, from every row's timestamp and label.

    `r` is the smallest share that still leaves the early fit `fit_max_negatives` early
    negatives and the refit `refit_max_negatives` of the window's, so both draw their rows
    from the kept ones exactly as they would from all of them."""
    holdout = time_holdout_split(stamps, limits.holdout_share, starts=starts, source=source)
    parts = holdout_parts(limits.holdout_share, starts)
    latest = latest_rows(stamps, holdout, limits.holdout_max_rows)
    if latest is not holdout:
        first = stamps[latest].min()
        log.info("%s: the holdout (%s) has %d rows; it is its latest %d, from %s (holdout_max_rows "
                 "%d)", source, parts[1], int(holdout.sum()), int(latest.sum()), first,
                 limits.holdout_max_rows)
        holdout = latest
        parts = (f"rows before {first}", f"latest {int(latest.sum())} rows, from {first}")
    _check_trainable(y, holdout, source, target, parts, limits.min_class_rows)
    negatives = max(1, int((y == 0).sum()))
    early_negatives = max(1, int((y[~holdout] == 0).sum()))
    share = min(1.0, max(limits.fit_max_negatives / early_negatives,
                         limits.refit_max_negatives / negatives))
    plan = SamplingPlan(
        rows=len(y),
        positives=int(y.sum()),
        holdout_rows=int(holdout.sum()),
        holdout_positives=int(y[holdout].sum()),
        holdout_starts=stamps[holdout].min(),
        negative_share=share,
        parts=parts,
    )
    return plan, holdout


def _check_trainable(
    y: np.ndarray, holdout: np.ndarray, source: str, target: str, parts: tuple[str, str],
    min_class_rows: int,
) -> None:
    for label, rows in zip((parts[0], f"{parts[1]} (holdout)"), (~holdout, holdout), strict=True):
        positives = int(y[rows].sum())
        if positives < min_class_rows or positives > rows.sum() - min_class_rows:
            raise RtbError(
                f"{source}: column {target!r} has {positives} positives in the {label} "
                f"({int(rows.sum())} rows); need at least {min_class_rows} of each class in "
                "both parts to train and calibrate"
            )


def _draws(seed: int) -> np.random.Generator:
    """The generator of the rows' uniform draws, one per row in input order, on a stream of
    its own: the fits' subsampling, seeded with `seed` too, must not correlate with it."""
    return np.random.default_rng([seed, 0x5EED])


def _kept(y: np.ndarray, holdout: np.ndarray, draws: np.ndarray, share: float) -> np.ndarray:
    return holdout | (y == 1) | (draws < share)


def rows_from_frame(
    frame: pd.DataFrame, cfg: DatasetConfig, limits: TrainingLimits, *, seed: int,
    starts: pd.Timestamp | None = None, source: str = "train_df",
) -> TrainingRows:
    """A processed frame held in memory, sampled as `read_training_rows` samples a file."""
    stamps = _utc(frame[cfg.timestamp]).reset_index(drop=True)
    y = frame[cfg.target].to_numpy().astype(np.int8)
    plan, holdout = plan_sampling(stamps, y, limits, starts=starts, source=source,
                                  target=cfg.target)
    draws = _draws(seed).random(len(y))
    kept = _kept(y, holdout, draws, plan.negative_share)
    early_levels = {name: seen_levels(frame[name][~holdout]) for name in cfg.categorical}
    chosen = frame if kept.all() else frame[kept]
    return _in_time_order(chosen.reset_index(drop=True), holdout[kept], draws[kept], plan,
                          early_levels, cfg)


def read_training_rows(
    sources: Sequence[Path], cfg: DatasetConfig, limits: TrainingLimits, *, seed: int,
    starts: pd.Timestamp | None = None,
) -> TrainingRows:
    """Processed hand-overs (one file, or a window's days in order) -> the rows training
    keeps, read batch by batch: at most one batch of the dropped rows is ever held."""
    if not sources:
        raise RtbError("no processed hand-over to read")
    needed = needed_columns(cfg, require_target=True, with_id=False)
    schemas = [open_batches(path, "preprocess").schema for path in sources]
    for path, schema in zip(sources, schemas, strict=True):
        check_columns(path, schema.names, needed, cfg)
    _check_layouts(sources, schemas, needed)
    source = str(sources[0]) if len(sources) == 1 else str(sources[0].parent)

    # Pass 1: the timestamps and labels of every row, only those two columns read.
    moments, labels = [], []
    for path in sources:
        for batch in _column_batches(path, [cfg.timestamp, cfg.target]):
            # Copies: a view would keep the whole batch's body alive (see `_column_batches`).
            moments.append(batch.column(0).to_numpy(zero_copy_only=False).copy())
            labels.append(batch.column(1).to_numpy(zero_copy_only=False).astype(np.int8))
    if not sum(len(part) for part in labels):
        raise RtbError(f"{source}: no rows to train on")
    stamps = _utc(pd.Series(np.concatenate(moments)))
    y = np.concatenate(labels)
    del moments, labels
    plan, holdout = plan_sampling(stamps, y, limits, starts=starts, source=source,
                                  target=cfg.target)
    del stamps

    # Pass 2: every column, the dropped rows let go batch by batch.
    generator = _draws(seed)
    unifier = DictionaryUnifier()
    kept_batches: list[pa.RecordBatch] = []
    kept_holdout, kept_draws = [], []
    early_seen = {name: _SeenLevels() for name in cfg.categorical}
    offset = 0
    for path in sources:
        for batch in _column_batches(path, needed):
            batch = unifier.unify(batch)
            end = offset + batch.num_rows
            draws = generator.random(batch.num_rows)
            kept = _kept(y[offset:end], holdout[offset:end], draws, plan.negative_share)
            for name, seen in early_seen.items():
                seen.add(batch.column(name), ~holdout[offset:end])
            kept_batches.append(batch.filter(pa.array(kept)))  # a copy, even of a whole batch
            kept_holdout.append(holdout[offset:end][kept])
            kept_draws.append(draws[kept])
            offset = end
    del y, holdout
    frame = table_to_frame(pa.Table.from_batches(kept_batches).unify_dictionaries(), cfg)
    del kept_batches
    early_levels = {name: seen.levels(frame[name].dtype) for name, seen in early_seen.items()}
    return _in_time_order(frame, np.concatenate(kept_holdout), np.concatenate(kept_draws), plan,
                          early_levels, cfg)


def _column_batches(path: Path, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """The file's batches, decoded for `columns` only.

    The reader still reads each batch's whole body into one buffer, and every column it
    hands out is a slice of it: whatever is kept of a batch must be copied out, or the
    bodies of all batches (the whole file) stay in memory."""
    schema = open_batches(path, "preprocess").schema
    options = pa.ipc.IpcReadOptions(included_fields=sorted(schema.get_field_index(c) for c in columns))
    reader = pa.ipc.open_file(pa.OSFile(str(path)), options=options)
    for i in range(reader.num_record_batches):
        yield reader.get_batch(i).select(columns)


def _check_layouts(sources: Sequence[Path], schemas: list[pa.Schema], needed: list[str]) -> None:
    first = schemas[0]
    for path, schema in zip(sources[1:], schemas[1:], strict=True):
        for name in needed:
            if schema.field(name).type != first.field(name).type:
                raise RtbError(f"{path}: column {name!r} is {schema.field(name).type}, "
                               f"{first.field(name).type} in {sources[0]}: hand-overs of different "
                               "layouts; run `rtb preprocess` again for each")


class _SeenLevels:
    """The levels a dictionary column had in some rows: one flag per position of the unified
    dictionary (which only ever grows by appending), and whether a gap occurred."""

    def __init__(self) -> None:
        self.positions = np.zeros(0, dtype=bool)
        self.gaps = False

    def add(self, column: pa.DictionaryArray, rows: np.ndarray) -> None:
        codes = pc.fill_null(column.indices, -1).to_numpy(zero_copy_only=False)[rows]
        present = np.bincount(codes[codes >= 0], minlength=len(column.dictionary)) > 0
        if len(self.positions) < len(present):
            self.positions = np.concatenate(
                [self.positions, np.zeros(len(present) - len(self.positions), dtype=bool)])
        self.positions[: len(present)] |= present
        self.gaps |= bool((codes < 0).any())

    def levels(self, dtype: pd.CategoricalDtype) -> pd.Index:
        """As `seen_levels` names them (text, gaps as `__missing__`)."""
        codes = np.flatnonzero(self.positions)
        if self.gaps:
            codes = np.append(codes, -1)
        return seen_levels(pd.Series(pd.Categorical.from_codes(codes, dtype=dtype)))


def _instants(stamps: pd.Series) -> np.ndarray:
    """The timestamps as int64 ticks: a zone-aware Series' `to_numpy()` is an object array of
    Timestamps, which costs 40x the memory and time to sort."""
    return stamps.array.asi8 if isinstance(stamps.dtype, pd.DatetimeTZDtype) else (
        stamps.to_numpy().astype("datetime64[ns]").view(np.int64))


def _utc(stamps: pd.Series) -> pd.Series:
    return stamps.dt.tz_localize("UTC") if stamps.dt.tz is None else stamps


def _in_time_order(
    frame: pd.DataFrame, holdout: np.ndarray, draws: np.ndarray, plan: SamplingPlan,
    early_levels: dict[str, pd.Index], cfg: DatasetConfig,
) -> TrainingRows:
    """Rows sorted by timestamp (stable): target encodings of a row may only use earlier
    rows. A frame already in order is kept as it is, saving a copy."""
    stamps = frame[cfg.timestamp]
    if not stamps.is_monotonic_increasing:
        order = np.argsort(_instants(stamps), kind="stable")
        frame = frame.take(order).reset_index(drop=True)
        holdout, draws = holdout[order], draws[order]
    log.info("kept %d of %s", len(frame), plan.describe())
    return TrainingRows(frame, holdout, draws, plan, early_levels)
