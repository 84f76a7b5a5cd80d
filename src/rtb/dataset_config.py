"""Column roles of a raw dataset, loaded from YAML, so that one pipeline serves several logs.

The default is the RTB schema (`configs/rtb.yaml`); `configs/talkingdata.yaml` describes the
public TalkingData click log and `configs/avazu.yaml` the Avazu CTR log (its hour written as
YYMMDDHH, declared with `timestamp_format`). Pass another file with `--dataset-config` or
`RTB_DATASET_CONFIG`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path

from rtb.data.timestamp_formats import check_format
from rtb.errors import RtbError
from rtb.io_utils import read_yaml

BUILTIN_CONFIGS = ("rtb", "talkingdata", "avazu")
ROW_ID = "row_id"
HOUR_OF_DAY = ("hour", "hour_of_day")  # the derived feature's name, and the one if a raw column has it


@dataclass(frozen=True)
class DatasetConfig:
    """Which raw column plays which role."""

    name: str
    separator: str
    files: dict[str, str]
    id: str | None
    timestamp: str
    target: str
    categorical: list[str]
    numerical: list[str]
    datetimes: dict[str, str] = field(default_factory=dict)
    drop: list[str] = field(default_factory=list)
    crosses: list[list[str]] = field(default_factory=list)
    non_negative: list[str] = field(default_factory=list)
    # None: ISO 8601; else a strptime pattern or epoch_s / epoch_ms (rtb.data.timestamp_formats)
    timestamp_format: str | None = None
    source: str = "<builtin>"

    @property
    def id_column(self) -> str:
        """The id column in processed data (`row_id` when the raw log has none)."""
        return self.id or ROW_ID

    def raw_columns(self, split: str) -> list[str]:
        """Columns a raw file of `split` must have; test files carry no target."""
        cols = ([self.id] if self.id else []) + [self.timestamp]
        cols += self.categorical + self.numerical + list(self.datetimes)
        if split == "train":
            cols.append(self.target)
        return cols

    @property
    def derived_numerical(self) -> list[str]:
        """Numeric features the preprocessing stage adds (recency, hour of day).

        No weekday: a training window of days to weeks cannot teach a weekday effect, and a
        test day whose weekday training never saw gets an extrapolated guess.
        """
        recency = list(self.datetimes.values())
        return recency + [f"{name}_missing" for name in recency] + [self.hour_feature]

    @property
    def hour_feature(self) -> str:
        """The hour-of-day feature's name: `hour`, or `hour_of_day` in a log that has a column
        named `hour` (Avazu's timestamp is)."""
        return HOUR_OF_DAY[0] if HOUR_OF_DAY[0] not in self.raw_columns("train") else HOUR_OF_DAY[1]

    @property
    def feature_numerical(self) -> list[str]:
        return self.numerical + self.derived_numerical

    @property
    def feature_columns(self) -> list[str]:
        """What the model pipeline reads from a processed frame."""
        return self.categorical + self.feature_numerical


def load_dataset_config(name_or_path: str | Path | None = None) -> DatasetConfig:
    """Load a builtin config by name (`rtb`, `talkingdata`) or a YAML file by path."""
    name_or_path = name_or_path or "rtb"
    if str(name_or_path) in BUILTIN_CONFIGS:
        resource = resources.files("rtb") / "configs" / f"{name_or_path}.yaml"
        with resources.as_file(resource) as path:
            payload, source = read_yaml(path), str(name_or_path)
    else:
        payload, source = read_yaml(Path(name_or_path)), str(name_or_path)
    required = ["name", "separator", "files", "timestamp", "target", "categorical", "numerical"]
    missing = [key for key in required if key not in payload]
    if missing:
        raise RtbError(f"{source}: dataset config lacks required keys {missing}")
    payload.setdefault("id", None)
    payload["datetimes"] = dict(payload.get("datetimes") or {})
    payload["drop"] = list(payload.get("drop") or [])
    payload["crosses"] = [list(c) for c in payload.get("crosses") or []]
    payload["non_negative"] = list(payload.get("non_negative") or [])
    unknown = sorted(set(payload) - {f.name for f in fields(DatasetConfig)} - {"source"})
    if unknown:
        raise RtbError(f"{source}: dataset config has unknown keys {unknown}")
    if payload.get("timestamp_format") is not None:
        payload["timestamp_format"] = str(payload["timestamp_format"])
        check_format(payload["timestamp_format"], source)
    config = DatasetConfig(source=source, **payload)
    _check_roles(config)
    return config


def _check_roles(config: DatasetConfig) -> None:
    roles = config.raw_columns("train")
    duplicated = sorted({c for c in roles if roles.count(c) > 1})
    if duplicated:
        raise RtbError(f"{config.source}: columns {duplicated} have more than one role")
    leaked = sorted(set(config.drop) & set(roles))
    if leaked:
        raise RtbError(f"{config.source}: columns {leaked} are both dropped and used")
    clash = sorted(set(config.derived_numerical) & set(roles + config.drop))
    if clash:
        raise RtbError(f"{config.source}: derived feature name(s) {clash} are also raw columns")
    stray = sorted(set(config.non_negative) - set(config.numerical))
    if stray:
        raise RtbError(f"{config.source}: non_negative names non-numerical column(s) {stray}")
    for cross in config.crosses:
        unknown = [c for c in cross if c not in config.categorical]
        if unknown or len(cross) < 2:
            raise RtbError(f"{config.source}: cross {cross} must name 2+ categorical columns")
