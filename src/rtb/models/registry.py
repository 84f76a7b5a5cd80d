"""Model versions on disk, the champion pointer, and verified loading.

A pickle executes code when loaded, so a model is only ever loaded after its sha256 matches
the one its training report recorded. The champion (the default for `rtb predict` and the
scoring service) is named by `models/champion.yaml`, replaced atomically under a file lock,
so a reader sees either the old or the new champion, never a half-promoted one.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import joblib

from rtb.config import MODEL_NAME, ProjectPaths, version_of
from rtb.errors import RtbError
from rtb.io_utils import read_yaml, sha256_file, write_yaml

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelEntry:
    """A model file and the sha256 its report recorded for it."""

    path: Path
    version: str
    sha256: str
    holdout_log_loss: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "version": self.version,
            "model": self.path.name,
            "sha256": self.sha256,
            "holdout_log_loss": self.holdout_log_loss,
        }


def entry_from_report(paths: ProjectPaths, model_path: Path) -> ModelEntry:
    """The model's entry as its training report recorded it."""
    report_path = paths.report_for_model(model_path)
    if not report_path.exists():
        raise RtbError(
            f"{model_path}: no training report {report_path} records its sha256; refusing to load"
        )
    report = read_yaml(report_path)
    artifacts = report.get("artifacts") or {}
    expected = artifacts.get("model_sha256")
    if not expected:
        raise RtbError(f"{report_path}: lacks artifacts.model_sha256; refusing {model_path}")
    holdout = (report.get("selected") or {}).get("holdout_log_loss")
    return ModelEntry(Path(model_path), version_of(model_path), str(expected), holdout)


def load_champion_entry(paths: ProjectPaths) -> ModelEntry:
    """The promoted model, verified to exist and to match its recorded sha256."""
    pointer = paths.champion_pointer
    if not pointer.exists():
        raise RtbError(
            f"{pointer}: no trained model has been promoted yet (run the train DAG or `rtb train`)"
        )
    payload = read_yaml(pointer)
    try:
        entry = ModelEntry(
            paths.models_dir / str(payload["model"]),
            str(payload["version"]),
            str(payload["sha256"]),
            payload.get("holdout_log_loss"),
        )
    except KeyError as exc:
        raise RtbError(f"{pointer}: lacks key {exc.args[0]!r}") from exc
    if not MODEL_NAME.match(str(payload["model"])):
        raise RtbError(f"{pointer}: model {payload['model']!r} is not a pipeline_<version>.pkl in models/")
    recorded = entry_from_report(paths, entry.path)
    if recorded.sha256 != entry.sha256:
        raise RtbError(f"{pointer}: sha256 of {entry.path.name} differs from its training report")
    verify_sha256(entry)
    return entry


def load_scoring_tables(paths: ProjectPaths, entry: ModelEntry) -> object | None:
    """The model's scoring tables if its training report records them and the file matches
    the recorded sha256; None otherwise (a model without tables, or tables that are gone or
    changed, which are said and not loaded: the caller scores with the verified model)."""
    artifacts = read_yaml(paths.report(entry.version)).get("artifacts") or {}
    name, expected = artifacts.get("scoring_tables"), artifacts.get("scoring_tables_sha256")
    if not name or not expected:
        return None
    path = paths.models_dir / str(name)
    if path != paths.scoring_tables(entry.version):
        log.warning("%s: the report names scoring tables %r, not this version's; not loading them",
                    entry.path.name, name)
        return None
    if not path.exists() or sha256_file(path) != expected:
        state = "missing" if not path.exists() else "changed since training (sha256 differs)"
        log.warning("%s: %s; scoring with the model itself", path, state)
        return None
    try:
        return joblib.load(path)
    except (EOFError, OSError, ValueError, KeyError, IndexError, zlib.error, ImportError) as exc:
        log.warning("%s: cannot unpickle (%s: %s); scoring with the model itself", path,
                    type(exc).__name__, exc)
        return None


def verify_sha256(entry: ModelEntry) -> None:
    if not entry.path.exists():
        raise RtbError(f"{entry.path}: model file not found")
    actual = sha256_file(entry.path)
    if actual != entry.sha256:
        raise RtbError(
            f"{entry.path}: sha256 {actual[:12]}... does not match the recorded "
            f"{entry.sha256[:12]}...; the file was modified or truncated, refusing to load it"
        )


def load_verified(entry: ModelEntry) -> object:
    """Unpickle a model only after its sha256 matched; a broken pickle is a one-line error."""
    verify_sha256(entry)
    try:
        return joblib.load(entry.path)
    except (EOFError, OSError, ValueError, KeyError, IndexError, zlib.error, ImportError) as exc:
        reason = f"{type(exc).__name__}: {exc}"
        raise RtbError(f"{entry.path}: cannot unpickle the model ({reason})") from exc


def resolve_model(paths: ProjectPaths, model_path: Path | None) -> ModelEntry:
    """`--model PATH` if given (verified against its report), else the champion."""
    if model_path is None:
        return load_champion_entry(paths)
    if not Path(model_path).exists():
        raise RtbError(f"{model_path}: model file not found")
    entry = entry_from_report(paths, Path(model_path))
    verify_sha256(entry)
    return entry


@contextlib.contextmanager
def promotion_lock(paths: ProjectPaths) -> Iterator[None]:
    """Serialise read-compare-promote between concurrent trainings."""
    paths.models_dir.mkdir(parents=True, exist_ok=True)
    with open(paths.promotion_lock, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def current_champion(paths: ProjectPaths) -> ModelEntry | None:
    """The champion if one is promoted and intact; None when there is none yet."""
    if not paths.champion_pointer.exists():
        return None
    return load_champion_entry(paths)


def promote(paths: ProjectPaths, entry: ModelEntry, previous: ModelEntry | None) -> None:
    """Atomically point the champion at `entry`, remembering the one it replaces."""
    payload = entry.as_dict()
    payload["previous"] = previous.as_dict() if previous else None
    write_yaml(paths.champion_pointer, payload, overwrite=True)
