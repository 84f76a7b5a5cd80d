"""Publish prediction sets to Redis, so other backend services read a score by request id.

A bidder's other services (pacing, reporting, the auction log) want the probability of a
request without reading our files: each id becomes a key `<prefix>score:<id>` whose value is
the JSON `{"p": <probability>, "model": "<model version>"}`, with a TTL (scores of old
requests are worth nothing). Writes are pipelined, `batch_rows` keys per round trip.

Idempotent per set: after the last key, a marker `<prefix>published:<set name>` records the
set's version. Publishing a set whose marker already holds its version writes nothing; a set
that was re-scored (new version) is written again over the same keys. Keys are only ever
overwritten, never deleted first, so a publish that fails half way leaves every key readable,
with either the old or the new score, and its marker unset, so the next attempt writes it all.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from rtb import partitions
from rtb.config import ProjectPaths
from rtb.errors import RtbError
from rtb.prediction_sets import PredictionSet, latest_test_set, partition_set

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

DEFAULT_KEY_PREFIX = "rtb:"
DEFAULT_TTL_SECONDS = 2 * 24 * 3600
DEFAULT_BATCH_ROWS = 10_000
# One round trip and one reply per batch, instead of one of each per key: SET with EX for
# every key of the batch, inside Redis. ARGV[1] is the TTL, ARGV[i + 1] the value of KEYS[i].
SET_BATCH_SCRIPT = """
local ttl = ARGV[1]
for i = 1, #KEYS do
    redis.call('SET', KEYS[i], ARGV[i + 1], 'EX', ttl)
end
return #KEYS
"""


class PublishFailed(RuntimeError):
    """Redis refused or lost a write. Not an `RtbError`: it may pass, so Airflow retries."""


@dataclass(frozen=True)
class PublishOptions:
    """Where and how long: the key prefix, the keys' TTL and the pipeline's batch size."""

    ttl_seconds: int = DEFAULT_TTL_SECONDS
    key_prefix: str = DEFAULT_KEY_PREFIX
    batch_rows: int = DEFAULT_BATCH_ROWS

    def score_key(self, request_id: str) -> str:
        return f"{self.key_prefix}score:{request_id}"

    def marker_key(self, set_name: str) -> str:
        return f"{self.key_prefix}published:{set_name}"


@dataclass(frozen=True)
class PublishResult:
    """What one publish did: keys written (0 when the set was already published) and seconds."""

    set_name: str
    set_version: str
    model_version: str
    keys: int
    seconds: float
    skipped: bool

    @property
    def keys_per_second(self) -> float:
        return self.keys / self.seconds if self.seconds > 0 else float("nan")


def score_value(probability: float, model_version: str) -> str:
    """The value stored under a request id's key (repr keeps every bit of the float)."""
    return f'{{"p":{probability!r},"model":"{model_version}"}}'


def publish_set(
    client: redis.Redis, found: PredictionSet, set_name: str, options: PublishOptions
) -> PublishResult:
    """Write every id of a complete prediction set, then its marker; skip a published one."""
    started = time.perf_counter()
    sidecar = found.read_sidecar()
    set_version = str(sidecar.get("version"))
    model_version = found.model_version
    marker = options.marker_key(set_name)
    if client.get(marker) == set_version.encode():
        log.info("%s (version %s) is already published; nothing written", set_name, set_version)
        return PublishResult(set_name, set_version, model_version, 0,
                             time.perf_counter() - started, skipped=True)
    table = found.read_scored()
    ids = table.column("id").to_pylist()
    probabilities = table.column("probability").to_pylist()
    if sidecar.get("rows") is not None and int(sidecar["rows"]) != len(ids):
        raise RtbError(f"{found.scored_ids}: {len(ids)} rows, expected {sidecar['rows']} as its "
                       "sidecar says; run `rtb predict` again")
    import redis

    ttl = options.ttl_seconds
    set_batch = client.register_script(SET_BATCH_SCRIPT)
    done = 0
    try:
        for start in range(0, len(ids), options.batch_rows):
            stop = min(start + options.batch_rows, len(ids))
            keys = [options.score_key(request_id) for request_id in ids[start:stop]]
            values = [score_value(probability, model_version) for probability in probabilities[start:stop]]
            set_batch(keys=keys, args=[ttl, *values])
            done = stop
        client.set(marker, set_version, ex=ttl)
    except redis.RedisError as exc:
        raise PublishFailed(
            f"{set_name}: publish failed after {done} of {len(ids)} keys ({exc}); the keys "
            "written hold the new scores, every other key its previous one; run it again"
        ) from exc
    seconds = time.perf_counter() - started
    result = PublishResult(set_name, set_version, model_version, len(ids), seconds, skipped=False)
    log.info("%s: published %d scores of model %s in %.1f s (%.0f keys/s, TTL %d s)", set_name,
             result.keys, model_version, seconds, result.keys_per_second, ttl)
    return result


def run_publish(
    paths: ProjectPaths, client: redis.Redis, options: PublishOptions,
    *, interval: tuple[datetime, datetime] | None,
) -> list[PublishResult]:
    """CLI stage: publish the sets of an interval's request partitions (or, without an
    interval, the newest single-file set). A partition with no set (its run was skipped or
    has not scored yet) is named in the log and left out; no set at all is an error."""
    if interval is None:
        found = latest_test_set(paths)
        if found is None:
            raise RtbError(f"{paths.predictions_dir}: no prediction set to publish "
                           "(run `rtb predict` first)")
        return [publish_set(client, found, found.sidecar.stem, options)]
    names = [partitions.request_name(hour) for hour in partitions.hours_between(*interval)]
    sets = {name: partition_set(paths, name) for name in names}
    missing = [name for name, found in sets.items() if found is None]
    if len(missing) == len(names):
        raise RtbError(f"{paths.predictions_dir}: none of the interval's {len(names)} partition(s) "
                       f"has a prediction set (expected {names[0]}...); run `rtb predict` first")
    if missing:
        log.warning("no prediction set for %d of %d partition(s), not published: %s",
                    len(missing), len(names), ", ".join(missing))
    results = [publish_set(client, found, name, options) for name, found in sets.items() if found]
    written = sum(r.keys for r in results)
    seconds = sum(r.seconds for r in results)
    log.info("publish: %d set(s), %d written, %d already published; %d keys in %.1f s",
             len(results), sum(not r.skipped for r in results), sum(r.skipped for r in results),
             written, seconds)
    return results


def connect(url: str) -> redis.Redis:
    """A client for `url` (redis://host:port/db), checked with a PING so that a wrong address
    fails here, before any key is written."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10)
    except ValueError as exc:
        raise RtbError(f"--redis-url {url!r}: {exc}") from None
    client.ping()  # a connection error propagates: it may pass, so the task is retried
    return client
