"""The data stages stream record batches: on input that spans many batches (a tiny block
size, through the stages' own parameter) they write what a single-batch read writes, and a
bad value in a later batch is reported with its own line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pytest
from conftest import small_raw_frame, write_raw

from rtb.config import ProjectPaths
from rtb.data.make_dataset import run_make_dataset
from rtb.data.preprocessing import read_processed, read_scoring_batches, run_preprocess
from rtb.dataset_config import load_dataset_config
from rtb.errors import RtbError
from rtb.io_utils import sha256_file

CFG = load_dataset_config("rtb")
TINY = 4096  # bytes per block: 600 raw rows become about 25 batches
ROWS = 600


def _batches(path: Path) -> int:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).num_record_batches


def _copy_raw(source: ProjectPaths, root: Path) -> ProjectPaths:
    paths = ProjectPaths(root)
    shutil.copytree(source.raw_dir, paths.raw_dir)
    return paths


@pytest.fixture
def one_and_many(raw_project: ProjectPaths, tmp_path: Path) -> tuple[ProjectPaths, ProjectPaths]:
    """The same raw files through make-dataset and preprocess twice: in one batch and in many."""
    many = _copy_raw(raw_project, tmp_path / "many")
    for split in ("train", "test"):
        run_make_dataset(raw_project, split, CFG)
        run_make_dataset(many, split, CFG, block_bytes=TINY)
        run_preprocess(raw_project, split, CFG)
        run_preprocess(many, split, CFG)
    return raw_project, many


def test_interim_tables_are_the_same_however_the_file_is_batched(one_and_many) -> None:
    one, many = one_and_many
    for split in ("train", "test"):
        assert _batches(one.interim(split)) == 1
        assert _batches(many.interim(split)) > 5
        whole, batched = feather.read_table(one.interim(split)), feather.read_table(many.interim(split))
        assert batched.schema.metadata == whole.schema.metadata
        assert whole.schema.metadata[b"rtb.source_sha256"].decode() == sha256_file(
            one.raw_dir / CFG.files[split])
        assert batched.combine_chunks().equals(whole.combine_chunks())
        # One dictionary per column, in order of first appearance, as in a whole-table read.
        for name in CFG.categorical:
            chunks = batched.column(name).chunks
            assert all(chunk.dictionary.equals(chunks[-1].dictionary) for chunk in chunks)
            assert chunks[0].dictionary.equals(whole.column(name).chunk(0).dictionary)


def test_processed_files_are_the_same_however_the_interim_is_batched(one_and_many) -> None:
    one, many = one_and_many
    for split in ("train", "test"):
        assert one.processed(split).read_bytes() == many.processed(split).read_bytes()
        assert _batches(many.processed_arrow(split)) > 5
        whole = feather.read_table(one.processed_arrow(split))
        batched = feather.read_table(many.processed_arrow(split))
        assert batched.schema.metadata == whole.schema.metadata
        assert batched.combine_chunks().equals(whole.combine_chunks())
        pd.testing.assert_frame_equal(
            read_processed(many.processed_arrow(split), CFG, require_target=split == "train"),
            read_processed(one.processed_arrow(split), CFG, require_target=split == "train"),
        )


def test_scoring_frames_do_not_depend_on_the_hand_overs_batches(one_and_many) -> None:
    one, many = one_and_many
    frames = {}
    for label, paths in (("one", one), ("many", many)):
        scoring = read_scoring_batches(paths.processed_arrow("test"), CFG, frame_rows=64)
        assert scoring.rows == 200 and len(scoring) == 4
        parts = list(scoring)
        assert [len(frame) for _, frame in parts] == [64, 64, 64, 8]
        ids = pa.concat_arrays([chunk for chunk, _ in parts])
        frames[label] = (ids, pd.concat([frame for _, frame in parts], ignore_index=True))
    assert frames["many"][0].equals(frames["one"][0])
    pd.testing.assert_frame_equal(frames["many"][1], frames["one"][1])


def test_predictions_are_byte_identical_however_the_input_is_batched(one_and_many, run_cli) -> None:
    one, many = one_and_many
    assert run_cli("train", "--project-dir", str(one.root)).code == 0
    shutil.copytree(one.models_dir, many.models_dir)
    shutil.copytree(one.reports_dir, many.reports_dir)
    outputs = {}
    for label, paths in (("one", one), ("many", many)):
        result = run_cli("predict", "--project-dir", str(paths.root))
        assert result.code == 0, result.stderr
        [npy] = paths.predictions_dir.glob("predictions_*.npy")
        outputs[label] = (npy.read_bytes(), npy.with_suffix(".csv").read_bytes())
    assert outputs["many"] == outputs["one"]
    probabilities = np.load(next(many.predictions_dir.glob("predictions_*.npy")))
    assert probabilities.shape == (200,) and np.isfinite(probabilities).all()


def test_predict_batches_equal_predict_on_the_whole_frame(one_and_many, run_cli) -> None:
    """Several frames through the two scoring threads give, in order, what one call gives."""
    import joblib

    from rtb.models.make_predicting import predict, predict_batches

    one, _ = one_and_many
    assert run_cli("train", "--project-dir", str(one.root)).code == 0
    model = joblib.load(next(one.models_dir.glob("pipeline_*.pkl")))
    frame = read_processed(one.processed_arrow("test"), CFG, require_target=False)
    chunks = [frame.iloc[start : start + 30] for start in range(0, len(frame), 30)]
    batched = list(predict_batches(model, chunks, CFG, chunks=len(chunks)))
    assert [len(p) for p in batched] == [len(c) for c in chunks]
    np.testing.assert_allclose(np.concatenate(batched), predict(model, frame, CFG), rtol=0, atol=1e-12)


def _raw_with(project: ProjectPaths, **changes: tuple[int, object]) -> Path:
    frame = small_raw_frame(ROWS, seed=1)
    for column, (row, value) in changes.items():
        frame[column] = frame[column].astype(object)
        frame.loc[row, column] = value
    return write_raw(frame, project.raw_dir / "training_data.csv.gz")


@pytest.mark.parametrize(("column", "row", "value", "expected"), [
    ("viewCount", 533, "many", "column 'viewCount' line 535: expected a number, got 'many'"),
    ("timestamp", 470, "yesterday", "column 'timestamp' line 472: expected an ISO timestamp"),
    ("install", 590, 2, "column 'install' line 592: expected 0 or 1, got 2"),
    ("clickCount", 401, -3, "column 'clickCount' line 403: expected a count >= 0 and at most 1e+09, got -3"),
    ("startCount", 555, "inf",
     "column 'startCount' line 557: expected a count >= 0 and at most 1e+09, got inf"),
    ("country", 512, "U\x01S",
     "column 'country' line 514: expected text of at most 256 characters without control"),
])
def test_a_bad_value_in_a_later_batch_names_its_line(project, column, row, value, expected) -> None:
    raw = _raw_with(project, **{column: (row, value)})
    for block_bytes in (TINY, 8 << 20):
        with pytest.raises(RtbError) as caught:
            run_make_dataset(project, "train", CFG, block_bytes=block_bytes)
        assert str(caught.value).startswith(f"{raw}: {expected}"), str(caught.value)
        assert not project.interim("train").exists()
        assert not list(project.interim_dir.glob(".tmp-*"))


def test_an_id_repeated_across_batches_is_found(project) -> None:
    frame = small_raw_frame(ROWS, seed=1)
    frame.loc[ROWS - 1, "id"] = frame.loc[3, "id"]
    raw = write_raw(frame, project.raw_dir / "training_data.csv.gz")
    with pytest.raises(RtbError) as caught:
        run_make_dataset(project, "train", CFG, block_bytes=TINY)
    message = str(caught.value)
    assert message.startswith(f"{raw}: column 'id': 1 duplicated id(s), e.g. {frame.loc[3, 'id']!r} "
                              "appears 2 times"), message


def test_ids_of_varying_length_are_checked_across_batches(project) -> None:
    frame = small_raw_frame(ROWS, seed=1).assign(id=[f"u{i}" for i in range(ROWS)])
    write_raw(frame, project.raw_dir / "training_data.csv.gz")
    run_make_dataset(project, "train", CFG, block_bytes=TINY)  # distinct: no error
    frame.loc[ROWS - 2, "id"] = "u7"
    write_raw(frame, project.raw_dir / "training_data.csv.gz")
    with pytest.raises(RtbError, match=r"column 'id': 1 duplicated id\(s\), e.g. 'u7' appears 2 times"):
        run_make_dataset(project, "train", CFG, block_bytes=TINY)


def test_naive_timestamps_after_the_first_batches_are_read_as_utc(project, tmp_path) -> None:
    """The first rows decide the timestamp type; a later batch without offsets makes the
    reader switch to text for the rest, and the rows come out as from a whole-file read."""
    frame = small_raw_frame(ROWS, seed=1)
    frame.loc[450:, "timestamp"] = frame.loc[450:, "timestamp"].str.replace("+00:00", "", regex=False)
    write_raw(frame, project.raw_dir / "training_data.csv.gz")
    run_make_dataset(project, "train", CFG, block_bytes=TINY)
    stamps = feather.read_table(project.interim("train")).column("timestamp").to_pandas()
    expected = pd.to_datetime(small_raw_frame(ROWS, seed=1)["timestamp"], utc=True).dt.floor("ms")
    assert (stamps == expected).all()
    whole = _copy_raw(project, tmp_path / "whole")
    run_make_dataset(whole, "train", CFG)
    assert feather.read_table(project.interim("train")).combine_chunks().equals(
        feather.read_table(whole.interim("train")).combine_chunks())
