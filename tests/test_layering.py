"""The package's layers import only downward (docs/architecture.md): no import cycle anywhere, lazy imports
inside functions included; the engine never imports the plain loop or the pipeline; only the CLI imports the
serve, train, eval and demo layers (one level may use its own modules, and eval's bench drives the engine)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import llavakit

PACKAGE = Path(llavakit.__file__).parent


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (module level or inside functions)."""
    modules = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph: dict[str, set[str]] = defaultdict(set)
    for name, f in modules.items():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
        graph.setdefault(name, set())
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def imports_of(graph: dict[str, set[str]], prefix: str) -> set[str]:
    return {t for m, ts in graph.items() if m == prefix or m.startswith(prefix + ".") for t in ts}


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    assert cycles(import_graph()) == []


def test_the_engine_imports_neither_the_plain_loop_nor_the_pipeline():
    used = imports_of(import_graph(), "llavakit.engine")
    assert not used & {"llavakit.generation", "llavakit.pipeline", "llavakit.llm"}, used


def test_only_the_cli_imports_the_top_layers():
    graph = import_graph()
    top = ("llavakit.serve", "llavakit.train", "llavakit.demo", "llavakit.eval")
    allowed = {"llavakit.demo": ("llavakit.train", "llavakit.eval")}  # the demo model is trained and graded
    bad = []
    for module, targets in graph.items():
        if module.startswith("llavakit.cli"):
            continue
        own = next((t for t in top if module == t or module.startswith(t + ".")), None)
        ok = (own,) + allowed.get(own, ()) if own else ()
        bad += [(module, t) for t in targets if t.startswith(top) and not t.startswith(ok)]
    assert bad == []
