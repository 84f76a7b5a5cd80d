"""Synthetic real-time-bidding ad-request logs with a known install probability.

The real logs cannot ship with the repository, yet `run.sh`, every test and the benchmarks need
data shaped like them: the same columns and text formats, Zipf-like categorical popularity,
heavy-tailed user-history counts, missing values, a later test window with campaigns that never
appear in training, and mild drift. Because the install probability is *planted* (a logistic
function of the observed columns), tests can compare a model's log loss with the best
achievable one instead of guessing what "good" means.

Everything is vectorised with numpy, since per-row Python would take minutes at the
benchmark's 3.7M + 3.7M rows. Rows are simulated and encoded in independent chunks on a small
thread pool (numpy, Arrow kernels and zlib release the GIL). Fixed-width text (ids, timestamps)
is assembled as byte matrices, categorical text is an Arrow `take` from a vocabulary, and one
`binary_join_element_wise` call joins the fields into rows: about three times faster than a
generic CSV writer. Each chunk becomes one gzip member; concatenated members are a valid gzip
file that `gzip`, pandas and pyarrow all read as one stream.
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
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from rtb.errors import RtbError
from rtb.io_utils import atomic_path

log = logging.getLogger(__name__)

TRAIN_FILE = "training_data.csv.gz"
TEST_FILE = "test_data.csv.gz"
SEPARATOR = ";"
TARGET = "install"
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
    TARGET,
]
TEST_COLUMNS = COLUMNS[:-1]
COUNT_COLUMNS = [
    "startCount",
    "viewCount",
    "clickCount",
    "installCount",
    "startCount1d",
    "startCount7d",
]

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

# Vocabulary sizes, chosen so that 3.7M + 3.7M rows show ~10k campaigns, ~41k source games
# and ~34k device models, as the real logs do; smaller samples simply see fewer of them.
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

    `np.searchsorted` over millions of random keys costs ~100 ns a row here; the guide table
    answers most draws with two lookups and binary-searches only the few uniforms that fall
    in a bucket holding a category boundary. The result is exactly the inverse CDF.
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
    devices_eol: pa.StringArray  # the same ending in a newline (last field of a test row)
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
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RtbError(f"{out_dir}: cannot create output folder ({exc.strerror})") from exc
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise RtbError(f"{out_dir}: output folder is not writable")

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
    p_true = _sigmoid(rows.logit + plan.intercept)
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


def _vocab(
    values: list[str], *, with_missing: bool = False, missing: str | None = None, suffix: str = ""
) -> pa.StringArray:
    """A vocabulary as an Arrow array, optionally with a last entry (`missing`) for "no value"."""
    entries: list[str | None] = [v + suffix for v in values]
    if with_missing:
        entries.append(missing)
    return pa.array(entries, pa.string())


_PLATFORMS = pa.array(["android", "ios"], pa.string())
_CONNECTIONS = pa.array(_CONNECTION_NAMES, pa.string())
_INSTALL_EOL = pa.array(["0\n", "1\n"], pa.string())  # the last field of a train row
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
        if float(country_w @ _sigmoid(mid + tilt)) < _IOS_SHARE:
            lo = mid
        else:
            hi = mid
    country_ios = np.append(_sigmoid(lo + tilt), _IOS_SHARE)

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
        devices_eol=_vocab(names, with_missing=True, missing="\n", suffix="\n"),
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
    world: _World, rng: np.random.Generator, ts_ms: np.ndarray, *, test: bool
) -> _Rows:
    """Draw the rows at the given request times and their planted logit, all vectorised."""
    n = len(ts_ms)
    day = ((ts_ms - _TRAIN_START_MS) // _MS_PER_DAY).astype(np.int32)
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
    campaign = (world.campaign_test if test else world.campaign_train).draw(rng, n)
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

    view_share = _sigmoid(rng.normal(0.2, 0.8, n))
    view = np.floor(s_all * view_share + rng.random(n)).astype(np.int64)  # stochastic rounding
    click = rng.binomial(view, _sigmoid(rng.normal(-4.3, 1.1, n)))
    installs = rng.binomial(click, _sigmoid(rng.normal(-3.0, 1.0, n)))

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


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _calibrate_intercept(logit: np.ndarray, target: float) -> float:
    """Bisection on the intercept so that the mean true probability equals `target`."""
    lo, hi = -20.0, 5.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if float(_sigmoid(logit + mid).mean()) < target:
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


def _int_text(values: np.ndarray) -> pa.StringArray:
    return pc.cast(pa.array(values), pa.string())


def _render_csv(
    world: _World, rows: _Rows, first_row: int, install: np.ndarray | None
) -> pa.Buffer:
    """One chunk's CSV text, without header, as a single buffer.

    The last field of each row carries the newline (install for train, deviceType for
    test), so that joining the fields with `;` yields the file text directly. No value
    contains `;`, a quote or a newline, so nothing needs quoting; missing values are empty.
    """
    last_field = (
        world.devices_eol.take(rows.device) if install is None else world.devices.take(rows.device)
    )
    fields = [
        _fixed_strings(_row_ids(world, rows.ts_ms, first_row)),
        _fixed_strings(_timestamps(rows.ts_ms)),
        world.campaign_ids.take(rows.campaign),
        _PLATFORMS.take(rows.platform),
        world.versions.take(rows.version),
        world.game_ids.take(rows.game),
        world.countries.take(rows.country),
        *(_int_text(x) for x in (rows.start, rows.view, rows.click, rows.installs)),
        _fixed_strings(_timestamps(rows.last_ms), rows.has_last),
        *(_int_text(x) for x in (rows.start1d, rows.start7d)),
        _CONNECTIONS.take(rows.connection),
        last_field,
    ]
    if install is not None:
        fields.append(_INSTALL_EOL.take(install))
    joined = pc.binary_join_element_wise(
        *fields, SEPARATOR, null_handling="replace", null_replacement=""
    )
    _, offsets_buffer, data = joined.buffers()
    offsets = np.frombuffer(offsets_buffer, dtype=np.int32)[joined.offset :][: len(joined) + 1]
    return data.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))


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
