"""Each stage imports only what it needs before its work starts: sklearn (with scipy.stats),
LightGBM and matplotlib take about a second to import, which the data stages never need and
`rtb train` / `rtb predict` pay while they read (the model's code is imported beside it)."""

from __future__ import annotations

import json
import subprocess
import sys

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
