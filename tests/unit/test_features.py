"""The one feature definition in its two shapes, held against each other: the batch function
(Arrow, used by `rtb preprocess`) and the per-row function (used by the scoring service) must
agree value for value, or served scores drift from batch scores. Both run on the same typed
interim rows, from the RTB logs, the generator and the real TalkingData sample."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from conftest import TALKINGDATA_SAMPLE, small_raw_frame, write_raw

from rtb.data.generate import generate_raw
from rtb.data.make_dataset import make_dataset
from rtb.dataset_config import load_dataset_config
from rtb.features import MISSING, derive_feature_table, row_deriver, rows_frame


def _assert_same_features(raw_path: Path, config: str, split: str) -> pd.DataFrame:
    cfg = load_dataset_config(config)
    interim = make_dataset(raw_path, cfg, split)
    batch = derive_feature_table(interim, cfg).to_pandas()
    rows = interim.to_pylist()
    served = rows_frame(rows, cfg)
    assert list(served.columns) == cfg.feature_columns
    assert [c for c in batch.columns if c in cfg.feature_columns] == cfg.feature_columns
    for name in cfg.categorical:
        assert (batch[name].astype(str).to_numpy() == served[name].astype(str).to_numpy()).all(), name
        assert not batch[name].isna().any(), f"{name}: gaps must become {MISSING!r}"
    for name in cfg.feature_numerical:
        assert batch[name].dtype == np.float32 == served[name].dtype, name
        np.testing.assert_array_equal(batch[name].to_numpy(), served[name].to_numpy(), err_msg=name)
    # The per-row function itself, on a request exactly as the service receives it: the
    # timestamps as ISO text with an offset, counts as ints where they are whole.
    derive = row_deriver(cfg)
    request = {key: (value.isoformat() if hasattr(value, "isoformat") else value)
               for key, value in rows[0].items()}
    assert derive(request) == derive(rows[0])
    if split == "train":
        assert (batch[cfg.target].to_numpy() == interim.column(cfg.target).to_numpy()).all()
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
    sample = tmp_path / "train.csv"
    pd.read_csv(TALKINGDATA_SAMPLE, nrows=20_000).to_csv(sample, index=False)
    batch = _assert_same_features(sample, "talkingdata", "train")
    assert "attributed_time" not in batch.columns


def test_served_rows_take_gaps_ints_text_and_offsets_as_the_batch_path_does() -> None:
    cfg = load_dataset_config("rtb")
    derive = row_deriver(cfg)
    position = {name: i for i, name in enumerate(cfg.feature_columns)}
    values = derive({
        "timestamp": "2019-01-09 21:20:15.943987+02:00",  # 19:20 UTC; microseconds dropped
        "lastStart": "2019-01-09 17:20:15.943000",  # naive: UTC, so 2 hours earlier
        "sourceGameId": 1373094,
        "country": None,
        "startCount": "12",
        "viewCount": "many",
        "clickCount": 1e39,
    })
    assert values[position["sourceGameId"]] == "1373094"
    assert values[position["country"]] == MISSING
    assert values[position["platform"]] == MISSING  # absent key: a gap
    assert values[position["startCount"]] == 12.0
    assert np.isnan(values[position["viewCount"]])
    assert values[position["clickCount"]] == np.inf  # float32 overflow, as numpy casts it
    assert np.isnan(values[position["installCount"]])
    assert values[position["fromLastStart"]] == np.float32(2.0)
    assert values[position["fromLastStart_missing"]] == 0.0
    assert values[position["hour"]] == 19.0
    no_stamp = derive({"lastStart": None})
    assert np.isnan(no_stamp[position["fromLastStart"]])
    assert no_stamp[position["fromLastStart_missing"]] == 1.0
