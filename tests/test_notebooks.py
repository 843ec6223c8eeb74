"""The notebooks execute end to end at toy sizes (``SEQJAX_NOTEBOOK_TINY=1``), so they never rot."""

import pathlib
import sys

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("SEQJAX_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("XLA_FLAGS", "")  # one device is enough here
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert len(outputs) >= 3


def test_results_notebook_reads_the_committed_results(monkeypatch):
    """Without the toy switch the results notebook loads ``experiments/results/`` (no training): every sweep
    grid there gets its table, and the passkey / timescales folders (other formats) are skipped."""
    monkeypatch.setenv("SEQJAX_NOTEBOOK_TINY", "0")
    monkeypatch.setenv("XLA_FLAGS", "")
    path = pathlib.Path(__file__).parent.parent / "notebooks" / "results.ipynb"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    sys.path.insert(0, str(path.parent.parent / "experiments"))
    import sweep

    grids = {p.parent.name for p in (path.parent.parent / "experiments" / "results").glob("*/table.md")} & set(sweep.GRIDS)
    assert grids and all(f"{g}\n| model |" in text for g in grids)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_committed_with_its_outputs(path):
    """The repository page renders the notebooks as committed: every code cell has run (in order, without an
    error), the plots are embedded, and no cell carries timing metadata."""
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert not [c for c in code if "execution" in c.metadata]
