"""The CLI chain on small data: train writes a versioned pickle + report, predict scores with a
verified model, and a broken model file is refused with one line and nothing written."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import prepared_project, rewrite_hand_over

from rtb.io_utils import sha256_file
from rtb.models.registry import load_champion_entry


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("rtb: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def _prepare(project, run_cli, *splits: str) -> None:
    for split in splits:
        for stage in ("make-dataset", "preprocess"):
            result = run_cli(stage, "--split", split, "--project-dir", str(project.root))
            assert result.code == 0, result.stderr


@pytest.fixture(scope="module")
def trained_template(tmp_path_factory):
    """One real training run per module (the slow part), copied for each test below."""
    from rtb.dataset_config import load_dataset_config
    from rtb.models.make_training import run_training

    paths = prepared_project(tmp_path_factory.mktemp("trained") / "project")
    run_training(paths, load_dataset_config("rtb"), cv_folds=3, seed=0)
    return paths


@pytest.fixture
def trained(trained_template, tmp_path):
    """A private copy of the trained project (tests tamper with it)."""
    from rtb.config import ProjectPaths

    root = tmp_path / "project"
    shutil.copytree(trained_template.root, root)
    return ProjectPaths(root)


def test_preprocess_derives_recency_and_keeps_rows(raw_project, run_cli) -> None:
    _prepare(raw_project, run_cli, "train")
    processed = pd.read_csv(raw_project.processed("train"))
    assert len(processed) == 600
    for column in ("fromLastStart", "fromLastStart_missing", "hour"):
        assert column in processed.columns
    missing = processed["fromLastStart_missing"] == 1
    assert missing.any() and processed.loc[missing, "fromLastStart"].isna().all()
    assert (processed.loc[~missing, "fromLastStart"] >= 0).all()
    assert processed["country"].isna().sum() == 0  # gaps became the "__missing__" category


def test_train_writes_versioned_model_report_and_champion(trained) -> None:
    models = sorted(trained.models_dir.glob("pipeline_*.pkl"))
    reports = sorted(trained.reports_dir.glob("report_*.yaml"))
    assert len(models) == 1 and len(reports) == 1
    report = yaml.safe_load(reports[0].read_text())
    for section in ("cv", "holdout"):
        for metric in ("roc_auc", "log_loss", "brier", "normalized_entropy", "calibration_ratio"):
            assert metric in report[section]
    assert set(report["cv"]["log_loss"]) == {"mean", "std"}
    assert report["artifacts"]["model_sha256"] == sha256_file(models[0])
    assert report["artifacts"]["input_sha256"] == sha256_file(trained.processed_arrow("train"))
    assert report["data"]["rows"] == 600
    assert report["promotion"]["promoted"] is True
    assert set(report["candidates"]) == {"logreg_onehot", "logreg_target_encoded", "gbm_target_encoded"}
    assert len(report["calibration"]["reliability"]) == 10
    assert "platform" in report["calibration"]["by_segment"]
    assert report["environment"]["libraries"]["scikit-learn"]
    assert "model__estimator" in report["params"]
    assert "deprecated" not in map(str, report["params"].values())
    assert load_champion_entry(trained).path == models[0]
    plots = sorted(p.name for p in trained.reports_dir.glob("report_*.png"))
    assert [name.rsplit("_", 1)[1] for name in plots] == [
        "deciles.png", "importance.png", "reliability.png", "roc.png"
    ]


def test_predict_writes_probabilities_ids_and_model_sidecar(trained, run_cli) -> None:
    result = run_cli("predict", "--project-dir", str(trained.root))
    assert result.code == 0, result.stderr
    npy = sorted(trained.predictions_dir.glob("predictions_*.npy"))
    assert len(npy) == 1
    probabilities = np.load(npy[0])
    test_rows = pd.read_csv(trained.processed("test"))
    assert probabilities.shape == (len(test_rows),)
    assert np.isfinite(probabilities).all() and ((0 <= probabilities) & (probabilities <= 1)).all()
    table = pd.read_csv(npy[0].with_suffix(".csv"), dtype={"id": str})
    assert table["id"].tolist() == test_rows["id"].astype(str).tolist()
    np.testing.assert_allclose(table["probability"], probabilities)
    sidecar = yaml.safe_load(npy[0].with_suffix(".yaml").read_text())
    champion = load_champion_entry(trained)
    assert sidecar["model"]["sha256"] == champion.sha256 == sha256_file(champion.path)
    assert "using model " + champion.path.name in result.log


def test_predict_without_any_model_says_train_first(raw_project, run_cli) -> None:
    _prepare(raw_project, run_cli, "test")
    result = run_cli("predict", "--project-dir", str(raw_project.root))
    assert result.code == 1
    assert "no trained model has been promoted yet" in error_line(result.stderr)
    assert run_cli("check-model", "--project-dir", str(raw_project.root)).code == 1


def _tamper(kind: str, model: Path) -> None:
    if kind == "truncated":
        model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    elif kind == "modified":
        data = bytearray(model.read_bytes())
        data[-10] ^= 0xFF
        model.write_bytes(bytes(data))
    elif kind == "missing":
        model.unlink()


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("truncated", "does not match the recorded"),
        ("modified", "does not match the recorded"),
        ("missing", "model file not found"),
    ],
)
def test_broken_model_is_refused_and_nothing_written(trained, run_cli, kind, expected) -> None:
    model = load_champion_entry(trained).path
    _tamper(kind, model)
    result = run_cli("predict", "--project-dir", str(trained.root))
    assert result.code == 1
    line = error_line(result.stderr)
    assert model.name in line and expected in line
    assert not list(trained.predictions_dir.glob("predictions_*"))
    assert run_cli("check-model", "--project-dir", str(trained.root)).code == 1


def _latest_predictions(paths) -> np.ndarray:
    return np.load(sorted(paths.predictions_dir.glob("predictions_*.npy"))[-1])


def test_predict_scores_through_the_tables_training_wrote_and_checked(trained, run_cli) -> None:
    champion = load_champion_entry(trained)
    tables = trained.scoring_tables(champion.version)
    artifacts = yaml.safe_load(trained.report(champion.version).read_text())["artifacts"]
    assert artifacts["scoring_tables"] == tables.name
    assert artifacts["scoring_tables_sha256"] == sha256_file(tables)

    through_tables = run_cli("predict", "--project-dir", str(trained.root))
    assert through_tables.code == 0, through_tables.stderr
    assert "scoring through the model's scoring tables" in through_tables.log
    expected = joblib.load(champion.path).predict_proba(_test_frame(trained))[:, 1]
    np.testing.assert_allclose(_latest_predictions(trained), expected, rtol=0, atol=1e-9)

    tables.unlink()
    without = run_cli("predict", "--project-dir", str(trained.root))
    assert without.code == 0, without.stderr
    assert f"{tables}: missing; scoring with the model itself" in without.log
    np.testing.assert_allclose(_latest_predictions(trained), expected, rtol=0, atol=1e-9)


def _test_frame(paths) -> pd.DataFrame:
    """The processed test rows as the pipeline reads them (from the hand-over, typed)."""
    from rtb.data.preprocessing import read_processed
    from rtb.dataset_config import load_dataset_config

    return read_processed(paths.processed_arrow("test"), load_dataset_config("rtb"),
                          require_target=False)


@pytest.mark.parametrize("kind", ["truncated", "modified"])
def test_changed_scoring_tables_are_not_unpickled(trained, run_cli, kind) -> None:
    champion = load_champion_entry(trained)
    tables = trained.scoring_tables(champion.version)
    _tamper(kind, tables)
    result = run_cli("predict", "--project-dir", str(trained.root))
    assert result.code == 0, result.stderr
    assert f"{tables}: changed since training (sha256 differs); scoring with the model itself" in result.log
    assert "equal to predict_proba within 1e-9" in result.log


def test_model_option_needs_a_report_recording_its_sha(trained, run_cli, tmp_path) -> None:
    champion = load_champion_entry(trained).path
    stray = trained.models_dir / "pipeline_20000101T000000Z.pkl"
    shutil.copy(champion, stray)
    result = run_cli("predict", "--project-dir", str(trained.root), "--model", str(stray))
    assert result.code == 1
    assert "no training report" in error_line(result.stderr)
    ok = run_cli("predict", "--project-dir", str(trained.root), "--model", str(champion))
    assert ok.code == 0, ok.stderr


def test_report_with_mismatching_sha_blocks_the_model(trained, run_cli) -> None:
    champion = load_champion_entry(trained)
    report = trained.report(champion.version)
    payload = yaml.safe_load(report.read_text())
    payload["artifacts"]["model_sha256"] = "0" * 64
    report.write_text(yaml.safe_dump(payload))
    result = run_cli("predict", "--project-dir", str(trained.root), "--model", str(champion.path))
    assert result.code == 1
    assert "does not match the recorded" in error_line(result.stderr)


def test_processed_file_of_another_dataset_is_rejected(trained, run_cli) -> None:
    rewrite_hand_over(trained, "train", lambda frame: frame.drop(columns=["deviceType"]))
    result = run_cli("train", "--project-dir", str(trained.root))
    assert result.code == 1
    assert "missing column(s) ['deviceType']" in error_line(result.stderr)


def test_pickled_pipeline_is_the_whole_scoring_path(trained) -> None:
    pipeline = joblib.load(load_champion_entry(trained).path)
    frame = _test_frame(trained)
    probabilities = pipeline.predict_proba(frame)[:, 1]
    assert probabilities.shape == (len(frame),)
    assert pipeline.steps[0][0] == "features"


def test_too_few_installs_to_calibrate_is_one_clear_line(trained, run_cli) -> None:
    def keep_three_installs(frame: pd.DataFrame) -> pd.DataFrame:
        positives = np.flatnonzero(frame["install"].to_numpy() == 1)
        frame.loc[positives[3:], "install"] = 0
        return frame

    rewrite_hand_over(trained, "train", keep_three_installs)
    models_before = sorted(trained.models_dir.glob("pipeline_*.pkl"))
    result = run_cli("train", "--project-dir", str(trained.root))
    assert result.code == 1
    line = error_line(result.stderr)
    assert "column 'install'" in line and "need at least 5 of each class" in line
    assert sorted(trained.models_dir.glob("pipeline_*.pkl")) == models_before


@pytest.mark.parametrize("candidate", ["logreg_target_encoded", "gbm_target_encoded"])
def test_scoring_in_parallel_chunks_equals_scoring_at_once(trained, monkeypatch, candidate) -> None:
    """`rtb predict` scores chunks on two threads; any race in the encoders' lazy indexes or
    in the model would show up here as a differing probability."""
    from rtb.data.preprocessing import read_processed
    from rtb.dataset_config import load_dataset_config
    from rtb.features import feature_frame
    from rtb.models import make_predicting
    from rtb.models.pipeline import build_pipeline

    cfg = load_dataset_config("rtb")
    train = read_processed(trained.processed_arrow("train"), cfg, require_target=True)
    pipeline = build_pipeline(candidate, cfg).fit(feature_frame(train, cfg), train["install"])
    test = read_processed(trained.processed_arrow("test"), cfg, require_target=False)
    at_once = pipeline.predict_proba(feature_frame(test, cfg))[:, 1]
    monkeypatch.setattr(make_predicting, "CHUNK_ROWS", 7)
    for _ in range(3):
        fresh = pickle.loads(pickle.dumps(pipeline))  # no lazy index built yet, as after loading
        np.testing.assert_allclose(make_predicting.predict(fresh, test, cfg), at_once, rtol=0, atol=1e-12)


def test_extra_candidates_join_the_selection_and_an_unknown_one_is_refused(
    tmp_path, run_cli, monkeypatch
) -> None:
    """$RTB_EXTRA_CANDIDATES adds the optional blend to the run (its report lists it, the
    rule says how it was judged); a name that is no candidate is one line naming the
    variable, a non-zero exit and no model or report."""
    paths = prepared_project(tmp_path / "project")
    monkeypatch.setenv("RTB_EXTRA_CANDIDATES", "blend_target_encoded")
    result = run_cli("train", "--project-dir", str(paths.root))
    assert result.code == 0, result.stderr
    (report_path,) = paths.reports_dir.glob("report_*.yaml")
    report = yaml.safe_load(report_path.read_text())
    assert "blend_target_encoded" in report["candidates"]
    assert report["candidates"]["blend_target_encoded"]["fit_rows"] == (
        report["candidates"]["gbm_target_encoded"]["fit_rows"])
    assert report["selected"]["rule"].startswith("lowest calibrated log loss on the time holdout")

    monkeypatch.setenv("RTB_EXTRA_CANDIDATES", "blend_target_encoded, deep_forest")
    before = sorted(p.name for p in (*paths.models_dir.iterdir(), *paths.reports_dir.iterdir()))
    result = run_cli("train", "--project-dir", str(paths.root))
    assert result.code != 0
    assert error_line(result.stderr) == (
        "rtb: error: $RTB_EXTRA_CANDIDATES: unknown candidate(s) ['deep_forest']; "
        "optional ones: ['blend_target_encoded']")
    assert sorted(p.name for p in (*paths.models_dir.iterdir(), *paths.reports_dir.iterdir())) == before
