"""The batch feature derivation (Arrow, used by `rtb preprocess`) and the per-request one
(pandas, used by the scoring service) must agree value for value, or served scores drift
from batch scores. Both run here on the same typed interim table. And the processed CSV's Arrow
twin must never stand in for a CSV that was edited after preprocessing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import small_raw_frame, write_raw

from rtb.data.generate import generate_raw
from rtb.data.make_dataset import make_dataset, run_make_dataset
from rtb.data.preprocessing import (
    MISSING,
    derive_feature_table,
    derive_features,
    processed_twin,
    read_processed,
    read_processed_twin,
    run_preprocess,
)
from rtb.dataset_config import load_dataset_config

TALKINGDATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "talkingdata_train_sample.csv"


def _assert_same_features(raw_path: Path, config: str, split: str) -> pd.DataFrame:
    cfg = load_dataset_config(config)
    interim = make_dataset(raw_path, cfg, split)
    batch = derive_feature_table(interim, cfg).to_pandas()
    served = derive_features(interim.to_pandas(), cfg)
    assert list(batch.columns) == list(served.columns)
    for name in cfg.categorical:
        assert (batch[name].astype(str) == served[name].astype(str)).all(), name
        assert not batch[name].isna().any(), f"{name}: gaps must become {MISSING!r}"
    for name in cfg.feature_numerical:
        np.testing.assert_allclose(batch[name], served[name], rtol=1e-6, equal_nan=True, err_msg=name)
        assert batch[name].dtype == np.float32, name
    stamps = pd.to_datetime(batch[cfg.timestamp]).dt.tz_localize("UTC")
    assert (stamps == served[cfg.timestamp]).all()
    if split == "train":
        assert (batch[cfg.target].to_numpy() == served[cfg.target].to_numpy()).all()
    return batch


def test_batch_and_served_features_agree_on_rtb_logs(tmp_path: Path) -> None:
    frame = small_raw_frame(2000, seed=5)
    batch = _assert_same_features(write_raw(frame, tmp_path / "train.csv.gz"), "rtb", "train")
    assert (batch["country"] == MISSING).sum() == frame["country"].isna().sum() > 0
    assert batch["fromLastStart_missing"].sum() == frame["lastStart"].isna().sum() > 0


def test_batch_and_served_features_agree_on_generated_logs(tmp_path: Path) -> None:
    generate_raw(tmp_path, rows_train=20_000, rows_test=5_000, seed=3)
    _assert_same_features(tmp_path / "training_data.csv.gz", "rtb", "train")
    _assert_same_features(tmp_path / "test_data.csv.gz", "rtb", "test")


def test_batch_and_served_features_agree_on_talkingdata(tmp_path: Path) -> None:
    if not TALKINGDATA.exists():
        pytest.fail(f"{TALKINGDATA} is missing: the TalkingData sample ships in ../shared/data")
    sample = tmp_path / "train.csv"
    pd.read_csv(TALKINGDATA, nrows=20_000).to_csv(sample, index=False)
    batch = _assert_same_features(sample, "talkingdata", "train")
    assert "attributed_time" not in batch.columns


def test_readers_use_the_arrow_twin_only_while_the_csv_is_untouched(raw_project) -> None:
    cfg = load_dataset_config("rtb")
    run_make_dataset(raw_project, "train", cfg)
    csv_path = run_preprocess(raw_project, "train", cfg)
    assert processed_twin(csv_path).is_file()
    assert read_processed_twin(csv_path, ["install"]) is not None
    from_twin = read_processed(csv_path, cfg, require_target=True)

    edited = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    edited.loc[0, "install"] = "1" if edited.loc[0, "install"] == "0" else "0"
    edited.to_csv(csv_path, index=False)

    assert read_processed_twin(csv_path, ["install"]) is None
    from_csv = read_processed(csv_path, cfg, require_target=True)
    assert from_csv["install"].iloc[0] != from_twin["install"].iloc[0]
    assert (from_csv["install"].iloc[1:].to_numpy() == from_twin["install"].iloc[1:].to_numpy()).all()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_a_damaged_twin_falls_back_to_the_csv(raw_project, damage) -> None:
    cfg = load_dataset_config("rtb")
    run_make_dataset(raw_project, "train", cfg)
    csv_path = run_preprocess(raw_project, "train", cfg)
    twin = processed_twin(csv_path)
    # Expected values from the CSV itself: a frame read from the twin is memory-mapped, and
    # the twin is damaged in place next (which our writers never do: they rename).
    twin.rename(twin.with_suffix(".kept"))
    expected = read_processed(csv_path, cfg, require_target=True)
    twin.with_suffix(".kept").rename(twin)
    assert read_processed_twin(csv_path, ["install"]) is not None
    if damage == "truncated":
        twin.write_bytes(twin.read_bytes()[: twin.stat().st_size // 2])
    elif damage == "garbage":
        twin.write_bytes(b"\x00" * 4096)
    else:
        twin.unlink()

    assert read_processed_twin(csv_path, ["install"]) is None
    from_csv = read_processed(csv_path, cfg, require_target=True)
    pd.testing.assert_frame_equal(from_csv, expected, check_categorical=False)


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


def test_no_twin_where_the_filesystem_does_not_keep_the_stamped_mtime(raw_project, monkeypatch) -> None:
    """A filesystem that rounds mtimes cannot vouch for the twin, so none is published (an old
    one is removed) and readers parse the CSV."""
    cfg = load_dataset_config("rtb")
    run_make_dataset(raw_project, "train", cfg)
    csv_path = run_preprocess(raw_project, "train", cfg)
    assert processed_twin(csv_path).is_file()
    real_utime = os.utime
    monkeypatch.setattr(os, "utime", lambda path, ns: real_utime(path, ns=(ns[0], ns[1] // 10**9 * 10**9)))

    run_preprocess(raw_project, "train", cfg)

    assert not processed_twin(csv_path).exists()
    assert read_processed_twin(csv_path, ["install"]) is None
    assert len(read_processed(csv_path, cfg, require_target=True)) == 600
