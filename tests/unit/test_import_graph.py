"""No import cycle in the product code (issue 15): every import counts, including those inside
functions (a lazy import hides a cycle from Python, not from a reader); imports only for type
checkers (`if TYPE_CHECKING:`) do not run and are left out."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "crm_sync": ROOT / "include" / "crm_sync",
    "crm_connectors": ROOT / "plugins" / "crm_connectors",
}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


def _type_checking_only(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = _type_checking_only(tree)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the product modules it imports (at any depth of its code)."""
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_include_and_plugins() -> None:
    graph = import_graph()
    assert "crm_sync.runner" in graph and "crm_connectors.dynamics365" in graph
    assert cycles(graph) == []


def test_the_hooks_do_not_import_the_sync_library() -> None:
    """The connectors only talk HTTP: nothing in `crm_connectors` imports `crm_sync`."""
    graph = import_graph()
    leaks = {
        module: sorted(t for t in targets if t.startswith("crm_sync"))
        for module, targets in graph.items()
        if module.startswith("crm_connectors")
    }
    assert {m: t for m, t in leaks.items() if t} == {}


def imports_of_tools(source: str) -> list[str]:
    """What `source` imports from `sandbox` or `devtools`, at any depth of its code."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            targets = [node.module or ""]
        else:
            continue
        found += [t for t in targets if t.split(".")[0] in ("sandbox", "devtools")]
    return found


def test_the_product_does_not_import_the_sandbox_or_the_developer_tools() -> None:
    """The production image has neither `sandbox` nor `devtools`: no product module imports them
    (`devtools` imports the product, not the other way round)."""
    leaks = {name: imports_of_tools(path.read_text()) for name, path in _modules().items()}
    assert {name: found for name, found in leaks.items() if found} == {}
    lazy = (
        "def f():\n    from sandbox.credentials import connection_env\n    import devtools.demo\n"
    )
    assert imports_of_tools(lazy) == ["sandbox.credentials", "devtools.demo"]
