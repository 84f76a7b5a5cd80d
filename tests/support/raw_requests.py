"""Synthetic raw request rows (RTB schema) for tests, probes of a live service and load tests.

They are deliberately awkward: several UTC offsets, gaps as None and as absent keys, ints
where the log has digit strings, negative counts, recency missing or in the future, and,
on request, levels no model has seen. Deterministic for a given seed.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import numpy as np

START = datetime(2019, 1, 1, tzinfo=UTC)
OFFSETS = (UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5, minutes=-30)))
COUNTS = {
    "startCount": 30.0,
    "viewCount": 20.0,
    "clickCount": 2.0,
    "installCount": 0.5,
    "startCount1d": 2.0,
    "startCount7d": 6.0,
}


def iso(moment: datetime, rng: np.random.Generator) -> str:
    """ISO text as the raw log writes it, in UTC most of the time, else another offset."""
    zone = OFFSETS[0] if rng.random() < 0.8 else OFFSETS[int(rng.integers(1, len(OFFSETS)))]
    return moment.astimezone(zone).isoformat(sep=" ", timespec="microseconds")


def _zipf(rng: np.random.Generator, levels: int) -> int:
    return int(min(rng.zipf(1.3), levels))


def raw_rows(n: int, seed: int, *, unseen: float = 0.0, days: float = 14.0,
             start: datetime = START) -> list[dict[str, object]]:
    """`n` raw rows in time order; `unseen` is the share of categoricals with novel levels."""
    rng = np.random.default_rng(seed)
    seconds = np.sort(rng.uniform(0, days * 86400, n))
    rows: list[dict[str, object]] = []

    def text(prefix: str, levels: int) -> str | None:
        if rng.random() < 0.03:
            return None
        level = _zipf(rng, levels)
        return f"new-{prefix}{level}" if rng.random() < unseen else f"{prefix}{level}"

    for number, offset in enumerate(seconds):
        stamp = start + timedelta(seconds=float(offset))
        game: object = _zipf(rng, 200)
        if rng.random() < unseen:
            game = 90000 + int(game)  # type: ignore[call-overload]
        game = None if rng.random() < 0.03 else (game if rng.random() < 0.3 else str(game))
        platform = "ios" if rng.random() < 0.4 else "android"
        row: dict[str, object] = {
            "id": f"{seed:x}-{number:08x}",
            "timestamp": iso(stamp, rng),
            "campaignId": text("c", 60),
            "platform": None if rng.random() < 0.03 else platform,
            "softwareVersion": text("v", 30),
            "sourceGameId": game,
            "country": text("C", 25),
            "connectionType": text("net", 3),
            "deviceType": text("d", 100),
        }
        for name, scale in COUNTS.items():
            draw = rng.random()
            if draw < 0.04:
                row[name] = None
            elif draw < 0.06:
                row[name] = float(rng.uniform(-3.0, 0.0))
            elif draw < 0.5:
                row[name] = int(rng.poisson(scale))
            else:
                row[name] = float(np.round(rng.exponential(scale), 3))
            if rng.random() < 0.08:
                del row[name]
        draw = rng.random()
        if draw < 0.2:
            row["lastStart"] = None
        elif draw >= 0.25:
            hours = float(rng.exponential(30.0)) * (-0.1 if rng.random() < 0.02 else 1.0)
            earlier = stamp - timedelta(hours=hours, microseconds=int(rng.integers(0, 10**6)))
            row["lastStart"] = iso(earlier, rng)
        rows.append(row)
    return rows
