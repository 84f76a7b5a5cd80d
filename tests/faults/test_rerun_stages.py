"""Running a stage again (an Airflow retry, a manual rerun) is safe: data stages are idempotent to
the byte, model and prediction stages add a new version each time and never mix two runs."""

from __future__ import annotations

import numpy as np
import yaml

from rtb.config import version_of
from rtb.io_utils import sha256_file
from rtb.models.registry import load_champion_entry

from .faultkit import assert_prediction_set, assert_unchanged, final_files, tmp_files


def test_make_dataset_and_preprocess_twice_give_identical_bytes(trained, run_cli) -> None:
    """Byte-identical data: the interim file, the processed hand-over and its CSV export."""
    paths = trained.paths
    before = final_files(paths.root)
    for split in ("train", "test"):
        fingerprints = []
        for _ in range(2):
            for stage in ("make-dataset", "preprocess"):
                result = run_cli(stage, "--split", split, "--project-dir", str(paths.root))
                assert result.code == 0, result.stderr
            fingerprints.append(tuple(
                sha256_file(path)
                for path in (paths.interim(split), paths.processed(split), paths.processed_arrow(split))
            ))
        assert fingerprints[0] == fingerprints[1]
    # ... and identical to what the same stages wrote when the project was built.
    assert final_files(paths.root) == before
    assert not tmp_files(paths.interim_dir) | tmp_files(paths.processed_dir)


def test_training_twice_gives_two_versions_that_never_mix(trained, run_cli) -> None:
    paths = trained.paths
    before = final_files(paths.root)
    champion_before = paths.champion_pointer.read_bytes()
    for _ in range(2):
        result = run_cli("train", "--cv-folds", "2", "--project-dir", str(paths.root))
        assert result.code == 0, result.stderr

    after = final_files(paths.root)
    changed = {name for name in before if after.get(name) != before[name]}
    assert changed <= {"models/champion.yaml"}, changed
    new_models = sorted(name for name in set(after) - set(before) if name.startswith("models/pipeline_"))
    assert len(new_models) == 2, new_models
    versions = [version_of(paths.root / name) for name in new_models]
    assert versions[0] != versions[1]
    for name, version in zip(new_models, versions, strict=True):
        report = yaml.safe_load(paths.report(version).read_text())
        assert report["version"] == version
        assert report["artifacts"]["model"] == (paths.root / name).name
        assert report["artifacts"]["model_sha256"] == after[name]
        tables = f"models/{paths.scoring_tables(version).name}"
        assert report["artifacts"]["scoring_tables_sha256"] == after[tables]
        assert report["artifacts"]["input_sha256"] == after["data/processed/train_df.arrow"]
        for kind in ("roc", "reliability", "deciles", "importance"):
            assert (paths.reports_dir / f"report_{version}_{kind}.png").exists()
    # The champion (replaced only if a rerun was strictly better) is intact either way.
    champion = load_champion_entry(paths)
    if paths.champion_pointer.read_bytes() == champion_before:
        assert champion.path == trained.champion.path
    else:
        assert champion.version in versions


def test_predicting_twice_gives_two_consistent_versioned_sets(trained, run_cli) -> None:
    paths = trained.paths
    before = final_files(paths.root)
    for _ in range(2):
        result = run_cli("predict", "--project-dir", str(paths.root))
        assert result.code == 0, result.stderr

    assert_unchanged(before, final_files(paths.root))
    sidecars = sorted(paths.predictions_dir.glob("predictions_*.yaml"))
    assert len(sidecars) == 2
    assert len(list(paths.predictions_dir.iterdir())) == 6, "3 files per set, nothing else"
    (first_model, first), (second_model, second) = (
        assert_prediction_set(paths, sidecar) for sidecar in sidecars
    )
    assert first_model == second_model == trained.champion.path.name
    assert np.array_equal(first, second)
