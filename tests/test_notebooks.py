"""The notebooks run top to bottom, headless, at the tiny size on CPU (nbclient + the ipykernel of this Python).

Each notebook reads its size switch and output folder from V4JAX_NOTEBOOK_SIZE / V4JAX_NOTEBOOK_OUT; a cell error
fails the test (nbclient raises CellExecutionError with the cell and its traceback). The figures the notebook
saves must exist and not be blank. XLA compiles with most optimisations off (compile time dominates here). The committed files must have their outputs stripped and a Colab badge that
the README repeats.
"""
import json
import re
from pathlib import Path

import numpy as np
import pytest

nbclient = pytest.importorskip("nbclient")
import nbformat  # noqa: E402  (installed with nbclient)

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"

FIGURES = {
    "01_quickstart": ["indexer_selection.png", "mhc_mixing.png", "kv_cache.png"],
    "02_convert_and_sample": [],
    "03_finetune_muon": ["loss_curves.png"],
}


def _read(name: str):
    return nbformat.read(str(NOTEBOOKS / f"{name}.ipynb"), as_version=4)


def _assert_not_blank(path: Path) -> None:
    import matplotlib.image as mpimg
    assert path.is_file(), f"{path.name} was not written"
    img = np.asarray(mpimg.imread(str(path)), np.float32)
    assert img.ndim == 3 and img.shape[0] >= 100 and img.shape[1] >= 100, f"{path.name}: shape {img.shape}"
    rgb = img[..., :3]
    assert rgb.std() > 0.02, f"{path.name} is blank (pixel std {rgb.std():.4f})"
    # more than the frame: a good share of the pixels differ from the background colour
    background = np.median(rgb.reshape(-1, 3), axis=0)
    assert np.mean(np.abs(rgb - background).sum(-1) > 0.1) > 0.02, f"{path.name} is nearly empty"


def test_notebook_files_are_stripped_and_badged():
    readme = (ROOT / "README.md").read_text()
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == sorted(FIGURES)
    for name in FIGURES:
        nb = _read(name)
        nbformat.validate(nb)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name}: outputs not stripped"
        url = f"https://colab.research.google.com/github/v4jax/v4jax/blob/main/notebooks/{name}.ipynb"
        assert url in nb.cells[0].source, f"{name}: no Colab badge in the first cell"
        assert url in readme, f"README.md has no Colab badge for {name}"
        first_code = next(c for c in nb.cells if c.cell_type == "code")
        assert re.search(r'SIZE = os\.environ\.get\("V4JAX_NOTEBOOK_SIZE"', first_code.source), \
            f"{name}: the size switch is not the first code cell"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_headless(name, tmp_path, monkeypatch):
    monkeypatch.setenv("V4JAX_NOTEBOOK_SIZE", "tiny")
    monkeypatch.setenv("V4JAX_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # XLA's optimisation passes are most of the compile time of these one-off programs (the training step: 24 -> 14
    # CPU seconds); the tiny programs run as fast without them.
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    nb = _read(name)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()                      # raises CellExecutionError on the first failing cell
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors, json.dumps(errors)[:2000]
    for fig in FIGURES[name]:
        _assert_not_blank(tmp_path / "out" / fig)
