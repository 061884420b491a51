"""The notebooks run top to bottom (slow; needs the real-model assets, like the real-model test).

Each notebook's ``parameters`` cell is followed by an injected cell with CI-sized values, then every cell runs under
``nbclient``; any cell error fails the test.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hf_littlebit import assets

pytestmark = pytest.mark.slow

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
CACHE = assets.default_cache_dir()
HAVE_ASSETS = (CACHE / "models" / assets.SMOLLM2 / "model.safetensors").exists() and \
    (CACHE / "corpora" / "manifest.json").exists()

CI_PARAMETERS = {
    "quickstart.ipynb": "BPWS = [1.0, 0.55]\nCALIBRATE = False\nEVAL_TOKENS = 2048\nNEW_TOKENS = 8",
    "finetune.ipynb": "TRAIN_MINUTES = 0.5\nSEQLEN = 128\nBATCH = 2\nEVAL_TOKENS = 2048\nLORA_STEPS = 3",
}


def test_notebooks_are_stored_without_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} has stored outputs"
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), f"{path.name}: no parameters cell"


@pytest.mark.skipif(not HAVE_ASSETS, reason=f"real-model assets not in {CACHE}; run `littlebit fetch-assets`")
@pytest.mark.parametrize("name", sorted(CI_PARAMETERS))
def test_notebook_executes(name, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(index + 1, nbformat.v4.new_code_cell(CI_PARAMETERS[name]))
    client = nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the failing cell
