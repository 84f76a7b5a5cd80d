"""The champion/challenger file (`models/ab.yaml`) and the sticky arm of a request id.

The file is small and versioned, so that a later format can be told apart:

    version: 1
    challenger: 20240102T000000Z   # a model version in models/ (its report records its sha256)
    mode: split                    # split: the challenger answers `share` of the ids
    share: 0.1                     # shadow: it scores `share` of them (default 1) unseen

A request's arm depends only on its id (the first row's id for a list), through blake2b of
the id's UTF-8 bytes: the same id gets the same arm in every process and after every restart
(Python's `hash()` is salted per process, so it would not do). A request without an id is
the champion's. No file means champion only.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from rtb.config import VERSION_PATTERN
from rtb.errors import RtbError
from rtb.io_utils import read_yaml

AB_FILE = "ab.yaml"
FORMAT_VERSION = 1
SPLIT, SHADOW = "split", "shadow"
CHAMPION, CHALLENGER = "champion", "challenger"
KEYS = {"version", "challenger", "mode", "share"}
_SCALE = float(1 << 64)
_VERSION = re.compile(rf"^{VERSION_PATTERN}$")


@dataclass(frozen=True)
class AbConfig:
    """What `models/ab.yaml` asks for: which version challenges, how, and for which ids."""

    challenger: str
    mode: str
    share: float

    def picks_challenger(self, request_id: object) -> bool:
        """Whether this id falls in the challenger's share (split: it answers; shadow: it
        is also scored by the challenger)."""
        return request_id is not None and bucket(request_id) < self.share

    def as_dict(self) -> dict[str, object]:
        return {"version": FORMAT_VERSION, "challenger": self.challenger, "mode": self.mode,
                "share": self.share}


def ab_path(models_dir: Path) -> Path:
    return models_dir / AB_FILE


def bucket(request_id: object) -> float:
    """A number in [0, 1) that depends only on the id's text: the sticky arm's draw."""
    digest = hashlib.blake2b(str(request_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SCALE


def parse_ab(path: Path) -> AbConfig:
    """The file's config, or RtbError naming the file, the field and what was expected."""
    payload = read_yaml(path)
    unknown = sorted(set(payload) - KEYS)
    if unknown:
        raise RtbError(f"{path}: unknown field {unknown[0]!r}; expected only "
                       f"{', '.join(sorted(KEYS))}")
    if payload.get("version") != FORMAT_VERSION:
        raise RtbError(f"{path}: field 'version': expected {FORMAT_VERSION}, "
                       f"got {payload.get('version')!r}")
    challenger = payload.get("challenger")
    if not isinstance(challenger, str) or not _VERSION.match(challenger):
        raise RtbError(f"{path}: field 'challenger': expected a model version such as "
                       f"20240102T000000Z, got {challenger!r}")
    mode = payload.get("mode", SPLIT)
    if mode not in (SPLIT, SHADOW):
        raise RtbError(f"{path}: field 'mode': expected {SPLIT!r} or {SHADOW!r}, got {mode!r}")
    share = payload.get("share", None if mode == SPLIT else 1.0)
    if share is None:
        raise RtbError(f"{path}: field 'share': expected a number in [0, 1] for mode split, "
                       "got none")
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0 <= share <= 1:
        raise RtbError(f"{path}: field 'share': expected a number in [0, 1], got {share!r}")
    return AbConfig(challenger, mode, float(share))
