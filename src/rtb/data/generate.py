"""Synthetic real-time-bidding ad-request logs with a known install probability.

The real logs cannot ship with the repository, yet `run.sh`, every test and the benchmarks need
data shaped like them: the same columns and text formats, Zipf-like categorical popularity,
heavy-tailed user-history counts, missing values, a later test window with campaigns that never
appear in training, and mild drift. Because the install probability is *planted* (a logistic
function of the observed columns), tests can compare a model's log loss with the best
achievable one instead of guessing what "good" means.

The schema (file names, separator, column names and roles) is the RTB dataset config's
(`configs/rtb.yaml`), so the generator cannot drift from what the pipeline reads; only the
column order of the files is the generator's own, checked against the config at import.

Everything is vectorised with numpy, since per-row Python would take minutes at the sizes the
benchmarks use. Rows are simulated and encoded in independent chunks on a small thread pool
(numpy, Arrow kernels and zlib release the GIL). Fixed-width text (ids, timestamps) is
assembled as byte matrices, categorical text is an Arrow `take` from a vocabulary, and Arrow's
CSV writer turns the columns into rows (bench/README.md has the measurement behind that
choice). Each chunk becomes one gzip member; concatenated members are a valid gzip file that
`gzip`, pandas and pyarrow all read as one stream.

`generate_stream` (`rtb generate --stream`) writes the same world as the partitioned log the
product reads when it runs over time (layout: `rtb.partitions`):

- one request partition `requests/date=D/hour=HH/` for each UTC hour of the `days` days
  before `end` (exclusive; default the start of the current UTC hour, so the running hour has
  none), holding the hour's requests without `install`;
- one labelled partition `labelled/date=D/` for each day whose 24 hours are all in the stream
  (a partial first or last day has request partitions only), holding exactly that day's
  request rows, in the same order, plus `install` drawn from the planted probability the way
  the training file's labels are;
- each partition holds one `part-00000.csv.gz` (same header and format as the two files) and
  the `_SUCCESS` marker, nothing else; the data file is renamed into place complete, and the
  marker is created after it.

Rows: `days * rows_per_day` in all, split over the hours by the generator's daily cycle and
its busier weekends; row ids are unique over the whole stream. Stream days are mapped onto
the world's days (the last 21 days onto its 14 train then 7 test days; a longer stream spreads
evenly over the 21), so campaign effects follow the world's daily random walk, and in the test
days the world's new campaigns appear, each from its launch day on (about 7% of traffic by the
last day). Deterministic for a seed, `end`, `days` and `rows_per_day`: each hour draws from its
own random stream.

The one planted shift: on `shift_day` (default the third-last complete day) a campaign that
is otherwise never served (the world's least popular new campaign) takes SHIFT_SHARE = 25% of
that day's requests, in every hour, scaling all other campaigns down to 75%; its rows follow
the same planted model (its own campaign effect). Against the earlier days a population
stability index on campaignId (top 20 values plus "other", 1e-4 floor) is about 2 (14 days x
20k rows), where regular days stay below 0.1 (the largest, ~0.06, is the world's first test
day, when a tenth of the old campaigns end).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from rtb import partitions
from rtb.dataset_config import DatasetConfig, load_dataset_config
from rtb.errors import RtbError
from rtb.io_utils import atomic_path
from rtb.models.transforms import sigmoid

log = logging.getLogger(__name__)

SCHEMA: DatasetConfig = load_dataset_config("rtb")
TRAIN_FILE = SCHEMA.files["train"]
TEST_FILE = SCHEMA.files["test"]
SEPARATOR = SCHEMA.separator
TARGET = SCHEMA.target
COUNT_COLUMNS = list(SCHEMA.numerical)  # all RTB numerical columns are integer counts
# Column order of the written files: the order of the real logs, which groups the columns
# differently from the config's roles (the config has no order of its own). The names are
# checked against the config below, so a renamed or added column fails at import.
COLUMNS = [
    "id",
    "timestamp",
    "campaignId",
    "platform",
    "softwareVersion",
    "sourceGameId",
    "country",
    "startCount",
    "viewCount",
    "clickCount",
    "installCount",
    "lastStart",
    "startCount1d",
    "startCount7d",
    "connectionType",
    "deviceType",
    "install",
]
TEST_COLUMNS = [c for c in COLUMNS if c != TARGET]


def _check_file_order(cfg: DatasetConfig, columns: list[str], test_columns: list[str]) -> None:
    """The file order must be a permutation of the config's columns, id first, target last."""
    for split, order in (("train", columns), ("test", test_columns)):
        expected = cfg.raw_columns(split)
        if sorted(order) != sorted(expected):
            raise RtbError(
                f"rtb.data.generate: {split} file columns {order} are not the columns "
                f"{expected} of dataset config {cfg.source!r}"
            )
    if columns[0] != cfg.id or columns[-1] != cfg.target:
        raise RtbError("rtb.data.generate: the files must start with the id and end with the target")


_check_file_order(SCHEMA, COLUMNS, TEST_COLUMNS)

BASE_RATE = 0.012
TRAIN_START = np.datetime64("2019-01-01T00:00:00", "ms")
TRAIN_DAYS = 14
TEST_DAYS = 7
CHUNK_ROWS = 250_000
GZIP_LEVEL = 1
CALIBRATION_ROWS = 200_000
MAX_COUNT = 9_999_999  # a cap no realistic history reaches; keeps counts in int32

