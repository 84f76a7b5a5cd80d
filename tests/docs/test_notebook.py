"""The EDA notebook runs end to end on freshly generated raw data and shows its findings.

The notebook is executed from an in-memory copy, so the committed (executed) notebook is never
rewritten by a test run. The kernel is this interpreter: a kernelspec pointing at
`sys.executable` is registered in a temporary JUPYTER_PATH, so a user-level "python3" kernel
from another environment cannot be picked up by accident.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

from rtb.data.generate import generate_raw  # noqa: E402 - after the optional-dependency skips

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "eda.ipynb"
KERNEL = "rtb-eda-test"
SECTIONS = 10
MIN_FIGURES = 6


def _register_kernel(jupyter_dir: Path) -> None:
    spec_dir = jupyter_dir / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "rtb test kernel",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> nbformat.NotebookNode:
    root = tmp_path_factory.mktemp("eda")
    data_dir = root / "raw"
    generate_raw(data_dir, rows_train=30_000, rows_test=10_000, seed=3)
    _register_kernel(root / "jupyter")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("JUPYTER_PATH", str(root / "jupyter"))
        env.setenv("RTB_EDA_DATA_DIR", str(data_dir))
        notebook = nbformat.read(NOTEBOOK, as_version=4)
        client = nbclient.NotebookClient(
            notebook,
            kernel_name=KERNEL,
            timeout=120,
            resources={"metadata": {"path": str(root)}},
        )
        client.execute()
    return notebook


def _outputs(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]


def _stdout(notebook: nbformat.NotebookNode) -> str:
    return "".join(
        out.text for out in _outputs(notebook)
        if out.output_type == "stream" and out.name == "stdout"
    )


def test_every_cell_runs_without_error(executed) -> None:
    errors = [out for out in _outputs(executed) if out.output_type == "error"]
    assert not errors, [f"{e.ename}: {e.evalue}" for e in errors]
    unexecuted = [
        i for i, cell in enumerate(executed.cells)
        if cell.cell_type == "code" and cell.execution_count is None
    ]
    assert not unexecuted


def test_reads_the_data_the_environment_points_at(executed) -> None:
    assert re.search(r"read 30,000 train and 10,000 test rows from \S+raw", _stdout(executed))


def test_prints_base_rate_and_a_takeaway_per_section(executed) -> None:
    text = _stdout(executed)
    match = re.search(r"Base rate: (\d+\.\d+)% installs \(([\d,]+) of 30,000 train rows\)", text)
    assert match, text[:2000]
    assert 0.1 < float(match.group(1)) < 10
    assert text.count("Takeaway:") >= SECTIONS
    assert "nan%" not in text.lower()
    for finding in ("test rows with an id never seen in train", "heavy-tailed", "median gap"):
        assert finding in text


def test_shows_the_figures(executed) -> None:
    figures = [
        out for out in _outputs(executed)
        if out.output_type == "display_data" and "image/png" in out.get("data", {})
    ]
    assert len(figures) >= MIN_FIGURES


def test_committed_notebook_is_saved_executed_and_without_errors() -> None:
    """The repository copy is meant to be read on the web: it must carry its outputs."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count is not None for cell in code)
    outputs = _outputs(notebook)
    assert not [out for out in outputs if out.output_type == "error"]
    assert sum("image/png" in out.get("data", {}) for out in outputs) >= MIN_FIGURES
