"""Each stage imports only what it needs before its work starts: sklearn (with scipy.stats),
LightGBM and matplotlib take about a second to import, which the data stages never need and
`rtb train` / `rtb predict` pay while they read (the model's code is imported beside it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HEAVY = ("sklearn", "scipy.stats", "lightgbm", "matplotlib")


def _heavy_after_import(module: str) -> list[str]:
    code = (f"import json, sys; import {module}; "
            f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


@pytest.mark.parametrize("module", [
    "rtb.cli",
    "rtb.data.make_dataset",
    "rtb.data.preprocessing",
    "rtb.models.make_predicting",  # sklearn arrives with the model's unpickling, beside the read
    "rtb.models.make_training",  # the model code is imported beside the read
    "rtb.models.training_rows",
    "rtb.monitoring.drift",
])
def test_the_module_leaves_the_heavy_libraries_unimported(module: str) -> None:
    assert _heavy_after_import(module) == []


def test_the_check_sees_a_heavy_import() -> None:
    assert _heavy_after_import("rtb.models.training") == ["sklearn", "scipy.stats"]


def test_predict_through_a_linear_models_tables_never_imports_sklearn(tmp_path: Path) -> None:
    """The whole `rtb predict` of a logistic-regression champion, in a fresh interpreter."""
    from conftest import prepared_project

    from rtb.dataset_config import load_dataset_config
    from rtb.models.make_training import run_training

    paths = prepared_project(tmp_path / "project")
    run_training(paths, load_dataset_config("rtb"), cv_folds=3, seed=0,
                 candidates=("logreg_target_encoded",))
    code = ("import json, sys\nfrom rtb.cli import main\n"
            f"sys.argv = ['rtb', 'predict', '--project-dir', {str(paths.root)!r}]\n"
            "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
            f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "scoring through the model's scoring tables" in done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == []
    assert len(list(paths.predictions_dir.glob("predictions_*.npy"))) == 1
