"""The walkthrough notebook runs top to bottom on the real embedded 270M, and its asserts catch a broken module.

Executed with nbclient in a fresh kernel of this interpreter (the notebook is not rewritten: the outputs saved
in the repository are the ones a person reads on the web)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebooks extra is not installed (pip install 'gemma3[notebooks]')")
nbclient = pytest.importorskip("nbclient", reason="the notebooks extra is not installed (pip install 'gemma3[notebooks]')")
pytest.importorskip("ipykernel", reason="the notebooks extra is not installed (pip install 'gemma3[notebooks]')")

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "walkthrough.ipynb"


def execute(notebook, first_cell: str | None = None):
    if first_cell is not None:
        notebook.cells.insert(0, nbformat.v4.new_code_cell(first_cell))
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    return notebook


def test_walkthrough_runs_and_its_asserts_hold():
    notebook = execute(nbformat.read(NOTEBOOK, as_version=4))
    text = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "the package's Generator gives the same 24 tokens" in text
    assert "ranges" in text and "hybrid" in text
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors


def test_saved_outputs_are_those_of_a_run():
    """The notebook in the repository was saved executed, in order (so it reads on the web as it runs)."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    counts = [c.execution_count for c in notebook.cells if c.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1))
    assert all(c.outputs for c in notebook.cells if c.cell_type == "code" and "print(" in c.source)


@pytest.mark.parametrize("mutation, failing", [
    # RMSNorm without its +1 offset (Llama's x̂·w instead of Gemma's x̂·(1 + w))
    ("import gemma3.model\ngemma3.model.RMSNorm.gain = lambda self: self.weight.float()",
     "rms_norm(x, block.input_layernorm.weight)"),
    # GELU with exact erf instead of the tanh approximation Gemma was trained with
    ("import gemma3.model, torch.nn.functional as F\n"
     "gemma3.model.FeedForward.forward = lambda self, x: self.down_proj(F.gelu(self.gate_proj(x)) * self.up_proj(x))",
     "feed_forward(rms_norm(x1"),
])
def test_the_asserts_catch_a_broken_module(mutation, failing):
    """Break one module of the package (in the notebook's kernel only) and the notebook stops at the assert
    that compares it with the hand-written step."""
    with pytest.raises(nbclient.exceptions.CellExecutionError) as info:
        execute(nbformat.read(NOTEBOOK, as_version=4), first_cell=mutation)
    assert "AssertionError" in str(info.value)
    assert failing in str(info.value)
