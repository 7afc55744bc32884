"""The quickstart notebook runs from top to bottom, as a researcher would run it."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import REPO_ROOT


def test_quickstart_notebook_runs_the_study_on_the_embedded_model(embedded_model_dir: Path, tmp_path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    from refusal_lab.api import find_results

    notebook = nbformat.read(REPO_ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    # The kernel runs in tmp_path (its outputs/ land there) and inherits this session's model cache.
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream")
    assert "harmful prompts refused" in printed and "pairs patched" in printed and "k=4    top" in printed
    figures = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs if "application/vnd.plotly.v1+json" in o.get("data", {})]
    assert len(figures) == 1
    assert sorted(r.experiment for r in find_results(tmp_path / "outputs")) == ["ablation", "baseline", "patching"]
