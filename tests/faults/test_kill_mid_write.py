"""SIGKILL in the middle of a write: the real `rtb` process is killed the moment its temp file
appears (inotify), so the kill lands while the artifact is being written.

Nothing may be lost: every final file that existed is byte-identical, no partial file carries a
final name, the champion pointer is untouched, the next run succeeds and never opens the
`.tmp-*` leftover. A young leftover stays (the next writer removes it only once it is older than
io_utils.STALE_TMP_SECONDS and unlocked: see tests/unit/test_io_utils.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from rtb.config import version_of
from rtb.io_utils import sha256_file
from rtb.models.registry import load_champion_entry

from .faultkit import (
    BIG_TEST_ROWS,
    IN_OPEN,
    Inotify,
    assert_unchanged,
    deadline,
    error_line,
    final_files,
    kill_mid_write,
    tmp_files,
)


def test_kill_while_writing_the_processed_csv(big_project, run_cli, tmp_path: Path) -> None:
    paths = big_project.paths
    root = paths.root
    killed = kill_mid_write(
        root,
        ("preprocess", "--split", "test", "--project-dir", str(root)),
        paths.processed_dir,
        lambda name: name.startswith(".tmp-test_df.csv."),
        tmp_path / "rtb.log",
    )

    after = final_files(root)
    assert_unchanged(killed.before, after)
    assert set(after) == set(killed.before), "a new file appeared under a final name"
    partial_bytes = killed.tmp.stat().st_size

    # The next run, and the stage reading its output, never open the leftover.
    with Inotify(paths.processed_dir, IN_OPEN) as opened:
        rerun = run_cli("preprocess", "--split", "test", "--project-dir", str(root))
        assert rerun.code == 0, rerun.stderr
        scored = run_cli("predict", "--project-dir", str(root))
        assert scored.code == 0, scored.stderr
    assert "test_df.arrow" in opened.names(IN_OPEN)  # the hand-over predict reads
    assert killed.tmp.name not in opened.names(IN_OPEN)
    # The rerun rebuilds the very same bytes: the kill cost time, not data.
    assert sha256_file(paths.processed("test")) == killed.before["data/processed/test_df.csv"]
    assert partial_bytes < paths.processed("test").stat().st_size, "the kill was not mid-write"
    assert killed.tmp.exists(), "a young leftover is not cleaned up (it may be a live write)"


@pytest.mark.parametrize(
    ("folder_name", "prefix"),
    [("models", ".tmp-pipeline_"), ("reports", ".tmp-report_")],
    ids=["model pickle", "report, under the promotion lock"],
)
def test_kill_while_training_writes(trained, run_cli, tmp_path: Path, folder_name, prefix) -> None:
    paths = trained.paths
    root = paths.root
    folder = paths.models_dir if folder_name == "models" else paths.reports_dir
    train = ("train", "--cv-folds", "2", "--project-dir", str(root))
    killed = kill_mid_write(root, train, folder, lambda name: name.startswith(prefix), tmp_path / "rtb.log")

    after = final_files(root)
    assert_unchanged(killed.before, after)  # champion.yaml, earlier models and reports included
    new = sorted(set(after) - set(killed.before))
    if folder_name == "models":
        assert new == [], new
    else:
        # Killed after the pickle (and its scoring tables) were renamed into place, before
        # promotion: the pickle is complete, and its report (when it got that far) records
        # its sha256.
        models = [name for name in new if name.startswith("models/pipeline_")]
        assert len(models) == 1, new
        model = root / models[0]
        beside = [name for name in new if name.startswith("models/") and name not in models]
        assert beside in ([], [f"models/{paths.scoring_tables(version_of(model)).name}"]), new
        report = paths.report(version_of(model))
        if report.exists():
            recorded = yaml.safe_load(report.read_text())["artifacts"]["model_sha256"]
            assert recorded == sha256_file(model)
        else:
            refused = run_cli("predict", "--model", str(model), "--project-dir", str(root))
            assert refused.code == 1
            assert "no training report" in error_line(refused.stderr)
    champion = load_champion_entry(paths)
    assert (champion.path, champion.sha256) == (trained.champion.path, trained.champion.sha256)

    # The next run succeeds (the dead run's promotion lock died with it) and opens no leftover.
    stale = tmp_files(paths.models_dir) | tmp_files(paths.reports_dir)
    assert killed.tmp.name in stale
    with (
        Inotify(paths.models_dir, IN_OPEN) as models_opened,
        Inotify(paths.reports_dir, IN_OPEN) as reports_opened,
        deadline(300, "the training after a killed one"),
    ):
        rerun = run_cli(*train)
        assert rerun.code == 0, rerun.stderr
        checked = run_cli("check-model", "--project-dir", str(root))
        assert checked.code == 0, checked.stderr
    opened = models_opened.names(IN_OPEN) | reports_opened.names(IN_OPEN)
    assert not opened & stale, opened & stale
    # Same data and seed as the champion: not better, so the default model is still the same.
    champion = load_champion_entry(paths)
    assert (champion.path, champion.sha256) == (trained.champion.path, trained.champion.sha256)
    assert killed.tmp.exists()


def test_kill_while_predict_writes_the_csv(big_project, run_cli, tmp_path: Path) -> None:
    paths = big_project.paths
    root = paths.root
    killed = kill_mid_write(
        root,
        ("predict", "--project-dir", str(root)),
        paths.predictions_dir,
        lambda name: name.startswith(".tmp-predictions_") and ".csv." in name,
        tmp_path / "rtb.log",
    )
    version = killed.final.name.removeprefix("predictions_").removesuffix(".csv")

    after = final_files(root)
    assert_unchanged(killed.before, after)
    new = set(after) - set(killed.before)
    # The .npy and the .csv are written side by side, chunk by chunk, each into its own temp
    # file: a kill leaves neither in place, and no sidecar (written last, it makes a set).
    assert new == set(), new
    assert not (paths.predictions_dir / f"predictions_{version}.npy").exists()

    with Inotify(paths.predictions_dir, IN_OPEN) as opened:
        rerun = run_cli("predict", "--project-dir", str(root))
        assert rerun.code == 0, rerun.stderr
    assert killed.tmp.name not in opened.names(IN_OPEN)
    sidecars = sorted(paths.predictions_dir.glob("predictions_*.yaml"))
    assert len(sidecars) == 1
    sidecar = yaml.safe_load(sidecars[0].read_text())
    # (The killed run left no file of its version, so the rerun may claim the same one.)
    for output in sidecar["outputs"]:
        assert (paths.predictions_dir / output).exists()
    probabilities = np.load(paths.predictions_dir / sidecar["outputs"][0])
    assert probabilities.shape == (BIG_TEST_ROWS,) and np.isfinite(probabilities).all()
    assert killed.tmp.exists()
