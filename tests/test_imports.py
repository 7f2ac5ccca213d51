"""The package's layers (docs/architecture.md): no import cycle, arrows only down, no stage importing
another stage, package ``__init__`` files importing nothing eagerly.

The import graph counts what Python runs (as ``../shared/tools/import_cycles.py`` does): imports at
module level and inside functions (not those under ``if TYPE_CHECKING:``), the package ``__init__``
files that importing ``a.b.c`` runs first (``a``, ``a.b``; not the module's own parents, which are
initialised before it), and ``importlib.import_module`` with a constant string.
"""

import ast
import subprocess
import sys
from collections import deque
from pathlib import Path

import ncis_core

PACKAGE = Path(ncis_core.__file__).parent
BASE = PACKAGE.name


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _targets(target: str, importer: str) -> set[str]:
    """The kit modules importing ``target`` runs: each package on its path, then the module."""
    parts = target.split(".")
    runs = {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
    return {m for m in runs if m in MODULES and m != importer and not importer.startswith(m + ".")}


def _imports(name: str, path: Path, eager_only: bool = False) -> set[str]:
    """The kit modules that running module ``name`` imports (``eager_only``: at module level)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    skip: set[int] = set()  # never run: under `if TYPE_CHECKING:`; for eager_only, in a function
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
        elif eager_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            skip.update(id(n) for n in ast.walk(node))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                parts = parts[:len(parts) - node.level + 1]
                target = ".".join(parts + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != BASE:
                continue
            for alias in node.names:  # `from . import diffusion` names a module
                full = f"{target}.{alias.name}"
                found |= _targets(full if full in MODULES else target, name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == BASE:
                    found |= _targets(alias.name, name)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == \
                "import_module" and node.args and isinstance(node.args[0], ast.Constant) \
                and str(node.args[0].value).split(".")[0] == BASE:
            found |= _targets(node.args[0].value, name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _short(name: str) -> str:
    return name[len(BASE) + 1:] if name.startswith(BASE + ".") else name


def _components(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _shortest_cycle(graph: dict[str, set[str]], start: str) -> list[str]:
    """A shortest import cycle through ``start`` (breadth first, neighbours in sorted order)."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    return []


def test_no_import_cycle():
    cycles = _components(GRAPH)
    assert not cycles, "\n".join(
        f"import cycle of {len(c)} modules ({', '.join(map(_short, c))}), e.g. "
        + " -> ".join(map(_short, _shortest_cycle(GRAPH, c[0]))) for c in cycles)


# ------------------------------------------------------------------------------------------------
# layers: 0 pure, 1 config, 2 run folder & data, 3 stages, 4 faces (docs/architecture.md)
_LAYER_OF_PACKAGE = {"models": 0, "outliers": 0, "scores": 0, "data": 2, "stages": 3, "viz": 4,
                     "demo_generator": 4, "assets": 0}
_LAYER_OF_MODULE = {
    "": 0, "errors": 0, "device": 0, "progress": 0, "metrics": 0, "flops": 0, "neighbours": 0, "data.transforms": 0,
    "config": 1,
    "runs": 2, "embeddings_io": 2, "checkpoints": 2, "diffusion": 2,
    "compare": 4, "runner": 4, "notebook": 4, "plan": 4, "__main__": 4,
}


def layer(name: str) -> int:
    """The layer of a kit module (an unknown top-level module fails: give it one here and in the docs)."""
    short = "" if name == BASE else _short(name)
    if short in _LAYER_OF_MODULE:
        return _LAYER_OF_MODULE[short]
    top = short.split(".")[0]
    assert top in _LAYER_OF_PACKAGE, f"{name} has no layer: add it to docs/architecture.md and this test"
    return _LAYER_OF_PACKAGE[top]


def test_arrows_only_down():
    upward = sorted(f"{_short(a)} ({layer(a)}) -> {_short(b)} ({layer(b)})"
                    for a, targets in GRAPH.items() for b in targets if layer(b) > layer(a))
    assert not upward, "imports up the layers:\n" + "\n".join(upward)


def _stage_modules() -> set[str]:
    from ncis_core.runs import STAGES

    return {f"{BASE}.stages.{stage.module}" for stage in STAGES.values()}


def test_every_stage_of_the_table_has_its_module():
    assert all(name in MODULES for name in _stage_modules())


def test_no_stage_imports_another_stage():
    stages = _stage_modules()
    crossing = sorted(f"{_short(a)} -> {_short(b)}" for a, targets in GRAPH.items()
                      if a.startswith(f"{BASE}.stages.") for b in targets if b in stages and b != a)
    assert not crossing, "a stage module imports another stage:\n" + "\n".join(crossing)


def test_package_init_files_import_nothing_eagerly():
    eager = sorted(f"{_short(name) or BASE}: {', '.join(sorted(map(_short, _imports(name, path, True))))}"
                   for name, path in MODULES.items()
                   if path.name == "__init__.py" and _imports(name, path, eager_only=True))
    assert not eager, "package __init__ files that import kit modules at import time:\n" + "\n".join(eager)


def test_importing_stage_2_loads_no_other_stage_and_no_diffusion_library():
    code = ("import sys, ncis_core.stages.train_cvpn; "
            "print(sorted(m for m in sys.modules if m.startswith(('ncis_core','diffusers','transformers'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         timeout=300)
    loaded = set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
    assert not {m for m in loaded if m.split(".")[0] in ("diffusers", "transformers")}
    others = _stage_modules() - {f"{BASE}.stages.train_cvpn"}
    assert not loaded & others, f"stage 2 loads {sorted(loaded & others)}"
