"""The layering of ``taskorch/``, read from its import statements with ``ast``.

Four rules (DESIGN.md "The structure to grow into", STYLE.md "Layout"):

1. No import cycle among taskorch modules (a second test: none even through type-only imports).
2. A module under ``taskorch/_worker/`` imports, of taskorch, only ``taskorch._wire``,
   ``taskorch._framing``, ``taskorch._errors``, ``taskorch._policy``, ``taskorch._stats`` and
   ``taskorch._worker`` modules: never ``taskorch._parent``, ``taskorch._service``,
   ``taskorch.cli``, nor the package ``taskorch`` itself (its public API re-exports the parent
   side).
3. Nothing outside ``taskorch/cli/`` and ``taskorch/__main__.py`` imports ``taskorch.cli``.
4. The service's client code (``taskorch._service.client``, the application's process)
   imports no server code (``taskorch._service.server``, the server process), and the
   reverse; both import the shared ``taskorch._service`` top-level modules.

Which imports count. Every ``import X`` and ``from X import y`` in a file, at any depth: at
module level, inside functions and methods, under ``if TYPE_CHECKING:``, in ``try`` blocks.
Relative imports are resolved against the importing module's package. ``from pkg import
name`` is an edge to the module ``pkg.name`` when that is a module of the tree, else to
``pkg``. An import of ``a.b.c`` is an edge to ``a.b.c`` only, not to the packages ``a`` and
``a.b`` whose ``__init__`` Python runs on the way: with those, every module would sit in a
cycle with a package ``__init__`` that re-exports it, and the cycle would say nothing.
Invisible to this test: ``importlib.import_module`` with a computed name (``taskorch``'s lazy
``__getattr__``), and anything a pickle imports.

- Rules 2, 3 and 4 count every import, TYPE_CHECKING ones included: a type-only dependency of a
  worker module on the parent is still the wrong direction, and is one edit away from a real
  one. A violation says when it is TYPE_CHECKING-only.
- Rule 1 (cycles) counts the imports that run: module level and function level. Function-level
  imports do count: an import moved into a function to dodge a circular-import error leaves
  the two modules just as entangled, and the cycle is reported with the line of that import
  marked "in a function". Its second test counts ``if TYPE_CHECKING:`` imports as well: they
  never execute, but two modules that name each other's types cannot be read apart either.

Each rule is its own test, whose failure lists every violation with file and line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "taskorch"

WORKER_PACKAGE = "taskorch._worker"
WORKER_MAY_IMPORT = ("taskorch._wire", "taskorch._framing", "taskorch._errors",
                     "taskorch._policy", "taskorch._stats", WORKER_PACKAGE)
CLI_PACKAGE = "taskorch.cli"
MAY_IMPORT_CLI = (CLI_PACKAGE, "taskorch.__main__")
SERVICE_CLIENT = "taskorch._service.client"
SERVICE_SERVER = "taskorch._service.server"


@dataclass(frozen=True)
class Import:
    importer: str  # module name, e.g. "taskorch._parent.local"
    target: str  # the taskorch module it imports (see the module docstring)
    path: str  # the importer's file, relative to the checkout
    line: int
    in_function: bool
    type_checking: bool

    def where(self) -> str:
        notes = [n for n, on in (("in a function", self.in_function),
                                 ("under TYPE_CHECKING", self.type_checking)) if on]
        return ", ".join([f"{self.path}:{self.line}", *notes])


def module_names(root: Path, package: str = PACKAGE) -> dict[str, Path]:
    """Every module of the package under ``root``: dotted name -> file."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Collector(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, known: Iterable[str], path: str) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.known = set(known)
        self.path = path
        self.function_depth = 0
        self.type_checking_depth = 0
        self.found: list[Import] = []

    def _add(self, target: str, node: ast.stmt) -> None:
        if target != PACKAGE and not target.startswith(PACKAGE + "."):
            return  # stdlib or third party
        self.found.append(Import(self.module, target, self.path, node.lineno,
                                 self.function_depth > 0, self.type_checking_depth > 0))

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self.function_depth += 1
        self.generic_visit(node)
        self.function_depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.type_checking_depth += 1
            for child in node.body:
                self.visit(child)
            self.type_checking_depth -= 1
            for child in node.orelse:  # `else:` of TYPE_CHECKING runs
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base_parts = self.package.split(".")
            if node.level > 1:
                base_parts = base_parts[: -(node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module or ""
        targets = []  # one edge per module a statement imports, however many names
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            target = submodule if submodule in self.known else base
            if target not in targets:
                targets.append(target)
        for target in targets:
            self._add(target, node)


def read_imports(root: Path, package: str = PACKAGE) -> list[Import]:
    """Every import of a taskorch module by a taskorch module, under ``root``."""
    modules = module_names(root, package)
    found: list[Import] = []
    for name, path in modules.items():
        rel = str(path.relative_to(root))
        collector = _Collector(name, path.name == "__init__.py", modules, rel)
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), rel))
        found.extend(collector.found)
    return found


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


