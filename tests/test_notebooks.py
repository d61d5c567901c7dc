"""Executes every colab/ notebook headless in smoke mode (SWITCHJAX_SMOKE=1).

Each notebook ends by printing a RESULT dict; the test checks that every code
cell ran without error and that RESULT holds the notebook's key numbers.
"""
import ast
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

COLAB = pathlib.Path(__file__).resolve().parents[1] / "colab"
EXPECTED_KEYS = {
    "switch_layer_walkthrough.ipynb": {"capacity", "dropped_fraction", "aux_loss"},
    "sparse_vs_dense.ipynb": {"switch_eval_loss", "dense_eval_loss", "step_speedup"},
    "capacity_and_experts.ipynb": {"capacity_table", "experts_table"},
    "routing_inspector.ipynb": {"layers", "top_tokens"},
}


def test_every_notebook_is_covered():
    assert {p.name for p in COLAB.glob("*.ipynb")} == set(EXPECTED_KEYS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED_KEYS))
def test_notebook_runs(name, tmp_path, monkeypatch):
    path = COLAB / name
    if not path.exists():
        pytest.fail(f"{name} is missing")
    monkeypatch.setenv("SWITCHJAX_SMOKE", "1")
    monkeypatch.setenv("SWITCHJAX_WORKDIR", str(tmp_path))
    monkeypatch.setenv("SWITCHJAX_REPO", str(COLAB.parent))  # the kernel runs in tmp_path
    monkeypatch.setenv("XLA_FLAGS", "")  # notebooks run on one device, as in Colab
    nb = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(nb, timeout=900, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "a code cell did not run"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in code[-1].outputs if o.output_type == "stream")
    result = ast.literal_eval(text.strip().splitlines()[-1])
    assert EXPECTED_KEYS[name] <= set(result), result
