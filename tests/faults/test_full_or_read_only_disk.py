"""An output folder that is full (a 2 MB tmpfs) or read-only (a read-only bind mount; root ignores
chmod): the stage fails with one clear line and exit 1, and nothing that was there is damaged,
no partial file takes a final name, no temp file is left behind.

Needs root to mount; skipped with the reason otherwise. Mounts are undone in teardown.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import yaml

from rtb.config import version_of
from rtb.io_utils import sha256_file

from .faultkit import (
    assert_prediction_set,
    assert_unchanged,
    error_line,
    fill_up,
    final_files,
    tmp_files,
)

NO_SPACE = "No space left on device"
READ_ONLY = "Read-only file system"


def _assert_failed_cleanly(result, names: str, reason: str, before: dict, after: dict, folder) -> None:
    assert result.code == 1, result.stderr
    line = error_line(result.stderr)
    assert names in line and reason in line, line
    assert_unchanged(before, after)
    assert not tmp_files(folder), tmp_files(folder)


def test_full_disk_under_processed(big_project, trained_template, mounter, run_cli) -> None:
    paths = big_project.paths
    mounter.tmpfs(paths.processed_dir, "2m")
    # The previous (small) processed test set lives on the small disk; the new one is ~48 MB.
    shutil.copy2(trained_template.paths.processed("test"), paths.processed("test"))
    shutil.copy2(trained_template.paths.processed_arrow("test"), paths.processed_arrow("test"))
    before = final_files(paths.root)

    result = run_cli("preprocess", "--split", "test", "--project-dir", str(paths.root))

    after = final_files(paths.root)
    _assert_failed_cleanly(result, "test_df.csv", NO_SPACE, before, after, paths.processed_dir)
    assert set(after) == set(before)


def test_full_disk_under_models(trained, mounter, run_cli) -> None:
    paths = trained.paths
    saved = paths.root.parent / "models-before"
    shutil.copytree(paths.models_dir, saved)
    mounter.tmpfs(paths.models_dir, "2m")
    shutil.copytree(saved, paths.models_dir, dirs_exist_ok=True)
    fill_up(paths.models_dir, leave_bytes=16 << 10)
    before = final_files(paths.root)

    result = run_cli("train", "--cv-folds", "2", "--project-dir", str(paths.root))

    after = final_files(paths.root)
    _assert_failed_cleanly(result, "pipeline_", NO_SPACE, before, after, paths.models_dir)
    assert set(after) == set(before), "no model, no report, no promotion"
    assert run_cli("check-model", "--project-dir", str(paths.root)).code == 0


def test_full_disk_under_reports(trained, mounter, run_cli) -> None:
    """Room for the report but not its plots: training fails before promotion."""
    paths = trained.paths
    saved = paths.root.parent / "reports-before"
    shutil.copytree(paths.reports_dir, saved)
    mounter.tmpfs(paths.reports_dir, "2m")
    shutil.copytree(saved, paths.reports_dir, dirs_exist_ok=True)
    fill_up(paths.reports_dir, leave_bytes=24 << 10)
    before = final_files(paths.root)

    result = run_cli("train", "--cv-folds", "2", "--project-dir", str(paths.root))

    after = final_files(paths.root)
    _assert_failed_cleanly(result, ".png", NO_SPACE, before, after, paths.reports_dir)
    assert not tmp_files(paths.models_dir)
    new = sorted(set(after) - set(before))
    # Observed: the model and (if it fitted) its report are complete and consistent, the plots
    # are missing, and the champion pointer was never touched (promotion comes last).
    assert not [name for name in new if name.endswith(".png")], new
    for name in new:
        if name.startswith("models/"):
            report = paths.report(version_of(paths.root / name))
            if report.exists():
                assert yaml.safe_load(report.read_text())["artifacts"]["model_sha256"] == after[name]
    assert run_cli("check-model", "--project-dir", str(paths.root)).code == 0


def test_full_disk_under_predictions(trained, mounter, run_cli) -> None:
    """Room for the .npy but not the .csv: the disk fills up between two files of one set."""
    paths = trained.paths
    mounter.tmpfs(paths.predictions_dir, "2m")
    assert run_cli("predict", "--project-dir", str(paths.root)).code == 0
    (previous,) = paths.predictions_dir.glob("predictions_*.yaml")
    npy_bytes = previous.with_suffix(".npy").stat().st_size
    fill_up(paths.predictions_dir, leave_bytes=npy_bytes + (8 << 10))
    before = final_files(paths.root)

    result = run_cli("predict", "--project-dir", str(paths.root))

    after = final_files(paths.root)
    _assert_failed_cleanly(result, "predictions_", NO_SPACE, before, after, paths.predictions_dir)
    assert_prediction_set(paths, previous)
    new = sorted(set(after) - set(before))
    # Observed: the finished .npy stays, without .csv or sidecar (see the note). It is
    # complete; no sidecar names it, so it is not a prediction set.
    assert all(name.endswith(".npy") for name in new), new
    for name in new:
        assert np.load(paths.root / name).shape == np.load(previous.with_suffix(".npy")).shape
        assert not (paths.root / name).with_suffix(".yaml").exists()


@pytest.mark.parametrize(
    ("args", "folder"),
    [
        (("make-dataset", "--split", "test"), "interim_dir"),
        (("preprocess", "--split", "test"), "processed_dir"),
        (("train", "--cv-folds", "2"), "models_dir"),
        (("predict",), "predictions_dir"),
    ],
    ids=["make-dataset", "preprocess", "train", "predict"],
)
def test_read_only_output_folder(trained, mounter, run_cli, args, folder) -> None:
    paths = trained.paths
    if folder == "predictions_dir":  # something to keep intact
        assert run_cli("predict", "--project-dir", str(paths.root)).code == 0
    target = getattr(paths, folder)
    mounter.read_only(target)
    before = final_files(paths.root)

    result = run_cli(*args, "--project-dir", str(paths.root))

    after = final_files(paths.root)
    # The line names the folder that cannot be written (not the file it would have held),
    # relative to the project folder.
    _assert_failed_cleanly(result, f"rtb: error: {target.relative_to(paths.root)}: ", READ_ONLY,
                           before, after, target)
    assert set(after) == set(before)


def test_predict_with_read_only_models_succeeds(trained, mounter, run_cli) -> None:
    """The predict DAG mounts models/ read-only: predicting must never need to write there."""
    paths = trained.paths
    mounter.read_only(paths.models_dir)
    before = final_files(paths.root)

    assert run_cli("check-model", "--project-dir", str(paths.root)).code == 0
    result = run_cli("predict", "--project-dir", str(paths.root))

    assert result.code == 0, result.stderr
    assert_unchanged(before, final_files(paths.root))
    (sidecar,) = paths.predictions_dir.glob("predictions_*.yaml")
    model, _ = assert_prediction_set(paths, sidecar)
    assert model == trained.champion.path.name
    assert sha256_file(trained.champion.path) == trained.champion.sha256
