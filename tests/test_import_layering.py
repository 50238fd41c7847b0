"""Imports point one way (docs/design.md §1): no circle, and no import up the layers.

    pallas_kernels, jaxlin.parallel <- jaxlin.ops <- jaxlin.layers
                   <- jaxlin.{config, model, generate, data, interop}
                   <- jaxlin.training <- jaxlin.evals

The graph is read from the source (every import statement, function-level ones included).
Importing `a.b.c` runs the `__init__` of `a` and `a.b` too, so an import also depends on
each package above its target that is not a package above the importer. A slow test
imports every module alone in a fresh interpreter.
"""
from __future__ import annotations

import ast
import concurrent.futures
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("jaxlin", "pallas_kernels")

# The layer of each module prefix (the longest prefix wins); a module may import only
# modules of its own layer or below.
LAYERS = {
    "pallas_kernels": 0,
    "jaxlin.validation": 0,
    "jaxlin.parallel": 0,
    "jaxlin.xla_cpu_workaround": 0,
    "jaxlin.ops": 1,
    "jaxlin.layers": 2,
    "jaxlin.config": 3,
    "jaxlin.model": 3,
    "jaxlin.generate": 3,
    "jaxlin.data": 3,
    "jaxlin.interop": 3,
    "jaxlin.training": 4,
    "jaxlin.evals": 5,    # experiments built on training (benchmarks/, colab/ call them)
    "jaxlin": 6,          # the package's __init__: the public names
}


def _modules() -> dict[str, pathlib.Path]:
  found = {}
  for package in PACKAGES:
    for path in (REPO / package).rglob("*.py"):
      name = ".".join(path.relative_to(REPO).with_suffix("").parts)
      found[name.removesuffix(".__init__")] = path
  return found


MODULES = _modules()


def _ancestors(name: str) -> list[str]:
  parts = name.split(".")
  return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imports(name: str, path: pathlib.Path) -> set[str]:
  """The package modules `name` depends on by importing (ancestors of targets included)."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  targets: list[str] = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      targets += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      targets += [base] + [f"{base}.{alias.name}" for alias in node.names]
  own = set(_ancestors(name))
  edges = set()
  for target in targets:
    while target and target not in MODULES:
      target = target.rpartition(".")[0]
    if not target:
      continue
    for dep in _ancestors(target) + [target]:
      if dep in MODULES and dep != name and dep not in own:
        edges.add(dep)
  return edges


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> int:
  prefix = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
  return LAYERS[prefix]


def test_no_import_circle() -> None:
  state: dict[str, int] = {}   # 1: on the current path, 2: done
  circles = []

  def visit(node: str, path: list[str]) -> None:
    state[node] = 1
    for nxt in sorted(GRAPH[node]):
      if state.get(nxt) == 1:
        circles.append(path[path.index(nxt):] + [nxt])
      elif nxt not in state:
        visit(nxt, path + [nxt])
    state[node] = 2

  for name in sorted(GRAPH):
    if name not in state:
      visit(name, [name])
  assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_imports_point_down_the_layers() -> None:
  upward = [f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})"
            for name, deps in sorted(GRAPH.items()) for dep in sorted(deps)
            if _layer(dep) > _layer(name)]
  assert not upward, "\n".join(upward)


def test_kernels_import_only_jax_and_themselves() -> None:
  outside = {name: sorted(dep for dep in deps if not dep.startswith("pallas_kernels"))
             for name, deps in GRAPH.items() if name.startswith("pallas_kernels")}
  assert not any(outside.values()), outside


def test_the_graph_sees_a_circle() -> None:
  """The checks above could fail: a kernel importing an op closes a circle through the
  ops' adapters."""
  saved = GRAPH["pallas_kernels.dispatch"]
  GRAPH["pallas_kernels.dispatch"] = saved | {"jaxlin.ops.gated"}
  try:
    with pytest.raises(AssertionError, match="import circles"):
      test_no_import_circle()
    with pytest.raises(AssertionError, match="imports jaxlin.ops.gated"):
      test_imports_point_down_the_layers()
  finally:
    GRAPH["pallas_kernels.dispatch"] = saved


def _import_alone(name: str) -> tuple[str, int, str]:
  result = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  return name, result.returncode, result.stderr[-2000:]


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    failures = [(name, err) for name, code, err in pool.map(_import_alone, sorted(MODULES))
                if code != 0]
  assert not failures, "\n\n".join(f"{name}:\n{err}" for name, err in failures)
