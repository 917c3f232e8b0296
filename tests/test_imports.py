"""The package's import graph has no cycles, and no import is deferred to dodge one.

The graph is read from the source with `ast`, so nothing is imported: every
`import` and `from ... import` statement counts, at module level and inside
functions alike (a deferred import still closes a cycle at run time). `from
cxrjax.a import b` is an edge to the module `cxrjax.a.b` when `b` is a
submodule, else to `cxrjax.a`. The implicit import of a parent package (Python
runs `cxrjax/a/__init__.py` before `cxrjax.a.b`) is not an edge: every
submodule would otherwise close a cycle with a package `__init__` that imports it.
An explicit `import cxrjax` is an edge to the root package like any other.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / 'cxrjax'

# A comment that defers an import to stay out of a cycle: the cycle should be removed instead.
CYCLE_EXCUSE = re.compile(r'avoid\w*\s+(an?\s+)?(import\s+cycle|circular\s+import)', re.IGNORECASE)


def module_files(package: Path) -> dict[str, Path]:
  """Dotted module name -> source file, for every .py file under `package` (a package's is its __init__.py)."""
  out = {}
  for path in sorted(package.rglob('*.py')):
    parts = path.relative_to(package.parent).with_suffix('').parts
    if parts[-1] == '__init__':
      parts = parts[:-1]
    out['.'.join(parts)] = path
  return out


def _imported_names(tree: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
  """The dotted names every import statement of one module refers to (before resolving to modules)."""
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split('.') if is_package else module.split('.')[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = '.'.join(package + ([node.module] if node.module else []))
      else:
        base = node.module
      submodules = [f'{base}.{alias.name}' for alias in node.names if f'{base}.{alias.name}' in modules]
      names.update(submodules)
      if len(submodules) < len(node.names):  # some names are attributes of `base` itself
        names.add(base)
  return names


def import_graph(package: Path) -> dict[str, set[str]]:
  """Module -> the package's modules it imports (anywhere in its source), from the source alone."""
  modules = module_files(package)
  graph = {}
  for module, path in modules.items():
    tree = ast.parse(path.read_text(), filename=str(path))
    edges = set()
    for name in _imported_names(tree, module, path.name == '__init__.py', modules):
      while name and name not in modules:  # `cxrjax.a.b.attr` -> the module `cxrjax.a.b`
        name = name.rpartition('.')[0]
      if name and name != module:
        edges.add(name)
    graph[module] = edges
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle per strongly connected component of more than one module, as [a, b, ..., a]."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(v: str) -> None:  # Tarjan's algorithm
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(component)

  for v in sorted(graph):
    if v not in index:
      visit(v)
  out = []
  for component in components:  # a shortest path from the first module back to itself, inside the component
    start = min(component)
    parent, frontier = {}, [start]
    while start not in parent:
      nxt = []
      for v in frontier:
        for w in sorted(graph[v] & component):
          if w not in parent:
            parent[w] = v
            nxt.append(w)
      frontier = nxt
    path = [start]
    while len(path) == 1 or path[-1] != start:
      path.append(parent[path[-1]])
    out.append(path[::-1])
  return sorted(out)


def cycle_excuses(package: Path) -> list[str]:
  """'file:line: comment' for every comment that says an import avoids an import cycle."""
  out = []
  for path in sorted(package.rglob('*.py')):
    for tok in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
      if tok.type == tokenize.COMMENT and CYCLE_EXCUSE.search(tok.string):
        out.append(f'{path.relative_to(package.parent)}:{tok.start[0]}: {tok.string}')
  return out


def test_the_graph_sees_every_kind_of_import(tmp_path):
  pkg = tmp_path / 'pkg'
  (pkg / 'sub').mkdir(parents=True)
  (pkg / '__init__.py').write_text('')
  (pkg / 'a.py').write_text('from pkg.sub import b\n')
  (pkg / 'sub' / '__init__.py').write_text('from . import b\nX = 1\n')
  (pkg / 'sub' / 'b.py').write_text('def f():\n  from ..a import x\n  import pkg.c.d\n')
  (pkg / 'c.py').write_text('from pkg.sub import X\n')
  graph = import_graph(pkg)
  assert graph == {
    'pkg': set(),
    'pkg.a': {'pkg.sub.b'},
    'pkg.sub': {'pkg.sub.b'},
    'pkg.sub.b': {'pkg.a', 'pkg.c'},  # function-level and relative imports count; pkg.c.d is the module pkg.c
    'pkg.c': {'pkg.sub'},
  }
  assert cycles(graph) == [['pkg.a', 'pkg.sub.b', 'pkg.a']]


def test_no_import_cycles():
  found = cycles(import_graph(PACKAGE))
  assert not found, f'{len(found)} import cycle(s) in cxrjax:\n' + '\n'.join(' -> '.join(c) for c in found)


def test_no_import_deferred_to_avoid_a_cycle():
  found = cycle_excuses(PACKAGE)
  assert not found, 'imports deferred to dodge a cycle (remove the cycle instead):\n' + '\n'.join(found)
