"""Structural guards: the package has no import cycle and the core imports no Flax."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "anode_jax"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: pathlib.Path) -> set[str]:
    """Every module name an import statement in `path` names (lazy imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in _imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }


def test_no_two_modules_import_each_other():
    graph = _graph()
    # Package __init__ files re-export their children; a child importing a sibling through the
    # package is still a real edge, but parent -> child re-export edges are not cycles to report.
    cycles = []
    for a, deps in graph.items():
        for b in deps:
            if a in graph.get(b, ()) and not (b.startswith(a + ".") or a.startswith(b + ".")):
                cycles.append(tuple(sorted((a, b))))
    assert not sorted(set(cycles)), f"modules importing each other: {sorted(set(cycles))}"


def test_core_imports_no_flax():
    for path in (PACKAGE / "ode").rglob("*.py"):
        flax = [m for m in _imports(path) if m == "flax" or m.startswith("flax.")]
        assert not flax, f"{path.relative_to(PACKAGE.parent)} imports {flax}"