_WORKERS = 2
_MAX_PENDING = 3  # chunks submitted but not yet written: bounds memory at full size
_MS_PER_HOUR = 3_600_000
_MS_PER_DAY = 24 * _MS_PER_HOUR
_TRAIN_START_MS = int((TRAIN_START - np.datetime64(0, "ms")) // np.timedelta64(1, "ms"))
# Two hex digits per byte value, as one uint16 whose memory order is the text order.
_HEX_PAIRS = np.frombuffer(b"".join(f"{i:02x}".encode() for i in range(256)), np.uint16).copy()
# Seed-sequence stream ids: each purpose draws from its own stream of the user's seed.
_STREAM_WORLD, _STREAM_CALIBRATION, _STREAM_TIMES, _STREAM_CHUNKS = 0, 1, 2, 3

# Rough popularity order of mobile-game ad traffic; the Zipf draw follows this order.
_COUNTRIES = (
    "US GB DE FR JP CA AU BR RU IN IT ES MX KR CN TR ID PH TH VN MY SA NL PL UA AR CO TW HK SE "
    "CH BE AT NO DK FI IE NZ SG AE IL PT CZ RO HU GR CL PE EG ZA NG PK BD KZ BY IQ MA DZ KW QA "
    "OM BH JO LB TN LK NP MM KH LA VE EC BO PY UY CR PA GT HN SV NI DO PR JM TT CU HR RS SI SK "
    "BG LT LV EE IS LU MT CY MD GE AM AZ UZ KG TJ TM MN AF IR YE SY LY SD ET KE TZ UG RW GH CI "
    "SN CM AO MZ ZM ZW BW NA MG MU RE GP MQ GF NC PF BA MK AL ME XK BN MO MV BT FJ PG WS TO VU "
    "SB KI BS BB BZ GY SR HT AW CW AG DM GD KN LC VC KY BM VG TC AD MC SM LI GI FO GL GU MP AS "
    "PW FM MH BF ML NE TD MR GM GN GW SL LR TG BJ CV ST GQ GA CG CD CF BI DJ ER SO SS KM SC LS "
    "SZ MW"
).split()
# Countries where iOS holds a large share of devices; elsewhere Android dominates.
_HIGH_IOS = set("US GB JP CA AU CH NO DK SE NL HK TW SG NZ AT BE IE FR DE FI IS LU AE".split())
_LOW_IOS = set("IN ID BR PH VN PK BD NG EG TR MX CO AR PE UA KZ IQ DZ MA VE EC".split())

_IOS_VERSIONS = (
    "12.1 12.1.2 11.4.1 12.0.1 12.0 12.1.1 11.4 10.3.3 11.3 11.2.6 11.2.1 11.2.2 11.1.2 9.3.5 "
    "11.2.5 11.0.3 10.3.2 11.3.1 11.1 11.2 10.3.1 11.0 9.3.6 10.2.1 12.1.3 11.0.1 11.1.1 10.2 "
    "9.3.2 10.1.1 10.0.2 9.3.1 9.2.1 9.1 9.0 8.4.1 12.2 8.4 8.3 8.1.2"
).split()
_ANDROID_VERSIONS = (
    "8.1.0 8.0.0 7.0 9 7.1.1 6.0.1 7.1.2 6.0 5.1.1 9.0 5.1 4.4.4 4.4.2 5.0.2 8.0 7.1 4.2.2 "
    "5.0 4.1.2 4.3 5.0.1 8.1 6.0.0 4.4.3 4.2.1 7.1.0 4.0.4 4.1.1 5.1.0 4.4.0 4.0.3 2.3.6 4.2 "
    "7.0.0 4.4 6.1 8.2 7.2 9.1 4.3.1 4.1 5.2"
).split()

# Vocabulary sizes, chosen so that a sample as large as the real logs shows about as many
# distinct campaigns, source games and device models as they do; smaller samples simply see
# fewer of them.
_N_CAMPAIGNS_OLD = 9_400
_N_CAMPAIGNS_NEW = 700
_N_GAMES_OLD = 40_000
_N_GAMES_NEW = 1_500
_N_DEVICES_OLD = 33_000
_N_DEVICES_NEW = 900

# Shares of test rows that go to categories launched after the training window.
_NEW_CAMPAIGN_SHARE = 0.07
_NEW_GAME_SHARE = 0.03
_NEW_DEVICE_SHARE = 0.01
_ENDED_CAMPAIGN_SHARE = 0.10

_COUNTRY_NAN = 0.005
_DEVICE_NAN = 0.003
_NEW_USER_SHARE = 0.01
_IOS_SHARE = 0.45
_CONNECTION_NAMES = ["wifi", "cellular", "unknown"]
_CONNECTION_P = np.array([0.64, 0.355, 0.005])


class _Categorical:
    """Inverse-CDF sampler over a fixed vocabulary, with a guide table for speed.

    `np.searchsorted` over millions of random keys pays a cache-missing binary search per
    row; the guide table answers most draws with two lookups and binary-searches only the few
    uniforms that fall in a bucket holding a category boundary. The result is exactly the
    inverse CDF.
    """

    def __init__(self, weights: np.ndarray) -> None:
        weights = np.asarray(weights, dtype=np.float64)
        cdf = np.cumsum(weights)
        self.cdf = cdf / cdf[-1]
        self.prev = np.concatenate([[0.0], self.cdf[:-1]])
        self.mass = self.cdf - self.prev
        self.size = int(min(1 << 20, max(1 << 10, 1 << int(np.ceil(np.log2(16 * len(cdf)))))))
        guide = np.searchsorted(self.cdf, np.arange(self.size + 1) / self.size, side="right")
        self.guide = np.minimum(guide, len(cdf) - 1).astype(np.int32)

    def __len__(self) -> int:
        return len(self.cdf)

    def __call__(self, u: np.ndarray) -> np.ndarray:
        """Category index of each uniform in [0, 1)."""
        bucket = (u * self.size).astype(np.int32)
        idx = self.guide[bucket]
        unsure = np.flatnonzero(idx != self.guide[bucket + 1])
        if unsure.size:
            idx[unsure] = np.searchsorted(self.cdf, u[unsure], side="right")
        return np.minimum(idx, len(self.cdf) - 1)

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self(rng.random(n))


@dataclass(frozen=True)
class _World:
    """Everything shared by train and test: vocabularies, popularity and planted effects.

    Drawn from its own random stream, so vocabulary and effects are the same whatever the row
    counts are; only the rows change with the requested size. Vocabularies are stored as
    Arrow string arrays, ready to be gathered into a chunk's text with `take`.
    """

    campaign_ids: pa.StringArray
    campaign_eff: np.ndarray  # (n_campaigns, TRAIN_DAYS + TEST_DAYS): base + daily random walk
    campaign_train: _Categorical
    campaign_test: _Categorical
    game_ids: pa.StringArray
    game_eff: np.ndarray
    game_by_platform: tuple[np.ndarray, np.ndarray]  # global game indices, android then ios
    game_train: tuple[_Categorical, _Categorical]
    game_test: tuple[_Categorical, _Categorical]
    countries: pa.StringArray  # one trailing null: a missing country
    country_eff: np.ndarray  # one trailing 0.0 for a missing country
    country: _Categorical
    country_ios: np.ndarray
    devices: pa.StringArray  # one trailing null: a missing device
    device_eff: np.ndarray
    device_by_platform: tuple[np.ndarray, np.ndarray]
    device_train: tuple[_Categorical, _Categorical]
    device_test: tuple[_Categorical, _Categorical]
    versions: pa.StringArray
    version_offset: tuple[int, int]
    version: tuple[_Categorical, _Categorical]
    campaign_country: np.ndarray  # (n_campaigns, n_countries + 1) interaction
    campaign_platform: np.ndarray  # (n_campaigns, 2) interaction
    pair_salt: np.uint64
    id_machines: np.ndarray  # (8, 4) bytes: the "collector machines" stamped into row ids
    id_counter0: int

    @property
    def n_countries(self) -> int:
        return len(self.countries) - 1

    @property
    def n_devices(self) -> int:
        return len(self.devices) - 1


@dataclass
class _Rows:
    """One chunk's rows as codes and numbers; text is only built from these when encoding."""

    ts_ms: np.ndarray
    campaign: np.ndarray
    platform: np.ndarray  # 1 = ios, 0 = android
    version: np.ndarray
    game: np.ndarray
    country: np.ndarray  # world.n_countries means missing
    start: np.ndarray
    view: np.ndarray
    click: np.ndarray
    installs: np.ndarray
    last_ms: np.ndarray
    has_last: np.ndarray
    start1d: np.ndarray
    start7d: np.ndarray
    connection: np.ndarray
    device: np.ndarray  # world.n_devices means missing
    logit: np.ndarray  # planted logit without the intercept


@dataclass(frozen=True)
class _Plan:
    """What every chunk job needs: the world, the calibrated intercept and the sizes."""

    world: _World
    intercept: float
    seed: int
    rows_train: int
    rows_test: int


@dataclass(frozen=True)
class _Chunk:
    """One encoded chunk: a gzip member (or, uncompressed, the CSV text without header)."""

    data: bytes | pa.Buffer
    p_true: np.ndarray
    install: np.ndarray | None


def generate_raw(
    out_dir: Path, *, rows_train: int = 200_000, rows_test: int = 50_000, seed: int = 7
) -> tuple[Path, Path]:
    """Writes out_dir/training_data.csv.gz and out_dir/test_data.csv.gz, returns both paths.

    Both files are written to temporary names and renamed only once both are complete, so an
    interrupted run leaves neither behind; existing files are never overwritten.
    """
    started = time.perf_counter()
    _check_rows(rows_train, rows_test)
    out_dir = Path(out_dir)
    train_path, test_path = out_dir / TRAIN_FILE, out_dir / TEST_FILE
    for path in (train_path, test_path):
        if path.exists():
            raise RtbError(f"{path}: already exists; versioned artifacts are never overwritten")
    _writable_folder(out_dir)

    plan = _make_plan(rows_train, rows_test, seed)
    installs = np.empty(rows_train, dtype=np.int8)
    p_sum = {False: 0.0, True: 0.0}
    with (
        atomic_path(train_path, overwrite=False) as train_tmp,
        atomic_path(test_path, overwrite=False) as test_tmp,
        open(train_tmp, "wb") as train_out,
        open(test_tmp, "wb") as test_out,
        contextlib.closing(_run_chunks(plan, compress=True)) as chunks,
    ):
        for test, lo, hi, chunk in chunks:
            (test_out if test else train_out).write(chunk.data)
            p_sum[test] += float(chunk.p_true.sum())
            if chunk.install is not None:
                installs[lo:hi] = chunk.install
    log.info(
        "wrote %d train rows (install rate %.4f, mean true p %.4f) to %s and %d test rows "
        "(mean true p %.4f) to %s in %.1f s",
        rows_train,
        float(installs.mean()),
        p_sum[False] / rows_train,
        train_path,
        rows_test,
        p_sum[True] / rows_test,
        test_path,
        time.perf_counter() - started,
    )
    return train_path, test_path


def _writable_folder(folder: Path) -> None:
    """Create the output folder; a one-line error when it cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RtbError(f"{folder}: cannot create output folder ({exc.strerror})") from exc
    if not os.access(folder, os.W_OK | os.X_OK):
        raise RtbError(f"{folder}: output folder is not writable")


def generate_frames(
    rows_train: int = 200_000, rows_test: int = 50_000, seed: int = 7
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray]:
    """Return (train df, test df without `install`, p_true_train, p_true_test).

    The frames are parsed back from exactly the CSV text `generate_raw` writes for the same
    arguments (empty fields become missing; every other value stays text, so Namibia's `NA`
    stays a country), and the true probabilities let tests and benchmarks compute the best
    achievable log loss. Same seed and sizes, same frames.
    """
    _check_rows(rows_train, rows_test)
    plan = _make_plan(rows_train, rows_test, seed)
    tables: dict[bool, list[pa.Table]] = {False: [], True: []}
    frames: dict[bool, pd.DataFrame] = {}
    p_true = {False: np.empty(rows_train), True: np.empty(rows_test)}
    with contextlib.closing(_run_chunks(plan, compress=False)) as chunks:
        for test, lo, hi, chunk in chunks:
            if test and False not in frames:  # train is complete: convert it, free its tables
                frames[False] = _to_pandas(tables.pop(False))
            columns = TEST_COLUMNS if test else COLUMNS
            tables[test].append(_parse_csv(chunk.data, columns))
            p_true[test][lo:hi] = chunk.p_true
    train_df = frames[False] if False in frames else _to_pandas(tables.pop(False))
    return train_df, _to_pandas(tables.pop(True)), p_true[False], p_true[True]


def _to_pandas(tables: list[pa.Table]) -> pd.DataFrame:
    """Concatenate chunk tables into a frame, releasing Arrow memory as columns convert.

    At benchmark size the frames are gigabytes; converting with `self_destruct` keeps the
    peak near one copy instead of two.
    """
    table = pa.concat_tables(tables)
    tables.clear()
    return table.to_pandas(split_blocks=True, self_destruct=True)


def _check_rows(rows_train: int, rows_test: int) -> None:
    for name, value in (("rows_train", rows_train), ("rows_test", rows_test)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise RtbError(f"{name}: expected a positive integer number of rows, got {value!r}")
    if rows_train + rows_test >= 2**32:
        raise RtbError("rows_train + rows_test: row ids support fewer than 2**32 rows in all")


def _rng(seed: int, *stream: int) -> np.random.Generator:
    """An independent generator per purpose (and per chunk), reproducible from the seed alone."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=stream))


def _make_plan(rows_train: int, rows_test: int, seed: int) -> _Plan:
    """Build the world and calibrate the intercept on a fixed-size reference sample.

    Calibrating on a reference sample of the training distribution, rather than on the rows
    themselves, keeps the intercept (and hence every probability) the same whatever sizes
    are requested.
    """
    world = _build_world(_rng(seed, _STREAM_WORLD))
    rng = _rng(seed, _STREAM_CALIBRATION)
    ref = _simulate_rows(world, rng, _draw_times(rng, CALIBRATION_ROWS, test=False), test=False)
    intercept = _calibrate_intercept(ref.logit, BASE_RATE)
    return _Plan(world, intercept, int(seed), rows_train, rows_test)


def _run_chunks(plan: _Plan, *, compress: bool) -> Iterator[tuple[bool, int, int, _Chunk]]:
    """Encode train then test chunk by chunk on a thread pool; yield results in file order.

    At most `_MAX_PENDING` chunks are in flight, which bounds memory however many rows there
    are. A split's request times are drawn (and sorted) up front, since chunks are consecutive
    slices of one time-ordered log.
    """
    with ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="rtb-generate") as pool:
        pending: deque[tuple[bool, int, int, Future[_Chunk]]] = deque()
        try:
            for test, n_rows in ((False, plan.rows_train), (True, plan.rows_test)):
                ts_ms = _draw_times(_rng(plan.seed, _STREAM_TIMES, int(test)), n_rows, test=test)
                for index, lo in enumerate(range(0, n_rows, CHUNK_ROWS)):
                    hi = min(lo + CHUNK_ROWS, n_rows)
                    job = pool.submit(_encode_chunk, plan, test, index, lo, ts_ms[lo:hi], compress)
                    pending.append((test, lo, hi, job))
                    if len(pending) >= _MAX_PENDING:
                        done_test, done_lo, done_hi, done = pending.popleft()
                        yield done_test, done_lo, done_hi, done.result()
            while pending:
                done_test, done_lo, done_hi, done = pending.popleft()
                yield done_test, done_lo, done_hi, done.result()
        finally:
            for *_, job in pending:
                job.cancel()


