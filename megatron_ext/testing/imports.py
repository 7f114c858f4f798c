"""The project's import graph, read from the source (no module is imported).

Every ``import`` / ``from ... import`` statement of ``megatron_ext`` counts, including those inside
functions (a lazy import that breaks a cycle is still a dependency) and those under
``if TYPE_CHECKING:`` (they never run, but a module typed by another's class depends on it as much as
one that calls it: hiding a cycle behind them keeps the cycle). Nodes are the sub-packages of
``megatron_ext`` (``megatron_ext.consa``, ``megatron_ext.config``, ...).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = "megatron_ext"


def _module_name(path: Path, package_dir: Path) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(tree: ast.AST, module: str, is_package: bool) -> Set[str]:
    found: Set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def module_imports(package_dir: Path) -> Dict[str, Set[str]]:
    """``{module: names it imports}`` for every module under ``package_dir``."""
    graph = {}
    for path in sorted(package_dir.rglob("*.py")):
        module = _module_name(path, package_dir)
        graph[module] = _imports(ast.parse(path.read_text()), module, path.name == "__init__.py")
    return graph


def package_of(module: str) -> str:
    """``megatron_ext.consa.gates`` -> ``megatron_ext.consa``; top-level modules are their own node."""
    parts = module.split(".")
    return ".".join(parts[:2])


def package_graph(package_dir: Path) -> Dict[str, Set[str]]:
    """``{sub-package: sub-packages it imports}`` (edges to itself left out)."""
    modules = module_imports(package_dir)
    known = {package_of(m) for m in modules if m != ROOT}
    graph: Dict[str, Set[str]] = {p: set() for p in known}
    for module, names in modules.items():
        if module == ROOT:
            continue
        source = package_of(module)
        for name in names:
            if name.startswith(ROOT + "."):
                target = package_of(name)
                if target in known and target != source:
                    graph[source].add(target)
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one node (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    out: List[List[str]] = []

    def strong(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                strong(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strong(node)
    return out


def mutual_pairs(graph: Dict[str, Set[str]]) -> List[tuple]:
    """Pairs of packages that import each other directly."""
    return sorted({tuple(sorted((a, b))) for a, succ in graph.items() for b in succ if a in graph.get(b, ())})


if __name__ == "__main__":
    here = Path(__file__).resolve().parents[1]
    g = package_graph(here)
    for node in sorted(g):
        print(f"{node} -> {', '.join(sorted(g[node])) or '-'}")
    print("mutual pairs:", mutual_pairs(g))
    print("cycles:", cycles(g))
