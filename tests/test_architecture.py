"""The module graph of `scott_jax` (docs/architecture.md): no import circle, counting function-local imports too;
no module imports `scott_jax.train` (the mode registry `scott_jax.modes` names it; the CLI and the digits stage
that runs the trainer resolve it there); train.py stays under 400 lines."""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scott_jax")


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
  """{module: the scott_jax modules it imports anywhere in its file (module level or inside functions)}."""
  files = {}
  for dirpath, _, names in os.walk(root):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(dirpath, name)
        rel = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
        files[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
  graph = {m: set() for m in files}
  for module, path in files.items():
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module is not None:
        base = node.module if node.level == 0 else f"{package}.{node.module}"
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
      else:
        continue
      graph[module].update(t for t in targets if t in files and t != module)
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_cycle_finder_finds_a_cycle():
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle():
  graph = import_graph()
  assert "scott_jax.student" in graph and "scott_jax.pipeline" in graph["scott_jax.student"]
  assert cycles(graph) == []


def test_no_module_imports_train_and_train_is_short():
  from scott_jax import modes

  graph = import_graph()
  assert [m for m, deps in graph.items() if "scott_jax.train" in deps] == []
  assert modes.MODES["train"].split(":")[0] == "scott_jax.train"
  assert "scott_jax.modes" in graph["scott_jax.main"] and "scott_jax.modes" in graph["scott_jax.digits.distill"]
  with open(os.path.join(ROOT, "train.py")) as fh:
    assert len(fh.readlines()) < 400
