"""Tunable numbers read from the environment: the one place their names and defaults live.

The Airflow DAGs and `docker-compose.yaml` set these for every task container, so a plan, a
training run and the retention sweep agree on, e.g., how long the training window is.
"""

from __future__ import annotations

import os

from rtb.errors import RtbError

TRAIN_WINDOW_DAYS_ENV = "RTB_TRAIN_WINDOW_DAYS"
RETENTION_DAYS_ENV = "RTB_RETENTION_DAYS"
DRIFT_PSI_ENV = "RTB_DRIFT_PSI"
DRIFT_UNSEEN_SHARE_ENV = "RTB_DRIFT_UNSEEN_SHARE"
DRIFT_MIN_ROWS_ENV = "RTB_DRIFT_MIN_ROWS"
QUALITY_CALIBRATION_LOW_ENV = "RTB_QUALITY_CALIBRATION_LOW"
QUALITY_CALIBRATION_HIGH_ENV = "RTB_QUALITY_CALIBRATION_HIGH"

DEFAULT_TRAIN_WINDOW_DAYS = 7
DEFAULT_RETENTION_DAYS = 30
DEFAULT_DRIFT_PSI = 0.2
# Long-tail ids (tens of thousands of source games) always bring levels a model has not
# seen: an unseen share is drift only by how far it exceeds the rate of new levels the
# training window itself showed (its latest day against the days before).
DEFAULT_DRIFT_UNSEEN_SHARE = 0.1
DEFAULT_DRIFT_MIN_ROWS = 500
DEFAULT_QUALITY_CALIBRATION = (0.9, 1.1)


def _env(name: str, default: float, parse: type, what: str) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        return parse(text)
    except ValueError:
        raise RtbError(f"${name}: expected {what}, got {text!r}") from None


def env_int(name: str, default: int, *, minimum: int = 1) -> int:
    """An integer setting; a value that is not one is a one-line error naming the variable."""
    value = int(_env(name, default, int, "an integer"))
    if value < minimum:
        raise RtbError(f"${name}: expected an integer >= {minimum}, got {value}")
    return value


def env_float(name: str, default: float) -> float:
    """A positive number setting; a value that is not one is a one-line error naming the variable."""
    value = float(_env(name, default, float, "a number"))
    if not value > 0:
        raise RtbError(f"${name}: expected a number > 0, got {value:g}")
    return value


def train_window_days() -> int:
    """Days of labels one training run uses ($RTB_TRAIN_WINDOW_DAYS, default 7)."""
    return env_int(TRAIN_WINDOW_DAYS_ENV, DEFAULT_TRAIN_WINDOW_DAYS)


def retention_days() -> int:
    """Days raw partitions and their copies are kept ($RTB_RETENTION_DAYS, default 30)."""
    return env_int(RETENTION_DAYS_ENV, DEFAULT_RETENTION_DAYS)


EXTRA_CANDIDATES_ENV = "RTB_EXTRA_CANDIDATES"


def extra_candidates() -> tuple[str, ...]:
    """Optional candidates training adds to the default ones ($RTB_EXTRA_CANDIDATES, names
    separated by commas, e.g. blend_target_encoded; default none). The names are checked
    where the candidates are known (`rtb.models.make_training`)."""
    text = os.environ.get(EXTRA_CANDIDATES_ENV, "")
    return tuple(name.strip() for name in text.split(",") if name.strip())


PUBLISH_REDIS_URL_ENV = "RTB_PUBLISH_REDIS_URL"
PUBLISH_TTL_SECONDS_ENV = "RTB_PUBLISH_TTL_SECONDS"


def publish_redis_url() -> str | None:
    """Where `rtb publish` writes scores ($RTB_PUBLISH_REDIS_URL); unset: publishing is off."""
    return os.environ.get(PUBLISH_REDIS_URL_ENV, "").strip() or None


def publish_ttl_seconds(default: int) -> int:
    """How long published scores live in Redis ($RTB_PUBLISH_TTL_SECONDS)."""
    return env_int(PUBLISH_TTL_SECONDS_ENV, default)
