"""Training takes its rows in with the negative downsampling applied while reading
(`rtb.models.training_rows`): the streamed read of a many-batch hand-over keeps exactly what
the same rule keeps of the frame in memory, keeps every holdout row and every positive, and
the report, the cross-validation and the drift profile still describe the whole window."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.feather as feather
import pytest
import yaml
from conftest import small_raw_frame, write_raw

from rtb.config import ProjectPaths
from rtb.data.make_dataset import run_make_dataset
from rtb.data.preprocessing import read_processed, run_preprocess
from rtb.dataset_config import load_dataset_config
from rtb.errors import RtbError
from rtb.models.limits import TrainingLimits
from rtb.models.make_training import run_training
from rtb.models.training_rows import read_training_rows, rows_from_frame, time_holdout_split
from rtb.monitoring.profile import seen_levels

CFG = load_dataset_config("rtb")
ROWS = 6000
# Small enough that about half of the early negatives are dropped while reading.
LIMITS = TrainingLimits(fit_max_negatives=1200, refit_max_negatives=2500, cv_max_rows=900)


@pytest.fixture(scope="module")
def batched(tmp_path_factory: pytest.TempPathFactory) -> ProjectPaths:
    """A training hand-over of many record batches, its rows not in time order, with a
    long-tail id (most device types occur twice)."""
    paths = ProjectPaths(tmp_path_factory.mktemp("rows") / "project")
    raw = small_raw_frame(ROWS, seed=5)
    raw["deviceType"] = [f"device{i % (ROWS // 2)}" for i in range(ROWS)]
    raw = raw.sample(frac=1.0, random_state=0)
    write_raw(raw, paths.raw_dir / "training_data.csv.gz")
    run_make_dataset(paths, "train", CFG, block_bytes=32_768)
    run_preprocess(paths, "train", CFG)
    return paths


def _batches(path: Path) -> int:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).num_record_batches


def test_the_streamed_read_keeps_what_the_rule_keeps_of_the_frame_in_memory(batched) -> None:
    source = batched.processed_arrow("train")
    assert _batches(source) > 5
    streamed = read_training_rows([source], CFG, LIMITS, seed=3)
    frame = read_processed(source, CFG, require_target=True, with_id=False)
    held = rows_from_frame(frame, CFG, LIMITS, seed=3, source=str(source))

    assert streamed.plan == held.plan
    pd.testing.assert_frame_equal(streamed.frame, held.frame)
    np.testing.assert_array_equal(streamed.holdout, held.holdout)
    np.testing.assert_array_equal(streamed.draws, held.draws)
    assert streamed.frame[CFG.timestamp].is_monotonic_increasing

    y = frame[CFG.target].to_numpy()
    holdout = time_holdout_split(frame[CFG.timestamp], LIMITS.holdout_share)
    plan, kept_y = streamed.plan, streamed.frame[CFG.target].to_numpy()
    assert (plan.rows, plan.positives, plan.holdout_rows) == (ROWS, y.sum(), holdout.sum())
    assert 0.3 < plan.negative_share < 0.7
    # Every holdout row and every positive is kept; the early negatives at the planned share.
    assert streamed.holdout.sum() == holdout.sum() and kept_y.sum() == y.sum()
    early_negatives = int((y[~holdout] == 0).sum())
    kept_early_negatives = int((kept_y[~streamed.holdout] == 0).sum())
    spread = 5 * np.sqrt(early_negatives * plan.negative_share * (1 - plan.negative_share))
    assert abs(kept_early_negatives - early_negatives * plan.negative_share) < spread
    assert len(streamed.frame) < 0.75 * ROWS
    # The levels of every early row, dropped or kept, are what new levels are measured against.
    for name in CFG.categorical:
        assert set(streamed.early_levels[name]) == set(seen_levels(frame[name][~holdout])), name
    kept_levels = {name: seen_levels(streamed.frame[name][~streamed.holdout]) for name in CFG.categorical}
    assert any(len(kept_levels[n]) < len(streamed.early_levels[n]) for n in CFG.categorical)


def test_uniform_and_sampled_rows_are_unbiased_subsets(batched) -> None:
    rows = read_training_rows([batched.processed_arrow("train")], CFG, LIMITS, seed=3)
    frame = read_processed(batched.processed_arrow("train"), CFG, require_target=True, with_id=False)
    y_all = frame[CFG.target].to_numpy()
    y = rows.frame[CFG.target].to_numpy()
    uniform, sampled = rows.uniform, rows.sampled(y)
    # A uniform sample has the window's base rate; the refit's pool keeps every positive.
    assert y[uniform].mean() == pytest.approx(y_all.mean(), abs=0.02)
    assert y[~uniform].mean() > 2 * y_all.mean()
    assert y[sampled].sum() == y_all.sum()
    assert (y[sampled] == 0).sum() == uniform[y == 0].sum()


def test_a_window_of_several_hand_overs_reads_as_one_file(batched, tmp_path) -> None:
    """Two files, each with its own dictionaries (levels in another order), give the rows of
    the one file they were cut from."""
    whole = feather.read_table(batched.processed_arrow("train"))
    halves = []
    for number, part in enumerate((whole.slice(0, ROWS // 2), whole.slice(ROWS // 2))):
        columns = [pc.dictionary_encode(column.cast(pa.string())) if pa.types.is_dictionary(column.type)
                   else column for column in part.columns]
        path = tmp_path / f"day{number}.arrow"
        feather.write_feather(pa.table(columns, names=part.column_names), path, compression="uncompressed")
        halves.append(path)
    one = read_training_rows([batched.processed_arrow("train")], CFG, LIMITS, seed=1)
    two = read_training_rows(halves, CFG, LIMITS, seed=1)
    assert two.plan == one.plan
    text = lambda f: f.astype({c: str for c in CFG.categorical})  # noqa: E731
    pd.testing.assert_frame_equal(text(two.frame), text(one.frame))
    levels = lambda rows: {n: set(v) for n, v in rows.early_levels.items()}  # noqa: E731
    assert levels(two) == levels(one)

    odd = whole.set_column(whole.schema.get_field_index("startCount"), "startCount",
                           whole.column("startCount").cast(pa.float64()))
    feather.write_feather(odd, tmp_path / "odd.arrow", compression="uncompressed")
    with pytest.raises(RtbError, match=r"odd\.arrow: column 'startCount' is double, float in .*layouts"):
        read_training_rows([halves[0], tmp_path / "odd.arrow"], CFG, LIMITS, seed=1)


def test_no_time_split_without_two_moments() -> None:
    tied = pd.Series([pd.Timestamp("2019-01-01", tz="UTC")] * 400, name="timestamp")
    with pytest.raises(RtbError, match=r"data\.arrow: column 'timestamp': every one of the 400 rows "
                                       r"has the timestamp 2019-01-01 00:00:00\+00:00"):
        time_holdout_split(tied, 0.2, source="data.arrow")


def test_the_report_describes_the_whole_window(batched, tmp_path) -> None:
    paths = ProjectPaths(tmp_path / "project")
    paths.processed_dir.mkdir(parents=True)
    paths.processed_arrow("train").write_bytes(batched.processed_arrow("train").read_bytes())
    report = yaml.safe_load(run_training(paths, CFG, cv_folds=3, seed=0, limits=LIMITS,
                                         candidates=("logreg_target_encoded",)).read_text())
    frame = read_processed(paths.processed_arrow("train"), CFG, require_target=True, with_id=False)
    data = report["data"]
    assert data["rows"] == ROWS and data["kept_rows"] < 0.75 * ROWS
    assert data["base_rate"] == pytest.approx(frame[CFG.target].mean())
    assert 0.3 < data["read_negatives_kept_share"] < 0.7
    assert report["refit"]["of_rows"] == ROWS
    assert report["refit"]["negatives_kept_share"] <= data["read_negatives_kept_share"]
    assert report["cv"]["rows"] == LIMITS.cv_max_rows and report["cv"]["of_rows"] == ROWS
    profile = yaml.safe_load(paths.profile(report["version"]).read_text())
    assert profile["rows"] < data["kept_rows"] and f"window's {ROWS}" in profile["features_from"]


def test_a_long_holdout_is_its_latest_rows(batched) -> None:
    """The holdout is bounded too: with holdout_max_rows below the latest 20%, it is the
    latest rows (the same cut a window's holdout day gets), and the rest are early rows."""
    frame = read_processed(batched.processed_arrow("train"), CFG, require_target=True, with_id=False)
    capped = TrainingLimits(**{**LIMITS.__dict__, "holdout_max_rows": 500})
    for starts in (None, frame[CFG.timestamp].quantile(0.5)):
        rows = read_training_rows([batched.processed_arrow("train")], CFG, capped, seed=3,
                                  starts=starts)
        stamps = rows.frame[CFG.timestamp]
        assert rows.plan.holdout_rows == rows.holdout.sum() == 500
        assert rows.holdout[-500:].all() and not rows.holdout[:-500].any()  # the latest rows
        assert stamps[rows.holdout].min() > stamps[~rows.holdout].max()
        assert rows.plan.parts[1] == f"latest 500 rows, from {stamps[rows.holdout].min()}"
