"""The quickstart notebook runs top to bottom on CPU (its install cell is a no-op where the package imports)."""

import json
import os

NOTEBOOK = os.path.join(os.path.dirname(__file__), "..", "colab", "quickstart.ipynb")


def test_quickstart_notebook_runs(capsys):
    with open(NOTEBOOK) as f:
        cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
    namespace: dict = {}
    for cell in cells:
        exec(compile("".join(cell["source"]), NOTEBOOK, "exec"), namespace)
    out = capsys.readouterr().out
    assert "adapter moved the logits by" in out and "(length)" in out
    assert len(namespace["outs"]) == 1 + len(namespace["llm"].adapters) >= 4
