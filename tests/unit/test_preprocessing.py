"""The preprocess stage's contract: it hands over to training and prediction through a typed
Arrow file and writes the same table as a CSV export; the stages read the hand-over only, and
a damaged hand-over or interim file is one clear line naming it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.feather as feather
import pytest

from rtb.data.make_dataset import run_make_dataset
from rtb.data.preprocessing import read_processed, run_preprocess
from rtb.dataset_config import load_dataset_config


@pytest.fixture
def preprocessed(raw_project):
    cfg = load_dataset_config("rtb")
    run_make_dataset(raw_project, "train", cfg)
    run_preprocess(raw_project, "train", cfg)
    return raw_project, cfg


def test_the_csv_export_holds_the_same_table_as_the_hand_over(preprocessed) -> None:
    paths, cfg = preprocessed
    hand_over = feather.read_table(paths.processed_arrow("train")).to_pandas()
    export = pd.read_csv(paths.processed("train"), keep_default_na=False)
    assert list(export.columns) == list(hand_over.columns)
    assert len(export) == len(hand_over) == 600
    for name in cfg.categorical + [cfg.id_column]:
        assert (export[name].astype(str).to_numpy() == hand_over[name].astype(str).to_numpy()).all()
    for name in cfg.feature_numerical:
        exported = pd.to_numeric(export[name].replace("", np.nan)).to_numpy(np.float32)
        np.testing.assert_array_equal(exported, hand_over[name].to_numpy(), err_msg=name)
    assert (export[cfg.target].to_numpy() == hand_over[cfg.target].to_numpy()).all()
    assert (pd.to_datetime(export[cfg.timestamp]) == hand_over[cfg.timestamp]).all()


def test_stages_read_the_hand_over_not_the_export(preprocessed) -> None:
    """Editing the export changes nothing downstream: the stages read what preprocess wrote."""
    paths, cfg = preprocessed
    before = read_processed(paths.processed_arrow("train"), cfg, require_target=True)
    edited = pd.read_csv(paths.processed("train"), dtype=str, keep_default_na=False)
    edited.loc[0, "install"] = "1" if edited.loc[0, "install"] == "0" else "0"
    edited.to_csv(paths.processed("train"), index=False)
    after = read_processed(paths.processed_arrow("train"), cfg, require_target=True)
    pd.testing.assert_frame_equal(after, before)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_a_damaged_hand_over_is_one_clear_line(preprocessed, run_cli, damage) -> None:
    paths, _ = preprocessed
    hand_over = paths.processed_arrow("train")
    if damage == "truncated":
        hand_over.write_bytes(hand_over.read_bytes()[: hand_over.stat().st_size // 2])
    elif damage == "garbage":
        hand_over.write_bytes(b"\x00" * 4096)
    else:
        hand_over.unlink()
    result = run_cli("train", "--project-dir", str(paths.root))
    assert result.code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("rtb: error:")]
    assert len(errors) == 1 and "train_df.arrow" in errors[0] and "rtb preprocess" in errors[0], result.stderr
    assert not list(paths.models_dir.glob("pipeline_*.pkl"))


def test_a_truncated_interim_file_is_one_clear_line(raw_project, run_cli) -> None:
    cfg = load_dataset_config("rtb")
    run_make_dataset(raw_project, "train", cfg)
    interim = raw_project.interim("train")
    interim.write_bytes(interim.read_bytes()[: interim.stat().st_size // 2])
    result = run_cli("preprocess", "--split", "train", "--project-dir", str(raw_project.root))
    assert result.code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("rtb: error:")]
    assert len(errors) == 1 and "train.arrow" in errors[0] and "make-dataset" in errors[0], result.stderr
    assert not raw_project.processed("train").exists()
    assert not raw_project.processed_arrow("train").exists()
