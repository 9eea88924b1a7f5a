"""Structural guards on the source tree, read with `ast` (nothing is imported).

- The package's import graph (absolute and relative imports, lazy ones included) has no cycle
  of any length.
- The core (`anode_jax/ode/`) and the Flax-free ops (`anode_jax/nn/`) import no Flax.
- Nothing outside a package imports that package's private modules or names (a leading
  underscore), neither by import nor by attribute (`module._name`): the package itself, tests,
  benchmarks, notebooks and scripts alike.
- No list of valid names (three or more name-like strings) is written out in two modules.
- No test asserts a range that every result satisfies (`0 <= accuracy <= 1`).
"""

from __future__ import annotations

import ast
import json
import pathlib
import re
from collections import defaultdict

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "anode_jax"
ROOT = "anode_jax"


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_package(path: pathlib.Path) -> bool:
    return path.name == "__init__.py"


PACKAGE_MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _source_files():
    """(display name, importing module's dotted name or None, source text) for every Python
    source in the repository: the package, tests, benchmarks, scripts, configs, train.py and
    the notebooks' code cells."""
    for path in sorted(REPO.rglob("*.py")):
        rel = path.relative_to(REPO)
        if rel.parts[0].startswith(".") or "site-packages" in rel.parts:
            continue
        yield str(rel), _module_name(path), path, path.read_text()
    for path in sorted((REPO / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        # IPython magics and shell escapes are not Python.
        code = "\n".join(
            line for line in code.splitlines() if not line.lstrip().startswith(("%", "!"))
        )
        yield str(path.relative_to(REPO)), None, path, code


def _resolve_from(module: str | None, path: pathlib.Path, node: ast.ImportFrom) -> str | None:
    """The absolute module a `from ... import` names, relative imports resolved."""
    if node.level == 0:
        return node.module
    if module is None:
        return None
    base = module.split(".")
    if not _is_package(path):
        base = base[:-1]  # a module's relative imports start from its package
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imported(module: str | None, path: pathlib.Path, tree: ast.AST):
    """Yields (absolute module, imported name or None, node) for every import in `tree`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node
        elif isinstance(node, ast.ImportFrom):
            target = _resolve_from(module, path, node)
            if target is None:
                continue
            for alias in node.names:
                yield target, alias.name, node


def _edges(module: str, path: pathlib.Path, tree: ast.AST) -> set[str]:
    """The package modules `module` imports. `from P import x` is an edge to the submodule P.x
    when x is one, else to P; importing a module initializes its ancestor packages first, which
    is not an edge of its own (else every child would be "in a cycle" with its parent)."""
    deps = set()
    for target, name, _ in _imported(module, path, tree):
        if name is not None and f"{target}.{name}" in PACKAGE_MODULES:
            deps.add(f"{target}.{name}")
        elif target in PACKAGE_MODULES:
            deps.add(target)
    deps.discard(module)
    return deps


def _graph() -> dict[str, set[str]]:
    return {
        name: _edges(name, path, ast.parse(path.read_text()))
        for name, path in PACKAGE_MODULES.items()
    }


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan 1972): every
    import cycle, of any length, lies inside one."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def test_relative_imports_are_followed():
    # ode/adjoints/* import their siblings; resolution must land on real modules.
    tree = ast.parse("from .base import forward\nfrom .. import _loop\nfrom . import anode\n")
    path = PACKAGE / "ode" / "adjoints" / "checkpointed.py"
    resolved = {(m, n) for m, n, _ in _imported("anode_jax.ode.adjoints.checkpointed", path, tree)}
    assert resolved == {
        ("anode_jax.ode.adjoints.base", "forward"),
        ("anode_jax.ode", "_loop"),
        ("anode_jax.ode.adjoints", "anode"),
    }
    edges = _edges("anode_jax.ode.adjoints.checkpointed", path, tree)
    assert edges == {
        "anode_jax.ode.adjoints.base",
        "anode_jax.ode._loop",
        "anode_jax.ode.adjoints.anode",
    }


def test_cycle_finder_sees_long_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"d"}, "d": {"a"}, "e": {"a"}}
    assert _cycles(graph) == [["a", "b", "c", "d"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles (each list is one strongly connected set): {cycles}"


def _imports_flax(path: pathlib.Path) -> list[str]:
    module = _module_name(path)
    return sorted(
        {
            target
            for target, _, _ in _imported(module, path, ast.parse(path.read_text()))
            if target == "flax" or target.startswith("flax.")
        }
    )


def test_core_imports_no_flax():
    for path in (PACKAGE / "ode").rglob("*.py"):
        flax = _imports_flax(path)
        assert not flax, f"{path.relative_to(REPO)} imports {flax}"


def test_nn_imports_no_flax():
    for path in (PACKAGE / "nn").rglob("*.py"):
        flax = _imports_flax(path)
        assert not flax, f"{path.relative_to(REPO)} imports {flax}"


def _private_owner(dotted: str) -> str | None:
    """The package whose private part `dotted` (a module or module.name) is: the parent of
    its first underscore component (dunders such as __version__ are public)."""
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not (part.startswith("__") and part.endswith("__")):
            return ".".join(parts[:i])
    return None


def _inside(module: str | None, package: str) -> bool:
    return module is not None and (module == package or module.startswith(package + "."))


def _private_uses(display, module, path, text):
    """(file, line, what) for every use of another package's private module or name."""
    tree = ast.parse(text)
    found = []
    bound = {}  # local name -> anode_jax module it is bound to
    for target, name, node in _imported(module, path, tree):
        if not (target == ROOT or target.startswith(ROOT + ".")):
            continue
        dotted = target if name is None else f"{target}.{name}"
        owner = _private_owner(dotted)
        if owner is not None and not _inside(module, owner):
            found.append((display, node.lineno, dotted))
        if name is None:
            for alias in node.names:
                if alias.name == target and alias.asname:
                    bound[alias.asname] = target
        elif dotted in PACKAGE_MODULES:
            alias = next(a for a in node.names if a.name == name)
            bound[alias.asname or name] = dotted
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in bound
        ):
            dotted = f"{bound[node.value.id]}.{node.attr}"
            owner = _private_owner(dotted)
            if owner is not None and not _inside(module, owner):
                found.append((display, node.lineno, dotted))
    return found


# Private uses allowed across packages (file, dotted name): none at present.
PRIVATE_IMPORT_ALLOWLIST: set[tuple[str, str]] = set()


def test_no_private_imports_across_packages():
    uses = [u for source in _source_files() for u in _private_uses(*source)]
    new = sorted(u for u in uses if (u[0], u[2]) not in PRIVATE_IMPORT_ALLOWLIST)
    assert not new, "private modules or names used outside their package:\n" + "\n".join(
        f"{f}:{line}: {what}" for f, line, what in new
    )
    stale = PRIVATE_IMPORT_ALLOWLIST - {(u[0], u[2]) for u in uses}
    assert not stale, f"allowlisted private uses that are gone (delete them): {sorted(stale)}"


def test_private_use_finder_sees_every_spelling():
    text = (
        "from anode_jax.ode._loop import integrate\n"
        "from anode_jax.ode import _policy\n"
        "import anode_jax.training.loop as loop\n"
        "from anode_jax.models import _blocks as blocks\n"
        "from anode_jax.training import loop as loop2\n"
        "loop._setup()\nloop2._helper\nloop.__name__\n"
    )
    found = {what for _, _, what in _private_uses("t.py", None, REPO / "t.py", text)}
    assert found == {
        "anode_jax.ode._loop.integrate",
        "anode_jax.ode._policy",
        "anode_jax.models._blocks",
        "anode_jax.training.loop._setup",
        "anode_jax.training.loop._helper",
    }
    # Inside the owning package a private import is fine.
    inside = _private_uses(
        "x", "anode_jax.ode.adjoints.anode", PACKAGE / "ode/adjoints/anode.py", text
    )
    assert {w for _, _, w in inside} == {
        "anode_jax.models._blocks",
        "anode_jax.training.loop._setup",
        "anode_jax.training.loop._helper",
    }


_NAME = re.compile(r"^[a-z][a-z0-9_:\-]*$")


def _name_lists(tree: ast.AST):
    for node in ast.walk(tree):
        # list, tuple and set literals, and the keys of registries: dict literals whose values
        # are all names (`{"small": SmallNet, ...}`; not records such as `{"count": n, ...}`)
        if isinstance(node, ast.Dict):
            registry = all(isinstance(v, (ast.Name, ast.Attribute)) for v in node.values)
            elts = node.keys if registry else []
        else:
            elts = getattr(node, "elts", [])
        if isinstance(node, (ast.List, ast.Tuple, ast.Set, ast.Dict)) and len(elts) >= 3:
            values = [e.value for e in elts if isinstance(e, ast.Constant)]
            if (
                len(values) == len(elts)
                and all(isinstance(v, str) and _NAME.match(v) for v in values)
                and len(set(values)) >= 3
            ):
                yield node.lineno, frozenset(values)


def test_no_list_of_names_written_in_two_modules():
    """A second copy of a list of valid names (solvers, adjoints, models, datasets, ...)
    drifts from the first; import it from its home instead."""
    where = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        for line, names in _name_lists(ast.parse(path.read_text())):
            where[names].add(f"{path.relative_to(REPO)}:{line}")
    duplicated = {
        tuple(sorted(names)): sorted(places)
        for names, places in where.items()
        if len({p.split(":")[0] for p in places}) > 1
    }
    new = {k: v for k, v in duplicated.items() if k not in DUPLICATED_NAME_LIST_ALLOWLIST}
    assert not new, f"lists of names written out in more than one module: {new}"
    stale = set(DUPLICATED_NAME_LIST_ALLOWLIST) - set(duplicated)
    assert not stale, f"allowlisted duplicated lists that are gone (delete them): {stale}"


# Duplicated name lists allowed: none (an entry would map the names to where the copy is).
DUPLICATED_NAME_LIST_ALLOWLIST: dict[tuple[str, ...], str] = {}


def _range_asserts(tree: ast.AST):
    """Asserts of the form `0 <= x <= 1` (or 0 < x < 100 ...): a range every accuracy,
    fraction or percentage lies in, so the assertion cannot fail on a real result."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Assert):
            continue
        for cmp in ast.walk(node.test):
            if not (isinstance(cmp, ast.Compare) and len(cmp.ops) == 2):
                continue
            lo, hi = cmp.left, cmp.comparators[1]
            if (
                isinstance(lo, ast.Constant)
                and isinstance(hi, ast.Constant)
                and all(isinstance(op, (ast.Lt, ast.LtE)) for op in cmp.ops)
                and lo.value == 0
                and hi.value in (1, 100)
            ):
                yield node.lineno


def test_no_assertion_of_the_trivial_range():
    found = [
        f"{path.relative_to(REPO)}:{line}"
        for path in sorted((REPO / "tests").glob("*.py"))
        for line in _range_asserts(ast.parse(path.read_text()))
    ]
    assert not found, f"asserts a range every result lies in (assert a real value): {found}"
    assert list(_range_asserts(ast.parse("assert 0.0 <= acc <= 1.0\nassert 0 < x < 100\n"))) == [
        1,
        2,
    ]


def test_one_docstring_markup():
    """Docstrings and comments use Markdown's single backticks (what docs/ renders), not reST
    double backticks or Sphinx roles such as :func:`x`."""
    rest = re.compile(r"``|:(?:func|data|class|meth|mod|attr|obj|exc):`")
    found = [
        f"{path.relative_to(REPO)}:{number}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if rest.search(line)
    ]
    assert not found, f"reST markup in the package (use `name`): {found}"
