"""The loaded model and the swap to a newly promoted one, independent of HTTP.

A `LoadedModel` is immutable and complete (verified pickle, verified scorer, report facts);
the service holds exactly one reference to the current one. A request reads that reference
once and scores with it to the end, so a swap never mixes two models in one response and
never makes a request wait: the new model is built and checked on the side, then the
reference is replaced in one assignment. A new model that fails to load or verify is logged
and the old one keeps serving.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from rtb.config import ProjectPaths, version_time
from rtb.dataset_config import DatasetConfig
from rtb.errors import RtbError
from rtb.io_utils import read_yaml
from rtb.models import registry
from rtb.serving.ab import AbConfig, ab_path, parse_ab
from rtb.serving.scorer import Scorer, build_scorer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """One model ready to serve: its registry entry, scorer and what its report says."""

    entry: registry.ModelEntry
    scorer: Scorer
    report: dict[str, object]
    loaded_at: str

    @property
    def version(self) -> str:
        return self.entry.version

    def describe(self) -> dict[str, object]:
        """The facts `GET /model` shows."""
        calibration = self.report.get("calibration") or {}
        return {
            "version": self.entry.version,
            "file": self.entry.path.name,
            "sha256": self.entry.sha256,
            "trained_at": trained_at(self.entry.version),
            "model_type": self.report.get("model"),
            "holdout": self.report.get("holdout"),
            "cv_log_loss": ((self.report.get("cv") or {}).get("log_loss")),
            "calibration": {
                key: calibration.get(key) for key in ("method", "slope", "intercept")
            } if calibration else None,
            "training_seconds": self.report.get("training_seconds"),
            "scorer": self.scorer.kind,
            "scorer_reason": self.scorer.reason,
            "scorer_build_seconds": round(self.scorer.build_seconds, 3),
            "loaded_at": self.loaded_at,
        }


def trained_at(version: str) -> str | None:
    """The version's training time in ISO 8601."""
    moment = version_time(version)
    return moment.isoformat() if moment else None


def trained_at_seconds(version: str) -> float | None:
    """The version's training time as a Unix timestamp (what a model's age is counted from)."""
    moment = version_time(version)
    return moment.timestamp() if moment else None


def load_model(paths: ProjectPaths, entry: registry.ModelEntry, cfg: DatasetConfig, *,
               try_compile: bool = True) -> LoadedModel:
    """Verify, unpickle, build and check the scorer; RtbError with one line if anything fails."""
    pipeline = registry.load_verified(entry)
    if not hasattr(pipeline, "predict_proba"):
        raise RtbError(f"{entry.path}: holds a {type(pipeline).__name__}, not a scoring pipeline")
    scorer = build_scorer(pipeline, cfg, try_compile=try_compile)
    report: dict[str, object] = {}
    try:
        report_path = paths.report(entry.version)
        if report_path.exists():
            report = read_yaml(report_path)
    except RtbError as exc:
        log.warning("model %s: report unreadable (%s)", entry.version, exc)
    log.info(
        "loaded model %s (%s, sha256 %s...) with the %s scorer in %.2f s: %s",
        entry.version, report.get("model", "?"), entry.sha256[:12], scorer.kind,
        scorer.build_seconds, scorer.reason,
    )
    return LoadedModel(entry, scorer, report, datetime.now(UTC).isoformat(timespec="seconds"))


@dataclass
class ReloadResult:
    """What one reload attempt did; `error` is a one-line reason when it failed."""

    reloaded: bool
    version: str
    previous: str | None = None
    error: str | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "reloaded": self.reloaded,
            "model": self.version,
            "previous": self.previous,
            "error": self.error,
            "detail": self.detail,
        }


@dataclass(frozen=True)
class Challenger:
    """The A/B file's config and the challenger model it names, swapped as one reference."""

    config: AbConfig
    model: LoadedModel

    def describe(self) -> dict[str, object]:
        return {**self.config.as_dict(), "scorer": self.model.scorer.kind,
                "sha256": self.model.entry.sha256, "loaded_at": self.model.loaded_at}