def _encode_chunk(
    plan: _Plan, test: bool, index: int, lo: int, ts_ms: np.ndarray, compress: bool
) -> _Chunk:
    """Simulate one chunk, draw its labels and render its CSV text (runs on a worker)."""
    rng = _rng(plan.seed, _STREAM_CHUNKS, int(test), index)
    rows = _simulate_rows(plan.world, rng, ts_ms, test=test)
    p_true = sigmoid(rows.logit + plan.intercept)
    install = None if test else (rng.random(len(p_true)) < p_true).astype(np.int8)
    first_row = lo + (plan.rows_train if test else 0)
    text = _render_csv(plan.world, rows, first_row, install)
    if not compress:
        return _Chunk(text, p_true, install)
    header = SEPARATOR.join(TEST_COLUMNS if test else COLUMNS) + "\n" if lo == 0 else ""
    gzip_member = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    data = gzip_member.compress(header.encode()) + gzip_member.compress(text)
    return _Chunk(data + gzip_member.flush(), p_true, install)


# ---------------------------------------------------------------------------------------------
# The world: vocabularies, popularity, effects


def _zipf_weights(n: int, exponent: float, offset: float) -> np.ndarray:
    weights = 1.0 / (np.arange(1, n + 1, dtype=np.float64) + offset) ** exponent
    return weights / weights.sum()


def _vocab(values: list[str], *, with_missing: bool = False) -> pa.StringArray:
    """A vocabulary as an Arrow array, optionally with a last entry (null) for "no value"."""
    entries: list[str | None] = list(values)
    if with_missing:
        entries.append(None)
    return pa.array(entries, pa.string())


_PLATFORMS = pa.array(["android", "ios"], pa.string())
_CONNECTIONS = pa.array(_CONNECTION_NAMES, pa.string())
_CONNECTION = _Categorical(_CONNECTION_P)


def _object_ids(rng: np.random.Generator, seconds: np.ndarray) -> pa.StringArray:
    """Mongo-ObjectId-like hex ids: 4 bytes of creation time, then 8 random bytes."""
    raw = np.empty((len(seconds), 12), dtype=np.uint8)
    raw[:, :4] = seconds.astype(">u4").view(np.uint8).reshape(-1, 4)
    raw[:, 4:] = rng.integers(0, 256, size=(len(seconds), 8), dtype=np.uint8)
    return _fixed_strings(_hex_matrix(raw))


