"""The package has one order, and nothing imports upward in it or in a circle.

Every ``import`` in ``edgellm/`` counts, module-level or inside a function (a lazy import is still
a dependency), so the rule holds however the code is loaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "edgellm"

#: lowest first: errors and options -> GGUF reading and the system probe -> planner -> runtime ->
#: store and converter -> workflows -> front ends. The longest matching prefix decides.
LAYERS = {
    "edgellm": 0,
    "edgellm.errors": 0,
    "edgellm.options": 0,
    "edgellm.fsutil": 0,
    "edgellm.net": 0,
    "edgellm.config": 0,
    "edgellm.presets": 0,
    "edgellm.gguf": 1,
    "edgellm.system": 1,
    "edgellm.plan": 2,
    "edgellm.runtime": 3,
    "edgellm.bench": 3,
    "edgellm.eval": 3,
    "edgellm.imatrix": 3,
    "edgellm.models": 4,
    "edgellm.convert": 4,
    "edgellm.quantize": 4,
    "edgellm.train": 4,
    "edgellm.workflows": 5,
    "edgellm.cli": 6,
    "edgellm.tui": 6,
    "edgellm.server": 6,
    "edgellm.__main__": 6,
}
NAMES = ["errors and options", "GGUF reading and system probe", "planner", "runtime", "store and converter",
         "workflows", "front ends"]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def layer(module: str) -> int:
    prefix = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def imports(module: str) -> set[str]:
    """The edgellm modules ``module`` imports (``from edgellm.x import y`` names ``edgellm.x.y``
    when y is a module)."""
    tree = ast.parse(MODULES[module].read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("edgellm")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("edgellm") and not node.level:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
    return out - {module}


GRAPH = {m: imports(m) for m in MODULES}


def test_every_module_has_a_layer() -> None:
    assert all(layer(m) >= 0 for m in MODULES)
    assert all(target in MODULES for targets in GRAPH.values() for target in targets), "an import of no module"


def test_nothing_imports_upward() -> None:
    upward = sorted(
        f"{m} ({NAMES[layer(m)]}) imports {t} ({NAMES[layer(t)]})"
        for m, targets in GRAPH.items() for t in targets if layer(t) > layer(m)
    )
    assert not upward, "\n".join(upward)


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components: any with two or more modules is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, cycles


@pytest.mark.parametrize(("module", "target"), [("edgellm.plan.fit", "edgellm.runtime.options"),
                                                ("edgellm.gguf.header", "edgellm.models.store")])
def test_the_check_sees_a_violation(module: str, target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule fails on the kind of import this package had (plan -> runtime, GGUF reading -> store)."""
    monkeypatch.setitem(GRAPH, module, GRAPH[module] | {target})
    monkeypatch.setitem(MODULES, target, MODULES.get(target, Path()))
    with pytest.raises(AssertionError, match=module):
        test_nothing_imports_upward()


def test_app_workers_post_messages() -> None:
    """The app's worker threads hand results to screens as messages, never by calling into widgets."""
    touching = [p.name for p in (PACKAGE / "tui").rglob("*.py") if "call_from_thread" in p.read_text()]
    assert not touching


#: the llama.cpp boundary: the only modules that use llama-cpp-python's binding
BOUNDARY = {"edgellm.runtime.native", "edgellm.system.ggml", "edgellm.system.llamalog"}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def test_only_the_boundary_calls_llama_cpp() -> None:
    """Samplers, batches, memory operations, the quantizer, the binding's grammar converter: all
    reach llama.cpp through runtime/native.py; ggml's libraries through system/ggml.py alone."""
    outside = {name: sorted(m for m in _imports(path) if m.split(".")[0] == "llama_cpp")
               for name, path in MODULES.items() if name not in BOUNDARY}
    assert {name: found for name, found in outside.items() if found} == {}
    loaders = {name for name, path in MODULES.items() if "CDLL(" in path.read_text()}
    assert loaders == {"edgellm.system.ggml"}
