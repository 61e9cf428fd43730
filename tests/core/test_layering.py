"""The package's shape: which layer may import which, and no import cycles.

Every import counts, including the ones inside functions (a lazy import is still a dependency). The graph is read
from the source with ``ast``, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Where each installed package lives in the repository (pyproject.toml's package-dir).
SOURCES = {"kvpolicy": ROOT / "kvpolicy", "kvpolicy.policies": ROOT / "policies",
           "kvpolicy.adapters": ROOT / "adapters"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, directory in SOURCES.items():
        for path in directory.rglob("*.py"):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The longest known module that ``name`` starts with (``a.b.C`` -> ``a.b``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from pkg import submodule` depends on the submodule; `from mod import name` on the module
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        targets.update(t for t in map(_resolve, names) if t is not None and t != module)
    return targets


GRAPH = {module: _imports(module) for module in MODULES}


def _layer(module: str) -> str:
    for prefix in ("kvpolicy.lab", "kvpolicy.policies", "kvpolicy.adapters.hf", "kvpolicy.adapters.sglang",
                   "kvpolicy.adapters"):
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    return "core"


# (importer layer, imported layer) pairs that are not allowed.
FORBIDDEN = {
    ("core", "kvpolicy.lab"), ("core", "kvpolicy.policies"), ("core", "kvpolicy.adapters.hf"),
    ("core", "kvpolicy.adapters.sglang"),
    ("kvpolicy.policies", "kvpolicy.lab"), ("kvpolicy.policies", "kvpolicy.adapters.hf"),
    ("kvpolicy.policies", "kvpolicy.adapters.sglang"),
    ("kvpolicy.adapters.hf", "kvpolicy.lab"), ("kvpolicy.adapters.sglang", "kvpolicy.lab"),
    ("kvpolicy.adapters.hf", "kvpolicy.adapters.sglang"), ("kvpolicy.adapters.sglang", "kvpolicy.adapters.hf"),
}
# The only crossings of those lines: `kvpolicy.apply` hands over to the HF adapter, and `python -m kvpolicy` runs
# the lab's CLI (a script entry point; no module imports kvpolicy.__main__).
ALLOWED = {("kvpolicy", "kvpolicy.adapters.hf"), ("kvpolicy.__main__", "kvpolicy.lab.cli")}


def test_the_graph_was_read():
    assert {"kvpolicy.selection", "kvpolicy.lab.cli", "kvpolicy.policies.window", "kvpolicy.adapters.hf.session",
            "kvpolicy.adapters.sglang.plugin"} <= MODULES.keys()
    assert "kvpolicy.selection" in GRAPH["kvpolicy.adapters.hf.session"]
    assert "kvpolicy.adapters.hf" in GRAPH["kvpolicy"]  # a function-level import counts


def test_dependencies_point_one_way():
    bad = sorted((src, dst) for src, targets in GRAPH.items() for dst in targets
                 if (_layer(src), _layer(dst)) in FORBIDDEN and (src, dst) not in ALLOWED)
    assert not bad, "imports against the layering (see docs/architecture.md):\n" + "\n".join(
        f"  {src} -> {dst}" for src, dst in bad)


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_cycles():
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("edges, expect", [({"a": {"b"}, "b": {"a"}}, True), ({"a": {"b"}, "b": set()}, False)])
def test_the_cycle_finder_finds_cycles(monkeypatch, edges, expect):
    monkeypatch.setitem(globals(), "GRAPH", edges)
    assert (_cycle() is not None) is expect
