"""examples/notebooks/sweep.ipynb runs headless (nbclient, a real IPython kernel) and draws its figure.

The kernel runs an event loop in the cell's thread, so the notebook's qkdstack.distill calls also check that
the API's rounds run in a worker loop there (asyncio.run in the cell's thread would raise). It takes about
5 s on a quiet machine (kernel start, a theory sweep, eight distilled frames) and 10 s on a loaded one: slow.
"""

from __future__ import annotations

import base64
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "notebooks" / "sweep.ipynb"


@pytest.mark.slow
def test_sweep_notebook_runs_and_plots(tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "commit it without outputs"
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    client.execute()  # raises CellExecutionError on the first cell that fails

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert not [out for out in outputs if out.output_type == "stream" and out.name == "stderr"]
    pngs = [base64.b64decode(out.data["image/png"]) for out in outputs
            if out.output_type == "display_data" and "image/png" in out.data]
    assert len(pngs) == 1
    assert pngs[0].startswith(b"\x89PNG\r\n\x1a\n") and len(pngs[0]) > 20_000  # a drawn figure, not an empty one
    text = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "key up to about" in text  # the theory sweep printed its reach per block size
    assert "estimation" in str(outputs)  # a frame too small for its distance aborted (table or DataFrame)
    assert list(tmp_path.iterdir()) == []  # it writes no files