# -- the three rules ------------------------------------------------------------------------------


def find_cycles(
    imports: list[Import], type_checking: bool = False,
) -> list[tuple[list[str], list[Import]]]:
    """Each group of mutually dependent modules (a strongly connected component of the
    runtime import graph: every import but TYPE_CHECKING-only ones, unless ``type_checking``),
    with one shortest cycle through its first module, as the list of the cycle's edges."""
    edges: dict[str, dict[str, Import]] = {}
    for imp in imports:
        if (imp.type_checking and not type_checking) or imp.importer == imp.target:
            continue
        edges.setdefault(imp.importer, {}).setdefault(imp.target, imp)  # first line wins
    nodes = sorted(set(edges) | {t for targets in edges.values() for t in targets})

    # Tarjan's strongly connected components, iteratively (no recursion limit to worry about).
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, {}))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, {})))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))

    cycles = []
    for component in sorted(components):
        members = set(component)
        first = component[0]
        # Breadth-first from `first` back to itself, inside the component: a shortest cycle.
        previous: dict[str, str] = {}
        frontier = [first]
        closing: str | None = None
        while frontier and closing is None:
            following = []
            for node in frontier:
                for child in sorted(edges.get(node, {})):
                    if child == first:
                        closing = node
                        break
                    if child in members and child not in previous:
                        previous[child] = node
                        following.append(child)
                if closing is not None:
                    break
            frontier = following
        assert closing is not None
        path = [closing]
        while path[-1] != first:
            path.append(previous[path[-1]])
        path.reverse()
        path.append(first)
        cycles.append((component, [edges[a][b] for a, b in zip(path, path[1:])]))
    return cycles


def worker_violations(imports: list[Import]) -> list[Import]:
    return [imp for imp in imports
            if _within(imp.importer, WORKER_PACKAGE)
            and not any(_within(imp.target, allowed) for allowed in WORKER_MAY_IMPORT)]


def cli_violations(imports: list[Import]) -> list[Import]:
    return [imp for imp in imports
            if _within(imp.target, CLI_PACKAGE)
            and not any(_within(imp.importer, allowed) for allowed in MAY_IMPORT_CLI)]


def service_side_violations(imports: list[Import]) -> list[Import]:
    """Client code importing server code, or the reverse. Both may import the shared
    ``taskorch._service`` top-level modules (the protocol, addressing, the handshake)."""
    return [imp for imp in imports
            if (_within(imp.importer, SERVICE_CLIENT) and _within(imp.target, SERVICE_SERVER))
            or (_within(imp.importer, SERVICE_SERVER) and _within(imp.target, SERVICE_CLIENT))]


def describe_cycle(component: list[str], cycle: list[Import]) -> str:
    chain = "\n".join(f"      -> {imp.target}   ({imp.where()})" for imp in cycle)
    return (f"  {len(component)} modules: {', '.join(component)}; e.g.\n"
            f"    {cycle[0].importer}\n{chain}")


# -- the tests -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    found = read_imports(ROOT)
    # Not vacuous: the parser sees the tree's known edges.
    importers = {imp.importer for imp in found}
    assert {"taskorch._parent.process", "taskorch._worker.main", "taskorch.__main__"} <= importers
    return found


def test_no_import_cycle_among_taskorch_modules(imports: list[Import]) -> None:
    cycles = find_cycles(imports)
    if cycles:
        pytest.fail(
            f"{len(cycles)} group(s) of taskorch modules that import each other in a cycle "
            "(each with one shortest cycle; function-level imports count, TYPE_CHECKING "
            "ones do not):\n" + "\n".join(describe_cycle(*c) for c in cycles),
            pytrace=False,
        )


def test_no_import_cycle_even_through_type_only_imports(imports: list[Import]) -> None:
    """Two modules that name each other's types are one module in two files: a reader cannot
    take either alone. The fix is a Protocol, or the shared type moved where both can import
    it, never an ``if TYPE_CHECKING:`` that hides the circle."""
    cycles = find_cycles(imports, type_checking=True)
    if cycles:
        pytest.fail(
            f"{len(cycles)} group(s) of taskorch modules that import each other in a cycle "
            "once TYPE_CHECKING imports count too:\n"
            + "\n".join(describe_cycle(*c) for c in cycles),
            pytrace=False,
        )


