"""Synthetic RTB worlds of different shapes, each with its true install probabilities.

Why: the candidates were tuned on the one world `rtb.data.generate` draws, so a method that
exploits that world's functional form looks better than it is. These worlds share only the
raw schema with it (same columns, text formats and separator, checked by `rtb make-dataset`);
their probability model is written independently here and differs by world in the ways real
traffic differs: which ids interact and how strongly, linear vs non-monotone effects of the
counts and of recency, drift of campaign effects and of the base rate over days, hour-of-day
seasonality, cardinalities and popularity skew, base rates from 0.2% to 5%, heavy-tailed
counts, and the share of rows from ids never seen in training.

Every world is a named `WorldSpec`; `draw_world(spec, train_rows, test_rows_per_day, seed)`
returns the raw train frame (with `install`), the raw test frame (without it), and the true
probability of every row kept aside. Same spec, sizes and seed: same frames. Vectorised numpy
throughout (a 1M-row world takes seconds).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from scipy.special import expit, ndtri

from rtb.dataset_config import load_dataset_config
from rtb.models.calibration import mean_matching_shift

SCHEMA = load_dataset_config("rtb")
# Column order of the raw logs (the order `rtb.data.generate` writes; the reader checks names).
COLUMNS = [
    "id", "timestamp", "campaignId", "platform", "softwareVersion", "sourceGameId", "country",
    "startCount", "viewCount", "clickCount", "installCount", "lastStart", "startCount1d",
    "startCount7d", "connectionType", "deviceType", "install",
]
START = np.datetime64("2021-03-01T00:00:00", "ms")
MS_PER_HOUR = 3_600_000
MS_PER_DAY = 24 * MS_PER_HOUR
# Two-letter codes only (no "NA": the reader would take Namibia for a missing value).
COUNTRIES = (
    "US GB DE FR JP CA AU BR RU IN IT ES MX KR CN TR ID PH TH VN MY SA NL PL UA AR CO TW HK SE "
    "CH BE AT NO DK FI IE NZ SG AE IL PT CZ RO HU GR CL PE EG ZA NG PK BD KZ"
).split()
VERSIONS = {
    "android": "9 8.1.0 8.0.0 7.1.2 7.0 6.0.1 5.1.1 10 4.4.4 11".split(),
    "ios": "12.1 12.0 11.4.1 13.1 13.3 12.4 10.3.3 14.0".split(),
}
CONNECTIONS = np.array(["wifi", "cellular", "unknown"])
# Id columns with a main effect, in the order their effect scales are listed.
EFFECT_COLUMNS = ("campaignId", "sourceGameId", "country", "deviceType", "platform",
                  "connectionType", "softwareVersion")


@dataclass(frozen=True)
class WorldSpec:
    """One world's shape. Effects are on the log-odds scale; `intercept` is solved so that the
    mean true probability over the training days is `base_rate`."""

    name: str
    doc: str
    base_rate: float
    train_days: int = 7
    test_days: int = 2
    n_campaigns: int = 2_000
    n_games: int = 10_000
    n_devices: int = 3_000
    zipf: float = 1.1  # popularity skew of every id column
    id_scale: dict[str, float] = field(default_factory=lambda: {
        "campaignId": 0.8, "sourceGameId": 0.6, "country": 0.4, "deviceType": 0.3,
        "platform": 0.3, "connectionType": 0.15, "softwareVersion": 0.1})
    interactions: tuple[tuple[str, str, float], ...] = ()  # (column, column, effect sd)
    numeric_form: str = "linear"  # "linear" | "nonmonotone" | "threshold"
    numeric_scale: float = 0.5
    campaign_slope_sd: float = 0.0  # campaign-specific slope on log startCount
    campaign_drift_sd: float = 0.0  # daily random-walk step of campaign effects
    base_drift: float = 0.0  # change of the log-odds per day (base-rate drift)
    season_amp: float = 0.0  # hour-of-day amplitude of the log-odds
    count_tail: float = 0.0  # 0: lognormal counts; >0: Pareto tail index (heavier when small)
    unseen_share: float = 0.05  # share of test-day rows from campaigns and games never trained on
    new_user_share: float = 0.02


WORLDS: dict[str, WorldSpec] = {w.name: w for w in (
    WorldSpec(
        "additive", "Main effects only, log-linear counts, no drift: the world a one-hot "
        "logistic regression is right for.", base_rate=0.01),
    WorldSpec(
        "interacting", "Strong campaign x country, campaign x game and game x device effects "
        "beyond the main effects; campaign-specific slopes on user activity.", base_rate=0.02,
        id_scale={"campaignId": 0.5, "sourceGameId": 0.4, "country": 0.3, "deviceType": 0.2,
                  "platform": 0.2, "connectionType": 0.1, "softwareVersion": 0.1},
        interactions=(("campaignId", "country", 0.7), ("campaignId", "sourceGameId", 0.5),
                      ("sourceGameId", "deviceType", 0.4)),
        campaign_slope_sd=0.25),
    WorldSpec(
        "nonmonotone", "Non-monotone numerics (a bump at daily players' recency, U-shaped "
        "activity), strong hour-of-day seasonality, low base rate.", base_rate=0.005,
        numeric_form="nonmonotone", numeric_scale=0.9, season_amp=0.5,
        interactions=(("campaignId", "platform", 0.4),)),
    WorldSpec(
        "drifting", "Campaign effects random-walk by day, the base rate climbs ~5% a day in "
        "odds, and 20% of test rows come from unseen campaigns and games.", base_rate=0.015,
        campaign_drift_sd=0.25, base_drift=0.05, unseen_share=0.20,
        interactions=(("campaignId", "country", 0.4),)),
    WorldSpec(
        "rare_heavy_tail", "0.2% base rate, Pareto-tailed counts with threshold effects, many "
        "ids with flat popularity (most are rare).", base_rate=0.002, n_campaigns=8_000,
        n_games=60_000, n_devices=10_000, zipf=0.8, numeric_form="threshold", count_tail=1.3,
        interactions=(("campaignId", "sourceGameId", 0.5),), base_drift=-0.03),
    WorldSpec(
        "dense", "5% base rate, few ids, moderate interactions, slow drift, seasonality.",
        base_rate=0.05, n_campaigns=300, n_games=1_500, n_devices=500, zipf=1.3,
        interactions=(("campaignId", "deviceType", 0.4), ("country", "platform", 0.3)),
        campaign_drift_sd=0.08, season_amp=0.25, numeric_form="nonmonotone",
        numeric_scale=0.5, unseen_share=0.02),
)}


@dataclass
class WorldData:
    """A drawn world: raw frames in the RTB raw schema plus what no raw file carries."""

    spec: WorldSpec
    train: pd.DataFrame  # raw text/ints, with `install`
    test: pd.DataFrame  # raw, without `install`
    p_train: np.ndarray
    p_test: np.ndarray
    y_test: np.ndarray
    test_day: np.ndarray  # 1 = the first day after training


def draw_world(spec: WorldSpec, train_rows: int, test_rows_per_day: int, seed: int) -> WorldData:
    """Draw a world's rows. Ids and effects come from one random stream, rows from another,
    so the same world at two sizes differs only in how many rows it has."""
    world_rng = np.random.default_rng([seed, 0])
    rows_rng = np.random.default_rng([seed, 1])
    effects = _Effects.draw(spec, world_rng)
    days = np.concatenate([
        np.repeat(np.arange(spec.train_days), _split(train_rows, spec.train_days)),
        np.repeat(spec.train_days + np.arange(spec.test_days),
                  [test_rows_per_day] * spec.test_days),
    ])
    rows = _draw_rows(spec, effects, days, rows_rng)
    days = rows["day"]
    logit = effects.log_odds(spec, rows)
    train = days < spec.train_days
    intercept = mean_matching_shift(logit[train], spec.base_rate)
    p = expit(logit + intercept)
    y = (rows_rng.random(len(p)) < p).astype(np.int64)
    frame = _raw_frame(rows, effects, y, seed)
    test_frame = frame[~train].drop(columns=["install"]).reset_index(drop=True)
    return WorldData(spec, frame[train].reset_index(drop=True), test_frame, p[train], p[~train],
                     y[~train], days[~train] - spec.train_days + 1)


def write_raw(data: WorldData, raw_dir: Path) -> None:
    """The two raw files `rtb make-dataset` reads, `;`-separated gzip CSV like the real logs."""
    raw_dir.mkdir(parents=True, exist_ok=True)
    for split, frame in (("train", data.train), ("test", data.test)):
        with gzip.open(raw_dir / SCHEMA.files[split], "wb", compresslevel=1) as out:
            pacsv.write_csv(pa.Table.from_pandas(frame, preserve_index=False), out,
                            pacsv.WriteOptions(delimiter=";", quoting_style="none"))


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def _zipf_weights(n: int, s: float, rng: np.random.Generator) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return rng.permutation(w / w.sum())  # popularity unrelated to the id's effect


@dataclass
class _Effects:
    """Vocabulary sizes, popularity and planted effects: the world, before any row."""

    sizes: dict[str, int]
    popularity: dict[str, np.ndarray]
    main: dict[str, np.ndarray]
    campaign_walk: np.ndarray  # (n_campaigns, days)
    campaign_slope: np.ndarray
    new_campaigns: int
    new_games: int
    salt: int

    @staticmethod
    def draw(spec: WorldSpec, rng: np.random.Generator) -> _Effects:
        new_c = max(10, spec.n_campaigns // 10)
        new_g = max(10, spec.n_games // 10)
        sizes = {"campaignId": spec.n_campaigns + new_c, "sourceGameId": spec.n_games + new_g,
                 "country": len(COUNTRIES), "deviceType": spec.n_devices, "platform": 2,
                 "connectionType": 3, "softwareVersion": max(map(len, VERSIONS.values()))}
        popularity = {name: _zipf_weights(n, spec.zipf, rng) for name, n in sizes.items()
                      if name in ("country", "deviceType")}
        popularity["campaignId"] = _zipf_weights(spec.n_campaigns, spec.zipf, rng)
        popularity["sourceGameId"] = _zipf_weights(spec.n_games, spec.zipf, rng)
        main = {name: rng.normal(0.0, spec.id_scale.get(name, 0.0), sizes[name])
                for name in EFFECT_COLUMNS}
        n_days = spec.train_days + spec.test_days
        steps = rng.normal(0.0, spec.campaign_drift_sd, (sizes["campaignId"], n_days))
        steps[:, 0] = 0.0
        return _Effects(sizes, popularity, main, np.cumsum(steps, axis=1),
                        rng.normal(0.0, spec.campaign_slope_sd, sizes["campaignId"]),
                        new_c, new_g, int(rng.integers(1, 2**31)))

    def log_odds(self, spec: WorldSpec, rows: dict[str, np.ndarray]) -> np.ndarray:
        """Planted log-odds without the intercept."""
        out = np.zeros(len(rows["day"]))
        for name in EFFECT_COLUMNS:
            codes = rows[name]
            out += np.where(codes >= 0, self.main[name][np.maximum(codes, 0)], 0.0)
        out += self.campaign_walk[rows["campaignId"], rows["day"]]
        for k, (a, b, sd) in enumerate(spec.interactions):
            out += sd * _pair_normal(rows[a], rows[b], self.salt + k)
        activity = np.log1p(rows["startCount"])
        out += self.campaign_slope[rows["campaignId"]] * (activity - 2.0)
        out += spec.numeric_scale * _numeric_effect(spec.numeric_form, rows)
        out += spec.season_amp * np.cos(2 * np.pi * (rows["hour"] - 20) / 24)
        out += spec.base_drift * rows["day"]
        return out


def _pair_normal(a: np.ndarray, b: np.ndarray, salt: int) -> np.ndarray:
    """A fixed standard-normal effect per (a, b) pair without storing the pair table: a
    splitmix64 hash of the codes turned into a normal quantile. Missing codes (-1) hash too."""
    with np.errstate(over="ignore"):
        x = (a.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
             ^ (b.astype(np.uint64) + np.uint64(salt)) * np.uint64(0xBF58476D1CE4E5B9))
        x ^= x >> np.uint64(31)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(29)
    u = ((x >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
    return ndtri(u)


def _numeric_effect(form: str, rows: dict[str, np.ndarray]) -> np.ndarray:
    """The counts' and recency's effect, roughly unit scale, in one of three shapes."""
    activity = np.log1p(rows["startCount"])
    clicks = np.log1p(rows["clickCount"])
    installed = (rows["installCount"] > 0).astype(np.float64)
    hours = np.where(np.isnan(rows["hours_since"]), 24 * 30, rows["hours_since"])
    recency = np.log1p(hours)
    if form == "linear":
        return 0.4 * activity - 0.3 * recency + 0.6 * clicks + 0.8 * installed - 0.5
    if form == "nonmonotone":
        daily = np.exp(-((recency - np.log1p(22.0)) ** 2) / 0.3)  # came back after ~a day
        u_shape = 0.25 * (activity - 2.5) ** 2 - 1.0  # newcomers and whales install
        return 1.5 * daily + u_shape + 0.8 * np.sin(2.0 * clicks)
    if form == "threshold":
        return (1.2 * (rows["startCount7d"] >= 5) - 1.0 * (hours > 72) + 1.0 * installed
                + 0.7 * (rows["viewCount"] > 50) - 0.5)
    raise ValueError(f"unknown numeric_form {form!r}; expected linear, nonmonotone or threshold")


def _draw_counts(n: int, tail: float, rng: np.random.Generator) -> np.ndarray:
    if tail > 0:
        return np.floor(rng.pareto(tail, n) * 5).astype(np.int64)
    return np.floor(rng.lognormal(2.5, 1.2, n)).astype(np.int64)


def _draw_rows(spec: WorldSpec, effects: _Effects, days: np.ndarray,
               rng: np.random.Generator) -> dict[str, np.ndarray]:
    n = len(days)
    test = days >= spec.train_days
    traffic = 1.0 + 0.5 * np.cos(2 * np.pi * (np.arange(24) - 21) / 24)
    hour = rng.choice(24, n, p=traffic / traffic.sum())
    ms = (days * MS_PER_DAY + hour * MS_PER_HOUR + rng.integers(0, MS_PER_HOUR, n))
    order = np.argsort(ms, kind="stable")
    days, hour, ms, test = days[order], hour[order], ms[order], test[order]
    rows = {"day": days, "hour": hour, "ms": ms}
    unseen = test & (rng.random(n) < spec.unseen_share)
    old_c = rng.choice(spec.n_campaigns, n, p=effects.popularity["campaignId"])
    old_g = rng.choice(spec.n_games, n, p=effects.popularity["sourceGameId"])
    rows["campaignId"] = np.where(unseen, spec.n_campaigns + rng.integers(0, effects.new_campaigns, n), old_c)
    rows["sourceGameId"] = np.where(unseen, spec.n_games + rng.integers(0, effects.new_games, n), old_g)
    country = rng.choice(len(COUNTRIES), n, p=effects.popularity["country"])
    rows["country"] = np.where(rng.random(n) < 0.005, -1, country)
    platform = (rng.random(n) < 0.45).astype(np.int64)  # 1 = ios
    rows["platform"] = platform
    n_versions = np.array([len(VERSIONS["android"]), len(VERSIONS["ios"])])
    rows["softwareVersion"] = np.minimum(rng.geometric(0.35, n) - 1, n_versions[platform] - 1)
    device = rng.choice(spec.n_devices, n, p=effects.popularity["deviceType"])
    rows["deviceType"] = np.where(rng.random(n) < 0.003, -1, device)
    rows["connectionType"] = rng.choice(3, n, p=[0.64, 0.355, 0.005])
    new_user = rng.random(n) < spec.new_user_share
    start = np.where(new_user, 0, _draw_counts(n, spec.count_tail, rng) + 1)
    start = np.minimum(start, 9_999_999)
    view = rng.binomial(start, 0.6)
    click = rng.binomial(view, 0.08)
    rows.update(startCount=start, viewCount=view, clickCount=click,
                installCount=rng.binomial(click, 0.1))
    start7d = rng.binomial(start, rng.beta(2.0, 5.0, n))
    rows.update(startCount7d=start7d, startCount1d=rng.binomial(start7d, 0.3))
    hours = rng.exponential(30.0, n)
    rows["hours_since"] = np.where(start > 0, hours, np.nan)
    return rows


def _hex_ids(values: np.ndarray, width: int) -> pa.Array:
    """Fixed-width lower-case hex text of unsigned integers (Mongo-like ids)."""
    return pa.array(np.char.zfill(np.char.mod("%x", values), width))


def _vocabulary(prefix: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 2, len(prefix)])
    return np.char.add(prefix, rng.choice(10**6, n, replace=False).astype(str))


def _raw_frame(rows: dict[str, np.ndarray], effects: _Effects, y: np.ndarray,
               seed: int) -> pd.DataFrame:
    """Codes and numbers -> the raw text columns, in the raw file's column order."""
    n = len(y)
    ms = rows["ms"]
    stamps = START.astype(np.int64) + ms
    campaign_vocab = np.char.add("5e", _hex_ids(
        np.random.default_rng([seed, 3]).choice(2**60, effects.sizes["campaignId"], replace=False)
        .astype(np.uint64), 22).to_numpy(zero_copy_only=False).astype(str))
    ids = np.char.add(np.char.zfill(np.char.mod("%x", stamps // 1000), 12).astype(str),
                      np.char.zfill(np.char.mod("%x", np.arange(n) + 10**6 * (seed % 997)), 12))
    android = np.array(VERSIONS["android"])
    ios = np.array(VERSIONS["ios"] + [VERSIONS["ios"][-1]] * (len(android) - len(VERSIONS["ios"])))
    version = np.where(rows["platform"] == 1, ios[np.minimum(rows["softwareVersion"], len(ios) - 1)],
                       android[rows["softwareVersion"]])
    last_ms = stamps - np.nan_to_num(rows["hours_since"] * MS_PER_HOUR).astype(np.int64)
    last = pc.cast(pa.array(last_ms, pa.timestamp("ms"), mask=np.isnan(rows["hours_since"])),
                   pa.string())
    countries = np.array(COUNTRIES)
    devices = _vocabulary("DEV-", effects.sizes["deviceType"], seed)
    games = np.random.default_rng([seed, 4]).choice(
        3 * 10**6, effects.sizes["sourceGameId"], replace=False).astype(str)
    data = {
        "id": ids,
        "timestamp": pc.cast(pa.array(stamps, pa.timestamp("ms")), pa.string()),
        "campaignId": campaign_vocab[rows["campaignId"]],
        "platform": np.where(rows["platform"] == 1, "ios", "android"),
        "softwareVersion": version,
        "sourceGameId": games[rows["sourceGameId"]],
        "country": pd.array(np.where(rows["country"] >= 0, countries[np.maximum(rows["country"], 0)],
                                     None), dtype="string"),
        "startCount": rows["startCount"], "viewCount": rows["viewCount"],
        "clickCount": rows["clickCount"], "installCount": rows["installCount"],
        "lastStart": last,
        "startCount1d": rows["startCount1d"], "startCount7d": rows["startCount7d"],
        "connectionType": CONNECTIONS[rows["connectionType"]],
        "deviceType": pd.array(np.where(rows["deviceType"] >= 0,
                                        devices[np.maximum(rows["deviceType"], 0)], None),
                               dtype="string"),
        "install": y,
    }
    frame = pd.DataFrame({k: (v.to_pandas() if isinstance(v, pa.Array) else v)
                          for k, v in data.items()})
    return frame[COLUMNS]