def _build_world(rng: np.random.Generator) -> _World:
    n_days = TRAIN_DAYS + TEST_DAYS
    start_s = _TRAIN_START_MS // 1000
    train_end_s = start_s + TRAIN_DAYS * 86_400

    # Campaigns: old ones were created during the year before the logs, new ones launch in
    # the test window; a tenth of the old ones have ended by then. Popularity is Zipf in a
    # random order, and each campaign's effect drifts by a small daily random walk.
    n_camp = _N_CAMPAIGNS_OLD + _N_CAMPAIGNS_NEW
    created = np.concatenate(
        [
            start_s - rng.integers(86_400, 365 * 86_400, _N_CAMPAIGNS_OLD),
            train_end_s + rng.integers(-43_200, TEST_DAYS * 86_400, _N_CAMPAIGNS_NEW),
        ]
    )
    campaign_ids = _object_ids(rng, created)
    walk = np.cumsum(rng.normal(0.0, 0.04, (n_camp, n_days)), axis=1)
    campaign_eff = (rng.normal(0.0, 0.8, n_camp)[:, None] + walk).astype(np.float32)
    old_w = _zipf_weights(_N_CAMPAIGNS_OLD, 1.0, 5.0)[rng.permutation(_N_CAMPAIGNS_OLD)]
    new_w = _zipf_weights(_N_CAMPAIGNS_NEW, 1.0, 5.0)[rng.permutation(_N_CAMPAIGNS_NEW)]
    ended = rng.random(_N_CAMPAIGNS_OLD) < _ENDED_CAMPAIGN_SHARE
    test_old = np.where(ended, 0.0, old_w)
    campaign_train = _Categorical(np.concatenate([old_w, np.zeros(_N_CAMPAIGNS_NEW)]))
    campaign_test = _Categorical(
        np.concatenate(
            [
                test_old / test_old.sum() * (1 - _NEW_CAMPAIGN_SHARE),
                new_w / new_w.sum() * _NEW_CAMPAIGN_SHARE,
            ]
        )
    )

    # Countries: Zipf over the list order, each with its own iOS share, tuned by bisection so
    # that the overall iOS share is ~45% under the country mix.
    n_country = len(_COUNTRIES)
    country_w = _zipf_weights(n_country, 1.3, 1.0)
    country_eff = np.append(rng.normal(0.0, 0.4, n_country), 0.0).astype(np.float32)
    tilt = np.array([1.2 if c in _HIGH_IOS else -1.2 if c in _LOW_IOS else 0.0 for c in _COUNTRIES])
    lo, hi = -10.0, 10.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if float(country_w @ sigmoid(mid + tilt)) < _IOS_SHARE:
            lo = mid
        else:
            hi = mid
    country_ios = np.append(sigmoid(lo + tilt), _IOS_SHARE)

    # Source games: platform-specific integer ids; games launched later have larger ids.
    n_game = _N_GAMES_OLD + _N_GAMES_NEW
    old_ids = np.sort(rng.choice(np.arange(10_000, 2_900_000), _N_GAMES_OLD, replace=False))
    new_ids = rng.choice(np.arange(2_900_000, 3_100_000), _N_GAMES_NEW, replace=False)
    game_ids = _vocab(np.concatenate([old_ids, new_ids]).astype(str).tolist())
    game_eff = rng.normal(0.0, 0.5, n_game).astype(np.float32)
    game_platform = (rng.random(n_game) < _IOS_SHARE).astype(np.int8)
    is_new_game = np.arange(n_game) >= _N_GAMES_OLD
    game_by_platform, game_train, game_test = _platform_vocab(
        rng, game_platform, is_new_game, 1.05, 10.0, _NEW_GAME_SHARE, shuffle=(True, True)
    )

    # Devices: a few dozen Apple identifiers (kept in popularity order) and tens of thousands
    # of Android model names; new Android models appear in the test window.
    ios_names = _ios_models()
    android_names = _android_models(rng, _N_DEVICES_OLD + _N_DEVICES_NEW - len(ios_names))
    names = ios_names + android_names
    device_platform = np.array([1] * len(ios_names) + [0] * len(android_names), dtype=np.int8)
    is_new_device = np.arange(len(names)) >= _N_DEVICES_OLD
    device_by_platform, device_train, device_test = _platform_vocab(
        rng, device_platform, is_new_device, 1.1, 3.0, _NEW_DEVICE_SHARE, shuffle=(True, False)
    )
    device_eff = np.append(rng.normal(0.0, 0.3, len(names)), 0.0).astype(np.float32)

    campaign_country = rng.normal(0.0, 0.35, (n_camp, n_country + 1)).astype(np.float32)
    campaign_country[:, -1] = 0.0
    campaign_platform = rng.normal(0.0, 0.3, (n_camp, 2)).astype(np.float32)
    return _World(
        campaign_ids=campaign_ids,
        campaign_eff=campaign_eff,
        campaign_train=campaign_train,
        campaign_test=campaign_test,
        game_ids=game_ids,
        game_eff=game_eff,
        game_by_platform=game_by_platform,
        game_train=game_train,
        game_test=game_test,
        countries=_vocab(_COUNTRIES, with_missing=True),
        country_eff=country_eff,
        country=_Categorical(country_w),
        country_ios=country_ios,
        devices=_vocab(names, with_missing=True),
        device_eff=device_eff,
        device_by_platform=device_by_platform,
        device_train=device_train,
        device_test=device_test,
        versions=_vocab(_ANDROID_VERSIONS + _IOS_VERSIONS),
        version_offset=(0, len(_ANDROID_VERSIONS)),
        version=(
            _Categorical(_zipf_weights(len(_ANDROID_VERSIONS), 1.2, 1.0)),
            _Categorical(_zipf_weights(len(_IOS_VERSIONS), 1.2, 0.5)),
        ),
        campaign_country=campaign_country,
        campaign_platform=campaign_platform,
        pair_salt=np.uint64(rng.integers(0, 2**63)),
        id_machines=rng.integers(0, 256, (8, 4), dtype=np.uint8),
        id_counter0=int(rng.integers(0, 2**32)),
    )


def _platform_vocab(
    rng: np.random.Generator,
    platform: np.ndarray,
    is_new: np.ndarray,
    exponent: float,
    offset: float,
    new_share: float,
    *,
    shuffle: tuple[bool, bool],
) -> tuple[
    tuple[np.ndarray, np.ndarray],
    tuple[_Categorical, _Categorical],
    tuple[_Categorical, _Categorical],
]:
    """Per-platform members and samplers; new entries only get mass in the test window.

    `shuffle[platform]` False keeps the vocabulary's own order as the popularity order.
    """
    members, train, test = [], [], []
    for value in (0, 1):
        idx = np.flatnonzero(platform == value)
        new = is_new[idx]
        n_old = int((~new).sum())
        old_w = _zipf_weights(n_old, exponent, offset)
        weights = np.zeros(len(idx))
        weights[~new] = old_w[rng.permutation(n_old)] if shuffle[value] else old_w
        test_weights = weights.copy()
        if new.any():
            new_w = _zipf_weights(int(new.sum()), exponent, offset)
            test_weights[new] = new_w / new_w.sum() * new_share / (1 - new_share)
        members.append(idx.astype(np.int32))
        train.append(_Categorical(weights))
        test.append(_Categorical(test_weights))
    return (members[0], members[1]), (train[0], train[1]), (test[0], test[1])


def _ios_models() -> list[str]:
    """Apple hardware identifiers in rough popularity order for January 2019 (no shuffle)."""
    generations = {  # (generation, number of sub-models), most popular generation first
        "iPhone": [(9, 4), (10, 6), (8, 4), (11, 8), (7, 2), (6, 2), (5, 4), (4, 1)],
        "iPad": [(6, 12), (7, 6), (5, 4), (4, 9), (8, 8), (3, 6), (2, 7)],
        "iPod": [(7, 1), (5, 1)],
    }
    return [
        f"{family}{gen},{sub}"
        for family, gens in generations.items()
        for gen, count in gens
        for sub in range(1, count + 1)
    ]


