"""Training and predicting at the same time: a prediction uses one model from start to end, and its
sidecar names that model with the sha256 of the file on disk.

Every run here starts from a champion trained on shuffled labels, so each training promotes a new
champion while predictions are running.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rtb.models import registry

from .faultkit import (
    IN_OPEN,
    Inotify,
    assert_prediction_set,
    deadline,
    expected_probabilities,
    run_rtb,
    start_rtb,
    tail,
)


def _sidecars(paths) -> list[Path]:
    return sorted(paths.predictions_dir.glob("predictions_*.yaml"))


@pytest.mark.parametrize("pause_after_opening", ["champion.yaml", "model"])
def test_prediction_paused_across_a_promotion_keeps_its_model(
    trained, run_cli, tmp_path: Path, pause_after_opening: str
) -> None:
    """Deterministic interleaving: predict is frozen (SIGSTOP) right after it opened the champion
    pointer or the model, a whole training promotes another model, then predict resumes."""
    paths = trained.paths
    registry.promote(paths, trained.worse, previous=None)
    stop_on = "champion.yaml" if pause_after_opening == "champion.yaml" else trained.worse.path.name
    log = tmp_path / "predict.log"

    with Inotify(paths.models_dir, IN_OPEN) as opened:
        predict = start_rtb("predict", "--project-dir", str(paths.root), log=log)
        try:
            started = time.monotonic()
            while stop_on not in opened.names(IN_OPEN):
                assert predict.poll() is None, f"predict exited before opening {stop_on}: {tail(log)}"
                assert time.monotonic() - started < 120, tail(log)
                opened.poll(0.05)
            os.kill(predict.pid, signal.SIGSTOP)
            with deadline(300, "training while predict is paused"):
                trained_now = run_cli("train", "--cv-folds", "2", "--project-dir", str(paths.root))
            assert trained_now.code == 0, trained_now.stderr
            promoted = registry.load_champion_entry(paths)
            assert promoted.path != trained.worse.path, "the training was meant to promote"
        finally:
            os.kill(predict.pid, signal.SIGCONT)
        assert predict.wait(timeout=300) == 0, tail(log)

    (sidecar,) = _sidecars(paths)
    model, probabilities = assert_prediction_set(paths, sidecar)
    assert model == trained.worse.path.name
    assert np.array_equal(probabilities, expected_probabilities(paths, trained.worse))


@pytest.mark.slow
def test_train_and_predict_running_together(trained, tmp_path: Path) -> None:
    """Free-running: a training and back-to-back predictions, a few rounds."""
    paths = trained.paths
    used: dict[str, int] = {}
    for round_ in range(2):
        registry.promote(paths, trained.worse, previous=None)
        train_log = tmp_path / f"train{round_}.log"
        train = start_rtb("train", "--cv-folds", "2", "--project-dir", str(paths.root), log=train_log)
        try:
            while True:
                result = run_rtb("predict", "--project-dir", str(paths.root), log=tmp_path / "predict.log")
                assert result.code == 0, result.stderr
                if train.poll() is not None:
                    break
        finally:
            assert train.wait(timeout=300) == 0, tail(train_log)
        assert registry.load_champion_entry(paths).path != trained.worse.path

    entries = {entry.path.name: entry for entry in _models(paths)}
    for sidecar in _sidecars(paths):
        model, probabilities = assert_prediction_set(paths, sidecar)
        assert np.array_equal(probabilities, expected_probabilities(paths, entries[model]))
        used[model] = used.get(model, 0) + 1
    assert sum(used.values()) >= 2


def _models(paths) -> list[registry.ModelEntry]:
    models = sorted(paths.models_dir.glob("pipeline_*.pkl"))
    return [registry.entry_from_report(paths, path) for path in models]


def test_champion_pointer_is_never_seen_half_written(trained) -> None:
    """Threads promoting two models in turn while others resolve the champion, many times."""
    paths = trained.paths
    known = {trained.worse.path: trained.worse.sha256, trained.champion.path: trained.champion.sha256}
    stop = threading.Event()
    seen: list[registry.ModelEntry] = []
    errors: list[Exception] = []

    def promote_in_turn() -> None:
        try:
            for i in range(150):
                entry = (trained.worse, trained.champion)[i % 2]
                with registry.promotion_lock(paths):
                    registry.promote(paths, entry, previous=None)
        except Exception as exc:  # reported by the main thread
            errors.append(exc)
        finally:
            stop.set()

    def resolve_until_stopped() -> None:
        try:
            while not stop.is_set():
                seen.append(registry.load_champion_entry(paths))
        except Exception as exc:
            errors.append(exc)
            stop.set()

    threads = [threading.Thread(target=promote_in_turn)] + [
        threading.Thread(target=resolve_until_stopped) for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert seen
    assert all(known.get(entry.path) == entry.sha256 for entry in seen)
