"""The shape of the code: imports run one way (no cycle, also through imports inside functions),
and no product module depends on the test kit."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"resprune": ROOT / "resprune", "resprune.strategies": ROOT / "strategies",
            "resprune.backbones": ROOT / "backbones"}


def modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name."""
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports at run time (module level or inside functions;
    `if TYPE_CHECKING:` imports do not run and are left out). `from . import sub` depends on
    `sub`, not on the package's `__init__`."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or _type_checking_only(node, parents):
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                subs = [f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else subs + [module]
            deps |= {t for t in targets if t in mods and t != name}
        graph[name] = deps
    return graph


def test_no_product_module_imports_the_test_kit():
    graph = import_graph()
    offenders = {m: sorted(d for d in deps if d.startswith("resprune.testing"))
                 for m, deps in graph.items() if not m.startswith("resprune.testing")}
    assert not {m: d for m, d in offenders.items() if d}


def test_no_import_cycle():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "resprune.demo" in graph["resprune.cli"]  # cli imports its commands lazily
    assert "resprune.pipeline" not in graph["resprune.interfaces"]  # a TYPE_CHECKING import does not run


def test_every_builtin_plugin_module_is_registered():
    """A module of strategies/ or backbones/ with a registration hook is in BUILTIN_PLUGINS (and the
    reverse), so a new built-in cannot be left out silently."""
    from resprune.plugins import _HOOKS, BUILTIN_PLUGINS

    with_hooks = set()
    for name, path in modules().items():
        if name.startswith(("resprune.strategies", "resprune.backbones")):
            tree = ast.parse(path.read_text())
            if any(isinstance(node, ast.FunctionDef) and node.name in _HOOKS.values() for node in tree.body):
                with_hooks.add(name)
    assert with_hooks == set(BUILTIN_PLUGINS)


def test_one_table_of_plugin_kinds():
    import resprune
    from resprune.plugins import KINDS

    host = resprune.get_host()
    assert [k.name for k in KINDS] == ["scorer", "selector", "merger", "injector", "metric"]
    for kind in KINDS:
        registry = getattr(host, kind.registry)
        assert registry.kind == kind.name and registry.base is kind.base and host.registry(kind.name) is registry
    assert {row_key for row in host.list_plugins() for row_key in row} >= {k.registry for k in KINDS}