@dataclass
class ScoringService:
    """The current model and how to replace it when the champion pointer changes; the
    challenger and how it follows `models/ab.yaml` (the same way)."""

    paths: ProjectPaths
    cfg: DatasetConfig
    current: LoadedModel
    pinned: bool = False
    try_compile: bool = True
    last_error: str | None = None
    challenger: Challenger | None = None
    last_ab_error: str | None = None
    _pointer_seen: tuple[int, int, int] | None = None
    _ab_seen: tuple[int, int, int] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def start(cls, paths: ProjectPaths, cfg: DatasetConfig, *, model_path: Path | None,
              try_compile: bool = True) -> ScoringService:
        """Load the champion (or `model_path`, which pins the service to it) or raise RtbError."""
        pointer = _pointer_signature(paths.champion_pointer)
        entry = registry.resolve_model(paths, model_path)
        service = cls(
            paths, cfg, load_model(paths, entry, cfg, try_compile=try_compile),
            pinned=model_path is not None, try_compile=try_compile,
        )
        service._pointer_seen = pointer
        service._ab_seen = _pointer_signature(service.ab_file)
        if service._ab_seen is not None:  # a broken A/B file is an error before listening
            config = parse_ab(service.ab_file)
            service.challenger = Challenger(config, service._challenger_model(config))
        _freeze_heap()
        return service

    @property
    def ab_file(self) -> Path:
        return ab_path(self.paths.models_dir)

    def reload_ab(self, *, force: bool = False) -> ReloadResult:
        """Follow `models/ab.yaml` as `reload` follows the champion pointer: a changed file
        is parsed and its challenger loaded on the side, then swapped in one assignment; a
        missing file means champion only; a broken one is logged and the old arms stay."""
        with self._lock:
            before = self.challenger
            name = before.model.version if before else "none"
            signature = _pointer_signature(self.ab_file)
            if not force and signature == self._ab_seen:
                return ReloadResult(False, name, detail="A/B file unchanged")
            self._ab_seen = signature
            if signature is None:
                self.challenger, self.last_ab_error = None, None
                if before is not None:
                    log.info("A/B file %s removed: champion only", self.ab_file)
                return ReloadResult(before is not None, "none", previous=name,
                                    detail="no A/B file: champion only")
            try:
                config = parse_ab(self.ab_file)
                if before is not None and before.config == config:
                    self.last_ab_error = None
                    return ReloadResult(False, name, detail="A/B config unchanged")
                loaded = self._challenger_model(config, before)
            except RtbError as exc:
                self.last_ab_error = str(exc)
                log.error("A/B reload failed, arms unchanged: %s", exc)
                return ReloadResult(False, name, error=str(exc), detail="kept the current arms")
            self.challenger = Challenger(config, loaded)  # the swap: one reference assignment
            self.last_ab_error = None
            _freeze_heap()
            log.info("A/B: challenger %s, mode %s, share %g (was %s)", config.challenger,
                     config.mode, config.share, name)
            return ReloadResult(True, config.challenger, previous=name, detail=config.mode)

    def _challenger_model(self, config: AbConfig, before: Challenger | None = None) -> LoadedModel:
        """The challenger's model: reused when already loaded (or when it is the champion),
        else verified against its training report and loaded."""
        try:
            entry = registry.resolve_model(self.paths, self.paths.model(config.challenger))
        except RtbError as exc:
            raise RtbError(f"{self.ab_file}: field 'challenger': {exc}") from exc
        for loaded in (before.model if before else None, self.current):
            if loaded is not None and loaded.entry.sha256 == entry.sha256:
                return loaded
        return load_model(self.paths, entry, self.cfg, try_compile=self.try_compile)

    def reload(self, *, force: bool = False) -> ReloadResult:
        """Swap to the champion if it changed. Blocking: run it off the event loop.

        Without `force` the pointer file's (inode, mtime, size) decides whether to look at
        all, so the background poll costs one stat() per period; a pointer that failed to
        load is not retried until it changes again (or a forced reload asks).
        """
        with self._lock:
            current = self.current
            if self.pinned:
                return ReloadResult(False, current.version, detail="pinned by --model; no reload")
            pointer = _pointer_signature(self.paths.champion_pointer)
            if not force and pointer == self._pointer_seen:
                return ReloadResult(False, current.version, detail="champion unchanged")
            self._pointer_seen = pointer
            started = time.perf_counter()
            try:
                entry = registry.load_champion_entry(self.paths)
                if entry.sha256 == current.entry.sha256 and entry.path == current.entry.path:
                    self.last_error = None
                    return ReloadResult(False, current.version, detail="champion unchanged")
                loaded = load_model(self.paths, entry, self.cfg, try_compile=self.try_compile)
            except RtbError as exc:
                self.last_error = str(exc)
                log.error("reload failed, still serving %s: %s", current.version, exc)
                return ReloadResult(False, current.version, error=str(exc),
                                    detail="kept the current model")
            self.current = loaded  # the swap: one reference assignment
            self.last_error = None
            _freeze_heap()
            log.info("now serving model %s (was %s); reload took %.2f s", loaded.version,
                     current.version, time.perf_counter() - started)
            return ReloadResult(True, loaded.version, previous=current.version,
                                detail=f"swapped in {time.perf_counter() - started:.2f} s")


def _pointer_signature(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _freeze_heap() -> None:
    """Exempt the loaded model from cyclic GC passes.

    A compiled model is millions of small objects (lookup dicts, floats, code); a full GC
    pass walking them takes tens of milliseconds, a latency spike for whichever request it
    lands on. Frozen objects are still freed by reference counting when a model is replaced.
    """
    gc.freeze()
