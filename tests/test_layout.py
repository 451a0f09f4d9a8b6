"""The shape of the package: one package per mode, imports that run one way, cores free of the
transport. Read from the source with ``ast``, so function-level imports count too."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from questsig import app

PACKAGE = Path(__file__).resolve().parent.parent / "questsig"
#: what a core may not import: the reactor, the web and application layers, Autobahn
FORBIDDEN_IN_CORE = ("twisted.internet.reactor", "twisted.web", "twisted.application",
                     "autobahn", "twisted.internet.task", "twisted.internet.threads")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth of its code, resolved to full names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            # ``from questsig.hub import push`` imports the submodule questsig.hub.push
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges[name] = {m for m in imports_of(path) if m in modules and m != name}
    return edges


def test_every_mode_is_a_package_of_the_same_shape() -> None:
    """Each registered mode has a face, a core and an adapter, and its face names itself."""
    for name, module in app.MODULES.items():
        directory = PACKAGE / module.split(".")[-1]
        for part in ("__init__.py", "core.py", "adapter.py"):
            assert (directory / part).is_file(), f"{module}: no {part}"
        face = app.load(name)
        assert face.NAME == name
        assert face.DEFAULT_PREFIX.startswith("/")
        assert face.SETTINGS and callable(face.make_service)


def test_no_module_imports_one_that_imports_it_back() -> None:
    """The import graph of questsig has no cycle, counting imports inside functions."""
    edges = graph()
    # a module importing its own package's face would be a cycle through the package import
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle.extend(path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, path + [node]):
                return True
        state[node] = 2
        return False

    for module in sorted(edges):
        if state.get(module) is None and visit(module, []):
            break
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_submodules_never_import_their_face() -> None:
    """A mode's core and glue do not import the mode's own face (the face imports them)."""
    edges = graph()
    for module in app.MODULES.values():
        for name, targets in edges.items():
            if name.startswith(module + "."):
                assert module not in targets, f"{name} imports its face {module}"


@pytest.mark.parametrize("mode", list(app.MODULES))
def test_cores_are_free_of_the_transport(mode: str) -> None:
    """A core imports no reactor, no twisted.web, no twisted.application and no Autobahn."""
    path = PACKAGE / app.MODULES[mode].split(".")[-1] / "core.py"
    for imported in imports_of(path):
        assert not imported.startswith(FORBIDDEN_IN_CORE), f"{path.name} of {mode} imports {imported}"
        assert not imported.endswith(".adapter"), f"core of {mode} imports {imported}"