def test_worker_modules_import_only_shared_modules(imports: list[Import]) -> None:
    bad = worker_violations(imports)
    if bad:
        pytest.fail(
            f"{len(bad)} import(s) in taskorch/_worker/ of taskorch modules other than "
            f"{', '.join(WORKER_MAY_IMPORT)}:\n"
            + "\n".join(f"  {imp.importer} imports {imp.target}   ({imp.where()})" for imp in bad),
            pytrace=False,
        )


def test_nothing_outside_the_cli_imports_it(imports: list[Import]) -> None:
    bad = cli_violations(imports)
    if bad:
        pytest.fail(
            f"{len(bad)} import(s) of taskorch.cli from outside taskorch/cli/ and "
            "taskorch/__main__.py:\n"
            + "\n".join(f"  {imp.importer} imports {imp.target}   ({imp.where()})" for imp in bad),
            pytrace=False,
        )


def test_service_client_and_server_do_not_import_each_other(imports: list[Import]) -> None:
    """``taskorch._service.client`` runs in the application's process and
    ``taskorch._service.server`` in the server's: neither imports the other, type-only
    imports included; what both need is in the shared ``taskorch._service`` modules."""
    sides = {imp.importer for imp in imports if _within(imp.importer, SERVICE_CLIENT)
             or _within(imp.importer, SERVICE_SERVER)}
    assert {f"{SERVICE_CLIENT}.session", f"{SERVICE_SERVER}.server"} <= sides  # not vacuous
    bad = service_side_violations(imports)
    if bad:
        pytest.fail(
            f"{len(bad)} import(s) across the service's client and server sides:\n"
            + "\n".join(f"  {imp.importer} imports {imp.target}   ({imp.where()})" for imp in bad),
            pytrace=False,
        )


def test_the_service_sides_rule_on_a_small_tree(tmp_path: Path) -> None:
    """The rule catches a client module importing the server (type-only too) and a server
    module importing the client, and lets both import the shared modules."""
    files = {
        "__init__.py": "",
        "_service/__init__.py": "",
        "_service/protocol.py": "",
        "_service/client/__init__.py": "",
        "_service/client/session.py": "from taskorch._service import protocol\n"
                                      "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                      "    from taskorch._service.server.server import Server\n",
        "_service/client/api.py": "from . import session\n",
        "_service/server/__init__.py": "",
        "_service/server/server.py": "from taskorch._service.protocol import X\n"
                                     "def f():\n    from ..client import api\n",
    }
    for name, text in files.items():
        path = tmp_path / "taskorch" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    found = read_imports(tmp_path)
    assert [(imp.importer, imp.target, imp.type_checking)
            for imp in service_side_violations(found)] == [
        ("taskorch._service.client.session", "taskorch._service.server.server", True),
        ("taskorch._service.server.server", "taskorch._service.client.api", False)]


def test_the_checker_itself_on_a_small_tree(tmp_path: Path) -> None:
    """The rules catch what they claim to, on a made-up tree: a cycle closed by a
    function-level import, none by a TYPE_CHECKING one, relative imports resolved, a worker
    module importing the parent side, and the CLI imported from the service."""
    files = {
        "__init__.py": "",
        "__main__.py": "from taskorch.cli import main\n",
        "_wire.py": "",
        "_parent/__init__.py": "",
        "_parent/a.py": "from taskorch._parent import b\n",
        "_parent/b.py": "def f():\n    from . import a\n",
        "_parent/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                        "    from taskorch._parent import d\n",
        "_parent/d.py": "import taskorch._parent.c\n",
        "_worker/__init__.py": "",
        "_worker/main.py": "from .. import _wire\nfrom ..import _parent\n"
                           "if TYPE_CHECKING:\n    from taskorch._parent.a import X\n",
        "_service/__init__.py": "",
        "_service/server.py": "def serve():\n    from taskorch.cli.main import usage\n",
        "cli/__init__.py": "",
        "cli/main.py": "from taskorch._service import server\n",
    }
    for name, text in files.items():
        path = tmp_path / "taskorch" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    found = read_imports(tmp_path)

    cycles = {frozenset(component) for component, _ in find_cycles(found)}
    assert cycles == {frozenset({"taskorch._parent.a", "taskorch._parent.b"}),
                      frozenset({"taskorch._service.server", "taskorch.cli.main"})}
    with_types = {frozenset(c) for c, _ in find_cycles(found, type_checking=True)}
    assert with_types == cycles | {frozenset({"taskorch._parent.c", "taskorch._parent.d"})}
    assert [(imp.target, imp.type_checking) for imp in worker_violations(found)] == [
        ("taskorch._parent", False), ("taskorch._parent.a", True)]
    assert [(imp.importer, imp.line, imp.in_function) for imp in cli_violations(found)] == [
        ("taskorch._service.server", 2, True)]
