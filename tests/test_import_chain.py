"""The house rule of ../shared/ARCHITECTURE.md, checked on the source: each package imports only packages
before it in the chain config -> data -> model -> infer -> eval -> train -> export -> serve (cli alone imports
all), the shared top-level modules import no package, and no two modules import each other in a circle
(imports inside functions included: a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
CHAIN = ["config", "data", "model", "infer", "eval", "train", "export", "serve", "cli"]


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, dict[str, int]]:
    """{module: {imported tuneforge module: line}} for every module under src/tuneforge."""
    graph: dict[str, dict[str, int]] = {}
    modules = {module_name(p) for p in (SRC / "tuneforge").rglob("*.py")}
    for path in sorted((SRC / "tuneforge").rglob("*.py")):
        edges: dict[str, int] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                # `from tuneforge.data import masks` names the module tuneforge.data.masks
                targets = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                    for a in node.names
                ]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t.split(".")[0] == "tuneforge":
                    edges.setdefault(t, node.lineno)
        graph[module_name(path)] = edges
    return graph


def package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in CHAIN) else None


def chain_violations(graph: dict[str, dict[str, int]]) -> list[str]:
    out = []
    for mod, edges in graph.items():
        a = package(mod)
        for target, line in edges.items():
            b = package(target)
            if b is None:
                continue  # tuneforge/__init__ (version), gguf_path, progress: shared by every stage
            if a is None:
                out.append(f"{mod}:{line} imports {target}: a shared top-level module imports no stage")
            elif CHAIN.index(b) > CHAIN.index(a):
                out.append(f"{mod}:{line} imports {target}: {a} comes before {b} in the chain")
    return out


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def package_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Cycles among modules, ignoring package __init__ files that re-export their own modules."""
    inner = {m: {t: n for t, n in e.items() if not (t in graph and m.startswith(t + "."))} for m, e in graph.items()}
    return cycles(inner)


def test_every_import_follows_the_chain():
    assert chain_violations(import_graph()) == []


def test_no_module_imports_itself_through_others():
    assert package_cycles(import_graph()) == []


def test_the_checks_catch_what_they_are_for():
    graph = {
        "tuneforge.eval.runner": {"tuneforge.train.monitor": 3},
        "tuneforge.train.monitor": {"tuneforge.eval.report": 9},
        "tuneforge.eval.report": {"tuneforge.eval.runner": 5},
        "tuneforge.progress": {"tuneforge.data.formats": 2},
        "tuneforge.data.formats": {"tuneforge.progress": 1, "tuneforge": 1},
    }
    assert chain_violations(graph) == [
        "tuneforge.eval.runner:3 imports tuneforge.train.monitor: eval comes before train in the chain",
        "tuneforge.progress:2 imports tuneforge.data.formats: a shared top-level module imports no stage",
    ]
    assert package_cycles(graph) == [
        ["tuneforge.data.formats", "tuneforge.progress"],
        ["tuneforge.eval.report", "tuneforge.eval.runner", "tuneforge.train.monitor"],
    ]