def _android_models(rng: np.random.Generator, n: int) -> list[str]:
    """Brand-style model names (`SM-G950F`, `LG-H870`, `VNS-L31`, ...) until `n` are unique.

    Built per vocabulary entry, not per row, so a Python loop over ~35k names is fine.
    """
    upper = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    seen: dict[str, None] = {}
    while len(seen) < n:
        k = 20_000
        brand = rng.choice(10, k, p=[0.34, 0.12, 0.08, 0.08, 0.07, 0.07, 0.06, 0.06, 0.06, 0.06])
        num = rng.integers(0, 10_000, k)
        letters = upper[rng.integers(0, 26, (k, 3))]
        suffix = rng.choice(["F", "FN", "H", "M", "DS", "U", "W", "0", "V", "T", "", ""], k)
        for b, x, (l1, l2, l3), s in zip(brand, num, letters, suffix, strict=True):
            if b == 0:
                name = f"SM-{'GJANTPM'[x % 7]}{x % 1000:03d}{s}"
            elif b == 1:
                name = f"{l1}{l2}{l3}-{('L', 'LX', 'AL', 'TL', 'UL')[x % 5]}{x % 100:02d}"
            elif b == 2:
                name = f"LG-{'HKMXD'[x % 5]}{x % 1000:03d}{s if s in ('', 'T', 'V') else ''}"
            elif b == 3:
                variant = ("", "A", "X", " Pro")[x // 9 % 4]
                name = f"Redmi {('Note ', '', 'S', 'Y')[x % 4]}{x % 9 + 1}{variant}"
            elif b == 4:
                name = f"moto {'gezcx'[x % 5]}({x % 9 + 1})" if x % 2 else f"XT{1000 + x % 1000}"
            elif b == 5:
                name = f"CPH{1600 + x % 400}"
            elif b == 6:
                name = f"vivo {1600 + x % 300}"
            elif b == 7:
                name = f"ALCATEL ONE TOUCH {4000 + x % 6000}{l1}"
            elif b == 8:
                name = f"Lenovo {l1}{x % 100}{('', 'a', 'Plus', 'L')[x % 4]}"
            else:
                name = f"{('ZTE BLADE', 'TECNO', 'Infinix', 'itel')[x % 4]} {l1}{x % 1000}"
            seen[name] = None
            if len(seen) == n:
                break
    return list(seen)


# ---------------------------------------------------------------------------------------------
# Rows


def _draw_times(rng: np.random.Generator, n: int, *, test: bool) -> np.ndarray:
    """Request times of one split: a daily cycle, busier weekends, roughly time-ordered.

    Sorted uniforms come from normalised cumulative exponential gaps, so no sort is needed;
    the inverse CDF over hour buckets is monotone, so times come out sorted, and a second or
    two of jitter then mimics collectors that flush slightly out of order.
    """
    n_days = TEST_DAYS if test else TRAIN_DAYS
    first_day = TRAIN_DAYS if test else 0
    start = _TRAIN_START_MS + first_day * _MS_PER_DAY
    weekday = (np.arange(first_day, first_day + n_days) + 1) % 7  # 2019-01-01 was a Tuesday
    day_w = np.where(weekday >= 5, 1.15, 1.0)
    hour_w = 1.0 + 0.35 * np.cos(2 * np.pi * (np.arange(24) - 20) / 24)
    hours = _Categorical(np.outer(day_w, hour_w).ravel())
    gaps = rng.standard_exponential(n + 1)
    u = np.cumsum(gaps)[:-1] / gaps.sum()
    bucket = hours(u)
    within = np.clip((u - hours.prev[bucket]) / hours.mass[bucket], 0.0, 1.0)
    ts = start + bucket.astype(np.int64) * _MS_PER_HOUR
    ts += np.minimum(within * _MS_PER_HOUR, _MS_PER_HOUR - 1).astype(np.int64)
    ts += rng.normal(0.0, 1500.0, n).astype(np.int64)
    return np.clip(ts, start, start + n_days * _MS_PER_DAY - 1)


def _simulate_rows(
    world: _World,
    rng: np.random.Generator,
    ts_ms: np.ndarray,
    *,
    test: bool,
    campaigns: _Categorical | None = None,
    world_day: int | None = None,
) -> _Rows:
    """Draw the rows at the given request times and their planted logit, all vectorised.

    The stream generator passes its own day's campaign sampler and the world day its rows
    live on (its timestamps are not the world's); the two files use the split's defaults.
    """
    n = len(ts_ms)
    if world_day is None:
        day = ((ts_ms - _TRAIN_START_MS) // _MS_PER_DAY).astype(np.int32)
    else:
        day = np.full(n, world_day, dtype=np.int32)
    hour = (ts_ms // _MS_PER_HOUR) % 24
    # One uniform decides the (mutually exclusive) missing country, missing device, new user.
    u_missing = rng.random(n)
    missing_device = (u_missing >= _COUNTRY_NAN) & (u_missing < _COUNTRY_NAN + _DEVICE_NAN)
    new_user = (u_missing >= _COUNTRY_NAN + _DEVICE_NAN) & (
        u_missing < _COUNTRY_NAN + _DEVICE_NAN + _NEW_USER_SHARE
    )

    country = world.country.draw(rng, n)
    country[u_missing < _COUNTRY_NAN] = world.n_countries
    platform = (rng.random(n) < world.country_ios[country]).astype(np.int8)
    if campaigns is None:
        campaigns = world.campaign_test if test else world.campaign_train
    campaign = campaigns.draw(rng, n)
    games = world.game_test if test else world.game_train
    devices = world.device_test if test else world.device_train
    game = np.empty(n, dtype=np.int32)
    device = np.empty(n, dtype=np.int32)
    version = np.empty(n, dtype=np.int32)
    for value in (0, 1):
        mask = platform == value
        k = int(mask.sum())
        game[mask] = world.game_by_platform[value][games[value].draw(rng, k)]
        device[mask] = world.device_by_platform[value][devices[value].draw(rng, k)]
        version[mask] = world.version_offset[value] + world.version[value].draw(rng, k)
    device[missing_device] = world.n_devices
    connection = _CONNECTION.draw(rng, n).astype(np.int8)

    start, start1d, start7d, view, click, installs, gap_h = _draw_history(rng, new_user)
    has_last = ~new_user
    gap_ms = np.maximum(np.nan_to_num(gap_h) * _MS_PER_HOUR, 1000.0).astype(np.int64)
    last_ms = ts_ms - gap_ms

    logit = (
        world.campaign_eff[campaign, day]
        + world.game_eff[game]
        + world.country_eff[country]
        + world.device_eff[device]
        + world.campaign_country[campaign, country]
        + world.campaign_platform[campaign, platform]
        + _pair_effect(campaign, game, world.pair_salt, 0.25)
    ).astype(np.float64)
    logit += np.where(platform == 1, 0.25, 0.0)
    logit += np.array([0.15, 0.0, -0.3])[connection]
    logit += 0.45 * np.log1p(installs) + 0.30 * np.log1p(click) - 0.20 * np.log1p(view)
    logit += 0.12 * np.log1p(start7d)
    logit += np.where(has_last, -0.15 * np.log1p(np.nan_to_num(gap_h)), 0.1)
    logit += 0.15 * np.cos(2 * np.pi * (hour - 21) / 24)
    return _Rows(
        ts_ms=ts_ms,
        campaign=campaign,
        platform=platform,
        version=version,
        game=game,
        country=country,
        start=start,
        view=view,
        click=click,
        installs=installs,
        last_ms=last_ms,
        has_last=has_last,
        start1d=start1d,
        start7d=start7d,
        connection=connection,
        device=device,
        logit=logit,
    )


def _draw_history(
    rng: np.random.Generator, new_user: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """User-history counts and hours since the previous start, mutually consistent.

    Each user has a heavy-tailed start rate and tenure; starts in the last day, the rest of
    the week and before are Poisson, so startCount >= startCount7d >= startCount1d holds
    exactly. Views are a per-user share of starts, clicks and installs binomial thinnings.
    The gap to the previous start is the minimum of the starts placed uniformly in the most
    recent non-empty bucket (a Beta(1, k) draw), so recency agrees with the counts. New users
    have no history and no previous start (their gap is NaN).
    """
    n = len(new_user)
    rate = np.exp(rng.normal(-0.5, 1.1, n))  # starts per day
    tenure = np.clip(1.0 + np.exp(rng.normal(np.log(40.0), 1.1, n)), 1.0, 1000.0)  # days
    s1 = rng.poisson(rate)
    s7 = s1 + rng.poisson(rate * (np.minimum(tenure, 7.0) - 1.0))
    s_all = s7 + rng.poisson(rate * np.maximum(tenure - 7.0, 0.0))
    lonely = (s_all == 0) & ~new_user  # a returning user has started at least once before
    s7[lonely & (tenure < 7.0)] = 1
    s_all[lonely] = 1
    for counts in (s1, s7, s_all):
        counts[new_user] = 0
        np.minimum(counts, MAX_COUNT, out=counts)

    view_share = sigmoid(rng.normal(0.2, 0.8, n))
    view = np.floor(s_all * view_share + rng.random(n)).astype(np.int64)  # stochastic rounding
    click = rng.binomial(view, sigmoid(rng.normal(-4.3, 1.1, n)))
    installs = rng.binomial(click, sigmoid(rng.normal(-3.0, 1.0, n)))

    in_day, in_week = s1 > 0, (s7 - s1) > 0
    k = np.where(in_day, s1, np.where(in_week, s7 - s1, s_all - s7))
    nearest = 1.0 - rng.random(n) ** (1.0 / np.maximum(k, 1))  # Beta(1, k): min of k uniforms
    older_span = np.maximum(tenure * 24.0 - 168.0, 24.0)
    gap_h = np.where(
        in_day,
        24.0 * nearest,
        np.where(in_week, 24.0 + 144.0 * nearest, 168.0 + older_span * nearest),
    )
    gap_h[new_user] = np.nan
    s_all, s1, s7, view, click, installs = (
        x.astype(np.int32) for x in (s_all, s1, s7, view, click, installs)
    )
    return s_all, s1, s7, view, click, installs, gap_h


def _pair_effect(a: np.ndarray, b: np.ndarray, salt: np.uint64, sd: float) -> np.ndarray:
    """A random effect per (a, b) pair without a table: splitmix64 hash -> uniform with `sd`."""
    h = (a.astype(np.uint64) << np.uint64(32)) ^ b.astype(np.uint64) ^ salt
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    u = (h >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return ((u - 0.5) * (sd * np.sqrt(12.0))).astype(np.float32)


def _calibrate_intercept(logit: np.ndarray, target: float) -> float:
    """Bisection on the intercept so that the mean true probability equals `target`."""
    lo, hi = -20.0, 5.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if float(sigmoid(logit + mid).mean()) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


# ---------------------------------------------------------------------------------------------
# Text


def _hex_matrix(raw: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 2k) ASCII hex digits, one table lookup per byte."""
    return _HEX_PAIRS[raw].view(np.uint8).reshape(raw.shape[0], raw.shape[1] * 2)


def _fixed_strings(matrix: np.ndarray, valid: np.ndarray | None = None) -> pa.StringArray:
    """Wrap an (n, width) ASCII byte matrix as an Arrow string array without copying it."""
    n, width = matrix.shape
    matrix = np.ascontiguousarray(matrix)
    offsets = np.arange(0, (n + 1) * width, width, dtype=np.int32)
    validity = None
    if valid is not None and not valid.all():
        validity = pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(matrix), validity)


@functools.cache
def _clock() -> np.ndarray:
    """`HH:MM:SS` for every second of a day, (86400, 8) bytes."""
    sec = np.arange(86_400)
    digits = {
        0: sec // 36_000,
        1: sec // 3600 % 10,
        3: sec // 600 % 6,
        4: sec // 60 % 10,
        6: sec // 10 % 6,
        7: sec % 10,
    }
    out = np.full((86_400, 8), ord(":"), dtype=np.uint8)
    for col, digit in digits.items():
        out[:, col] = 48 + digit
    return out


@functools.cache
def _millis() -> np.ndarray:
    """`.mmm000+00:00` for every millisecond, (1000, 13) bytes."""
    text = np.array([f".{i:03d}000+00:00".encode() for i in range(1000)], dtype="S13")
    return text.view(np.uint8).reshape(1000, 13)


def _timestamps(ms: np.ndarray) -> np.ndarray:
    """Epoch milliseconds -> (n, 32) bytes of `2019-01-09 21:20:15.943000+00:00`."""
    out = np.empty((len(ms), 32), dtype=np.uint8)
    days = ms // _MS_PER_DAY
    first = int(days.min())
    calendar = np.arange(first, int(days.max()) + 1).astype("datetime64[D]")
    dates = np.datetime_as_string(calendar, unit="D").astype("S10").view(np.uint8)
    out[:, 0:10] = dates.reshape(-1, 10)[days - first]
    out[:, 10] = ord(" ")
    ms_of_day = ms - days * _MS_PER_DAY
    out[:, 11:19] = _clock()[ms_of_day // 1000]
    out[:, 19:32] = _millis()[ms_of_day % 1000]
    return out


def _row_ids(world: _World, ts_ms: np.ndarray, first_row: int) -> np.ndarray:
    """24-hex ids: request second, a collector "machine", then a global row counter.

    The counter runs over train then test rows, so ids are unique across both files as long
    as there are fewer than 2**32 rows in all.
    """
    n = len(ts_ms)
    raw = np.empty((n, 12), dtype=np.uint8)
    raw[:, 0:4] = (ts_ms // 1000).astype(">u4").view(np.uint8).reshape(n, 4)
    counter = (np.arange(first_row, first_row + n, dtype=np.int64) + world.id_counter0) % 2**32
    raw[:, 4:8] = world.id_machines[counter % 8]
    raw[:, 8:12] = counter.astype(">u4").view(np.uint8).reshape(n, 4)
    return _hex_matrix(raw)


# No value contains the separator, a quote or a newline, so nothing needs quoting; "none"
# also makes the writer fail rather than quote if one ever did. Nulls are written empty.
_CSV_WRITE = pacsv.WriteOptions(
    include_header=False, delimiter=SEPARATOR, quoting_style="none", batch_size=CHUNK_ROWS
)


def _render_csv(
    world: _World, rows: _Rows, first_row: int, install: np.ndarray | None
) -> pa.Buffer:
    """One chunk's CSV text, without header, as a single buffer (columns in file order)."""
    columns = {
        SCHEMA.id: _fixed_strings(_row_ids(world, rows.ts_ms, first_row)),
        SCHEMA.timestamp: _fixed_strings(_timestamps(rows.ts_ms)),
        "campaignId": world.campaign_ids.take(rows.campaign),
        "platform": _PLATFORMS.take(rows.platform),
        "softwareVersion": world.versions.take(rows.version),
        "sourceGameId": world.game_ids.take(rows.game),
        "country": world.countries.take(rows.country),
        "startCount": pa.array(rows.start),
        "viewCount": pa.array(rows.view),
        "clickCount": pa.array(rows.click),
        "installCount": pa.array(rows.installs),
        "lastStart": _fixed_strings(_timestamps(rows.last_ms), rows.has_last),
        "startCount1d": pa.array(rows.start1d),
        "startCount7d": pa.array(rows.start7d),
        "connectionType": _CONNECTIONS.take(rows.connection),
        "deviceType": world.devices.take(rows.device),
    }
    if install is not None:
        columns[TARGET] = pa.array(install)
    order = TEST_COLUMNS if install is None else COLUMNS
    sink = pa.BufferOutputStream()
    pacsv.write_csv(pa.table({name: columns[name] for name in order}), sink, _CSV_WRITE)
    return sink.getvalue()


def _parse_csv(text: pa.Buffer, columns: list[str]) -> pa.Table:
    """Read one chunk's text back: counts as int64, everything else as text, "" as missing."""
    types = {c: pa.int64() if c in COUNT_COLUMNS or c == TARGET else pa.string() for c in columns}
    return pacsv.read_csv(
        pa.BufferReader(text),
        read_options=pacsv.ReadOptions(column_names=columns),
        parse_options=pacsv.ParseOptions(delimiter=SEPARATOR, quote_char=False),
        convert_options=pacsv.ConvertOptions(
            column_types=types, null_values=[""], strings_can_be_null=True
        ),
    )


# ---------------------------------------------------------------------------------------------
# Partitioned stream

STREAM_DAYS = 14
STREAM_ROWS_PER_DAY = 20_000
SHIFT_SHARE = 0.25  # share of the shift day's requests that go to the planted campaign
PART_FILE = "part-00000" + partitions.DATA_SUFFIX
_STREAM_HOUR_TIMES, _STREAM_HOUR_CHUNKS = 4, 5
_WORLD_DAYS = TRAIN_DAYS + TEST_DAYS
_MS_PER_SECOND = 1000


@dataclass(frozen=True)
class StreamSummary:
    """What `generate_stream` wrote, and what it planted where."""

    requests: list[Path]  # hour partitions, in time order
    labelled: list[Path]  # day partitions, in time order
    rows: int  # request rows in all
    labelled_rows: int
    installs: int  # labelled rows with install = 1
    shift_day: date
    shift_campaign: str
    shift_rows: int  # requests of the planted campaign (all on the shift day)


@dataclass(frozen=True)
class _StreamDay:
    """A calendar day of the stream: the world day it lives on and its campaign sampler."""

    day: date
    world_day: int
    campaigns: _Categorical
    labelled: bool  # all 24 hours are in the stream: the day gets a labelled partition


@dataclass(frozen=True)
class _StreamJob:
    """One chunk of one hour partition (an hour is one chunk unless it exceeds CHUNK_ROWS)."""

    hour: datetime
    day: _StreamDay
    chunk: int
    last: bool  # the hour's last chunk: its partition can be closed after it
    first_row: int  # stream-wide row counter of the chunk's first row (unique row ids)
    ts_ms: np.ndarray


@dataclass(frozen=True)
class _StreamChunk:
    """One chunk's gzip members: requests (no `install`) and, on labelled days, with labels."""

    requests: bytes
    labelled: bytes | None
    installs: int
    shift_rows: int


def generate_stream(
    raw_dir: Path,
    *,
    end: datetime | None = None,
    days: int = STREAM_DAYS,
    rows_per_day: int = STREAM_ROWS_PER_DAY,
    shift_day: date | None = None,
    seed: int = 7,
) -> StreamSummary:
    """Write the hour and day partitions of the `days` days before `end` into `raw_dir`.

    `end` (exclusive, a UTC hour boundary) defaults to the current hour's start, so the hour
    still running has no partition, as in production. See the module docstring for what the
    stream holds. An existing partition is never overwritten: nothing is written then.
    """
    started = time.perf_counter()
    for name, value in (("days", days), ("rows_per_day", rows_per_day)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
            raise RtbError(f"{name}: expected a positive integer, got {value!r}")
    if days * rows_per_day >= 2**32:
        raise RtbError("days * rows_per_day: row ids support fewer than 2**32 rows in all")
    end = partitions.floor_hour(datetime.now(UTC)) if end is None else partitions.utc_hour(end, name="end")
    hours = partitions.hours_between(end - timedelta(days=days), end)
    dates = sorted({hour.date() for hour in hours})
    complete = [d for d in dates if sum(hour.date() == d for hour in hours) == 24]
    if shift_day is None:
        shift_day = complete[-3] if len(complete) >= 3 else (complete or dates)[0]
    elif shift_day not in dates:
        raise RtbError(
            f"shift_day: expected a day of the stream ({dates[0]} to {dates[-1]}), got {shift_day}"
        )

    raw_dir = Path(raw_dir)
    targets = [partitions.request_partition(raw_dir, h) for h in hours]
    targets += [partitions.labelled_partition(raw_dir, d) for d in complete]
    existing = [path for path in targets if path.exists()]
    if existing:
        raise RtbError(
            f"{existing[0]}: partition already exists ({len(existing)} of the stream's "
            f"{len(targets)} do); partitions are never overwritten, nothing was written"
        )
    _writable_folder(raw_dir)

    plan = _make_plan(1, 1, seed)  # the world and intercept; the row counts are unused
    stream_days, planted = _stream_days(plan.world, dates, set(complete), shift_day)
    counts = _hour_counts(hours, days * rows_per_day)
    writer = _PartitionWriter(raw_dir)
    installs = shift_rows = 0
    try:
        with contextlib.closing(_run_stream_chunks(plan, hours, counts, stream_days, planted)) as chunks:
            for job, chunk in chunks:
                writer.write(job, chunk)
                installs += chunk.installs
                shift_rows += chunk.shift_rows
    except BaseException as exc:
        writer.abort(exc)
        raise
    rows = int(counts.sum())
    labelled_rows = int(sum(c for h, c in zip(hours, counts, strict=True) if h.date() in complete))
    summary = StreamSummary(
        requests=writer.requests,
        labelled=writer.labelled,
        rows=rows,
        labelled_rows=labelled_rows,
        installs=installs,
        shift_day=shift_day,
        shift_campaign=str(plan.world.campaign_ids[planted]),
        shift_rows=shift_rows,
    )
    log.info(
        "wrote %d request partitions (%d rows, %s to %s) and %d labelled partitions (%d rows, "
        "install rate %.4f) to %s; shift on %s: campaign %s has %d requests; %.1f s",
        len(summary.requests),
        rows,
        hours[0].isoformat(),
        end.isoformat(),
        len(summary.labelled),
        labelled_rows,
        installs / labelled_rows if labelled_rows else float("nan"),
        raw_dir,
        shift_day,
        summary.shift_campaign,
        shift_rows,
        time.perf_counter() - started,
    )
    return summary


def _stream_days(
    world: _World, dates: list[date], complete: set[date], shift_day: date
) -> tuple[dict[date, _StreamDay], int]:
    """Map the stream's calendar days onto world days; build each day's campaign sampler.

    The last 21 days of a stream are the world's 14 train then 7 test days (a longer stream
    spreads its days evenly over the 21), so campaign effects follow the world's daily
    random walk, and the test days bring the world's new campaigns, each from its launch day
    (the creation time in its ObjectId) on. The planted campaign is the world's least popular
    new campaign, taken out of regular traffic and given SHIFT_SHARE of the shift day.
    """
    n = len(dates)
    n_old = _N_CAMPAIGNS_OLD
    launched_s = np.array([int(text[:8], 16) for text in world.campaign_ids.slice(n_old).to_pylist()])
    train_w = world.campaign_train.mass.copy()
    test_w = world.campaign_test.mass.copy()
    planted = n_old + int(np.argmin(test_w[n_old:]))
    train_w[planted] = test_w[planted] = 0.0
    samplers: dict[tuple[int, bool], _Categorical] = {}
    out = {}
    for index, day in enumerate(dates):
        world_day = index + _WORLD_DAYS - n if n <= _WORLD_DAYS else index * _WORLD_DAYS // n
        shift = day == shift_day
        if (world_day, shift) not in samplers:
            if world_day < TRAIN_DAYS:
                weights = train_w.copy()
            else:
                weights = test_w.copy()
                day_end_s = _TRAIN_START_MS // _MS_PER_SECOND + (world_day + 1) * 86_400
                weights[n_old:][launched_s >= day_end_s] = 0.0
            weights /= weights.sum()
            if shift:
                weights *= 1.0 - SHIFT_SHARE
                weights[planted] = SHIFT_SHARE
            samplers[world_day, shift] = _Categorical(weights)
        out[day] = _StreamDay(day, world_day, samplers[world_day, shift], day in complete)
    return out, planted


def _hour_weights(hours: list[datetime]) -> np.ndarray:
    """Relative request volume of each hour: the generator's daily cycle and busier weekends."""
    hour_of_day = np.array([h.hour for h in hours])
    weekend = np.array([h.weekday() >= 5 for h in hours])
    return np.where(weekend, 1.15, 1.0) * (1.0 + 0.35 * np.cos(2 * np.pi * (hour_of_day - 20) / 24))


def _hour_counts(hours: list[datetime], total: int) -> np.ndarray:
    """Split `total` rows over the hours by volume, exactly (largest remainders round up)."""
    weights = _hour_weights(hours)
    share = weights / weights.sum() * total
    counts = np.floor(share).astype(np.int64)
    short = total - int(counts.sum())
    counts[np.argsort(-(share - counts), kind="stable")[:short]] += 1
    return counts


def _hour_times(rng: np.random.Generator, n: int, start_ms: int) -> np.ndarray:
    """Sorted request times within one hour, with the same second or two of collector jitter."""
    gaps = rng.standard_exponential(n + 1)
    u = np.cumsum(gaps)[:-1] / gaps.sum()
    ts = start_ms + np.minimum(u * _MS_PER_HOUR, _MS_PER_HOUR - 1).astype(np.int64)
    ts += rng.normal(0.0, 1500.0, n).astype(np.int64)
    return np.clip(ts, start_ms, start_ms + _MS_PER_HOUR - 1)


def _stream_jobs(
    plan: _Plan, hours: list[datetime], counts: np.ndarray, days: dict[date, _StreamDay]
) -> Iterator[_StreamJob]:
    """The chunks of every hour in time order; each hour's times come from its own stream."""
    first_row = 0
    for hour, n_rows in zip(hours, counts.tolist(), strict=True):
        start_ms = int(hour.timestamp()) * _MS_PER_SECOND
        ts_ms = _hour_times(_rng(plan.seed, _STREAM_HOUR_TIMES, start_ms // _MS_PER_HOUR), n_rows, start_ms)
        bounds = list(range(0, n_rows, CHUNK_ROWS)) or [0]
        for chunk, lo in enumerate(bounds):
            hi = min(lo + CHUNK_ROWS, n_rows)
            last = chunk == len(bounds) - 1
            yield _StreamJob(hour, days[hour.date()], chunk, last, first_row + lo, ts_ms[lo:hi])
        first_row += n_rows


def _run_stream_chunks(
    plan: _Plan,
    hours: list[datetime],
    counts: np.ndarray,
    days: dict[date, _StreamDay],
    planted: int,
) -> Iterator[tuple[_StreamJob, _StreamChunk]]:
    """Encode the stream's chunks on the thread pool, yielding them in order (bounded memory)."""
    with ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix="rtb-generate") as pool:
        pending: deque[tuple[_StreamJob, Future[_StreamChunk]]] = deque()
        try:
            for job in _stream_jobs(plan, hours, counts, days):
                pending.append((job, pool.submit(_encode_stream_chunk, plan, job, planted)))
                if len(pending) >= _MAX_PENDING:
                    done, future = pending.popleft()
                    yield done, future.result()
            while pending:
                done, future = pending.popleft()
                yield done, future.result()
        finally:
            for _, future in pending:
                future.cancel()


def _encode_stream_chunk(plan: _Plan, job: _StreamJob, planted: int) -> _StreamChunk:
    """Simulate one chunk, label it as the train file is labelled, render both gzip members."""
    n = len(job.ts_ms)
    hour_key = int(job.hour.timestamp()) // 3600
    header_labelled = SEPARATOR.join(COLUMNS) + "\n" if job.chunk == 0 and job.hour.hour == 0 else ""
    header = SEPARATOR.join(TEST_COLUMNS) + "\n" if job.chunk == 0 else ""
    installs = shift_rows = 0
    text = b""
    if n:
        rng = _rng(plan.seed, _STREAM_HOUR_CHUNKS, hour_key, job.chunk)
        world_day = job.day.world_day
        rows = _simulate_rows(
            plan.world,
            rng,
            job.ts_ms,
            test=world_day >= TRAIN_DAYS,
            campaigns=job.day.campaigns,
            world_day=world_day,
        )
        p_true = sigmoid(rows.logit + plan.intercept)
        install = (rng.random(n) < p_true).astype(np.int8)
        installs, shift_rows = int(install.sum()), int((rows.campaign == planted).sum())
        text = _render_csv(plan.world, rows, job.first_row, install)
    labelled = _gzip_member(header_labelled, text) if job.day.labelled else None
    return _StreamChunk(_gzip_member(header, _drop_last_field(text)), labelled, installs, shift_rows)


def _gzip_member(header: str, text: bytes | pa.Buffer) -> bytes:
    member = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 31)  # wbits 31: gzip framing
    return member.compress(header.encode()) + member.compress(text) + member.flush()


def _drop_last_field(text: bytes | pa.Buffer) -> bytes:
    """The CSV text without its last field (`;0` or `;1`, the label) on every line.

    Cutting two bytes before each newline is exact because the label is always one digit,
    and it guarantees that request and labelled rows agree on every other field.
    """
    data = np.frombuffer(text, dtype=np.uint8)
    if not data.size:
        return b""
    newlines = np.flatnonzero(data == ord("\n"))
    if not (data[newlines - 2] == ord(SEPARATOR)).all():
        raise AssertionError("rtb.data.generate: the label is not a single trailing digit")
    keep = np.ones(data.size, dtype=bool)
    keep[newlines - 1] = False
    keep[newlines - 2] = False
    return data[keep].tobytes()


class _PartitionWriter:
    """Writes chunks into their partitions; a partition's `_SUCCESS` comes after its file.

    The data file is written under a temporary name in the partition folder and renamed once
    complete (`atomic_path`), then the marker is created: a reader that sees `_SUCCESS` sees the
    whole partition. An hour is closed after its last chunk, a labelled day after its hour 23.
    """

    def __init__(self, raw_dir: Path) -> None:
        self.raw_dir = raw_dir
        self.requests: list[Path] = []
        self.labelled: list[Path] = []
        self._hour: tuple[contextlib.ExitStack, Path, BinaryIO] | None = None
        self._day: tuple[contextlib.ExitStack, Path, BinaryIO] | None = None

    def write(self, job: _StreamJob, chunk: _StreamChunk) -> None:
        if job.chunk == 0:
            self._hour = self._open(partitions.request_partition(self.raw_dir, job.hour))
        assert self._hour is not None
        self._hour[2].write(chunk.requests)
        if chunk.labelled is not None:
            if job.chunk == 0 and job.hour.hour == 0:
                self._day = self._open(partitions.labelled_partition(self.raw_dir, job.day.day))
            assert self._day is not None
            self._day[2].write(chunk.labelled)
        if job.last:
            self.requests.append(self._close(self._hour))
            self._hour = None
            if chunk.labelled is not None and job.hour.hour == 23:
                assert self._day is not None
                self.labelled.append(self._close(self._day))
                self._day = None

    def abort(self, exc: BaseException) -> None:
        """Drop the open partitions' temporary files: no file, no marker."""
        for opened in (self._hour, self._day):
            if opened is not None:
                opened[0].__exit__(type(exc), exc, exc.__traceback__)
        self._hour = self._day = None

    @staticmethod
    def _open(partition: Path) -> tuple[contextlib.ExitStack, Path, BinaryIO]:
        stack = contextlib.ExitStack()
        try:
            tmp = stack.enter_context(atomic_path(partition / PART_FILE, overwrite=False))
            handle = stack.enter_context(open(tmp, "wb"))
        except BaseException:
            stack.close()
            raise
        return stack, partition, handle

    @staticmethod
    def _close(opened: tuple[contextlib.ExitStack, Path, BinaryIO]) -> Path:
        stack, partition, _ = opened
        stack.close()  # closes the file, fsyncs it, renames it into place
        marker = partition / partitions.SUCCESS
        try:
            # Empty, as Hadoop writes it: nothing to half-write, so no temporary name needed;
            # exclusive creation, then the folder's fsync makes it durable after the data.
            with open(marker, "xb"):
                pass
            _fsync_folder(partition)
        except OSError as exc:
            raise RtbError(f"{marker}: cannot write the marker ({exc.strerror or exc})") from exc
        return partition


def _fsync_folder(folder: Path) -> None:
    """Make a new name in `folder` durable (the marker must not survive a crash the data lost)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
