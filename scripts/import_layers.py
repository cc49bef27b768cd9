"""rrr's import graph as layers; exit 1 on an import cycle or an upward import into the run plumbing.

    python scripts/import_layers.py              # print the layers (0 = imports nothing of rrr)
    python scripts/import_layers.py --edges      # also each module's rrr imports

Every `import rrr...` / `from rrr... import` counts, at module level or inside a function (a lazy import
is still a dependency), except those under `if TYPE_CHECKING:` (annotations only). Names computed at run
time (`import_module(f"rrr.{module}")` in rrr.cli, `rrr.tasks.get_task`) are not followed. A module's layer is
one more than the highest layer it imports, so imports go one way exactly when there is no cycle.
The run plumbing (RUN_PLUMBING: atomic writes, provenance, locks, parts, metrics file, the run dir) may
import only itself and BELOW_PLUMBING: it sits under every command, so an import of engines, models,
tasks or a pipeline from there is an upward import.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN_PLUMBING = {"rrr.atomic", "rrr.provenance", "rrr.run_lock", "rrr.parts", "rrr.metrics_file", "rrr.run_dir"}
BELOW_PLUMBING = {"rrr", "rrr.config", "rrr.distributed"}


def module_names(package: Path) -> dict[str, Path]:
    """{"rrr.engines.hf": path, "rrr.engines": path/__init__.py, ...} for a package directory."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is one of `modules` (a name inside a module → the module)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The package modules `path` imports (module level and lazy), TYPE_CHECKING blocks left out."""
    root = name.split(".")[0]
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == root:
                    found.add(_resolve(alias.name, modules) or root)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:                                   # relative: from . import x / from .x import y
                here = name.split(".") if is_package else name.split(".")[:-1]
                here = here[:len(here) - node.level + 1]
                base = ".".join(here + ([base] if base else []))
            if base.split(".")[0] == root:
                for alias in node.names:                      # `from rrr import distributed` names a module
                    target = _resolve(f"{base}.{alias.name}", modules) or _resolve(base, modules)
                    if target:
                        found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(name)
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    modules = module_names(package)
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
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

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def layers(graph: dict[str, set[str]]) -> dict[str, int]:
    """Layer of each module of an acyclic graph: 0 without package imports, else 1 + its highest import."""
    memo: dict[str, int] = {}

    def layer(v: str) -> int:
        if v not in memo:
            memo[v] = 1 + max((layer(w) for w in graph[v] if w != "rrr"), default=-1)
        return memo[v]

    return {v: layer(v) for v in graph}


def upward_into_plumbing(graph: dict[str, set[str]], plumbing: set[str] = RUN_PLUMBING,
                         below: set[str] = BELOW_PLUMBING) -> list[tuple[str, str]]:
    """(plumbing module, what it imports from above the plumbing)."""
    return sorted((m, dep) for m in plumbing if m in graph for dep in graph[m] if dep not in plumbing | below)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, default=ROOT / "rrr", help="the package directory (default: rrr/)")
    parser.add_argument("--edges", action="store_true", help="also print each module's imports")
    args = parser.parse_args(argv)
    graph = import_graph(args.package)
    problems = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    problems += [f"upward import into run plumbing: {m} imports {dep}" for m, dep in upward_into_plumbing(graph)]
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    by_layer: dict[int, list[str]] = {}
    for name, n in layers(graph).items():
        by_layer.setdefault(n, []).append(name)
    for n in sorted(by_layer):
        print(f"layer {n}: {', '.join(sorted(by_layer[n]))}")
        if args.edges:
            for name in sorted(by_layer[n]):
                print(f"    {name} -> {', '.join(sorted(graph[name])) or '-'}")
    plumbing = sorted(m for m in RUN_PLUMBING if m in graph)
    print(f"run plumbing ({', '.join(plumbing)}) imports only itself and {', '.join(sorted(BELOW_PLUMBING))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
