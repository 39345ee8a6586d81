"""The shape of ``taskorch/`` that keeps it readable, read with ``ast`` (issue 21's "done when").

- No module over ``MAX_MODULE_LINES`` lines, no function over ``MAX_FUNCTION_LINES``: past
  them, a module holds two jobs, a function two steps that deserve names.
- No module imports a private name (``from taskorch.x import _y``) from a module of another
  package: a private name is its package's own business.
- No module reads or writes another object's private attribute (``obj._x``) unless the name is
  one its own module defines (a class reaching into an instance of itself, or a module-level
  helper of that class). Each object says what it offers through public methods; state that
  one object keeps, such as the backlog's queue and counters, is touched only through them.
  A few names belong to the standard library, whose documented internals taskorch relies on
  (``STDLIB_PRIVATE``, each with its reason).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "taskorch"

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80

#: Private attributes of the standard library that taskorch uses on purpose, and why.
STDLIB_PRIVATE = {
    "_exit": "os._exit: a worker leaves without running the parent's atexit hooks",
    "_run_exitfuncs": "atexit._run_exitfuncs: a worker runs the task's atexit hooks itself",
    "_popen": "multiprocessing Process._popen: the exit fd (pidfd) and the reap",
    "_children": "multiprocessing.process._children: workers are not multiprocessing's to join",
    "_actions": "argparse's parser._actions: the config file is checked against the options",
    "_AppendAction": "argparse._AppendAction: the config file's lists for repeatable options",
    "_release_save": "threading.Condition's lock protocol, on the future's own RLock",
    "_acquire_restore": "threading.Condition's lock protocol, on the future's own RLock",
    "_is_owned": "threading.Condition's lock protocol, on the future's own RLock",
    "_fields": "a NamedTuple's documented field names (the codecs of _wire and protocol)",
}


def _modules() -> list[tuple[str, ast.Module]]:
    return [(str(path.relative_to(ROOT)), ast.parse(path.read_text(encoding="utf-8")))
            for path in sorted(PACKAGE_DIR.rglob("*.py"))]


def _package_of(path: str) -> str:
    return str(Path(path).parent).replace("/", ".")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _own_private_names(tree: ast.Module) -> set[str]:
    """The private names a module defines: functions, classes, attributes assigned on any
    object, class-level and module-level assignments."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {name for name in names if _is_private(name)}


def _is_self(node: ast.expr) -> bool:
    if isinstance(node, ast.Name):
        return node.id in ("self", "cls")
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id == "super")


def oversized(modules: list[tuple[str, ast.Module]], sources: dict[str, int]) -> list[str]:
    found = [f"{path}: {lines} lines (at most {MAX_MODULE_LINES})"
             for path, lines in sources.items() if lines > MAX_MODULE_LINES]
    for path, tree in modules:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    found.append(f"{path}:{node.lineno}: {node.name}() is {length} lines "
                                 f"(at most {MAX_FUNCTION_LINES})")
    return found


def private_imports(modules: list[tuple[str, ast.Module]]) -> list[str]:
    found = []
    for path, tree in modules:
        here = _package_of(path)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                    and node.module.startswith("taskorch")):
                continue
            source_package = node.module.rpartition(".")[0] or node.module
            if source_package == here:
                continue
            for alias in node.names:
                if _is_private(alias.name):
                    found.append(f"{path}:{node.lineno}: from {node.module} import {alias.name}")
    return found


def foreign_private_attributes(modules: list[tuple[str, ast.Module]]) -> list[str]:
    found = []
    for path, tree in modules:
        own = _own_private_names(tree)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _is_private(node.attr)
                    and not _is_self(node.value) and node.attr not in own
                    and node.attr not in STDLIB_PRIVATE):
                found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


@pytest.fixture(scope="module")
def modules() -> list[tuple[str, ast.Module]]:
    found = _modules()
    assert len(found) > 50  # not vacuous: the whole package was read
    return found


def test_no_module_or_function_too_long(modules: list[tuple[str, ast.Module]]) -> None:
    sources = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
               for p in sorted(PACKAGE_DIR.rglob("*.py"))}
    bad = oversized(modules, sources)
    assert not bad, "too long:\n  " + "\n  ".join(bad)


def test_no_private_name_imported_from_another_package(
    modules: list[tuple[str, ast.Module]],
) -> None:
    bad = private_imports(modules)
    assert not bad, "private names imported across packages:\n  " + "\n  ".join(bad)


def test_no_module_touches_another_objects_private_attributes(
    modules: list[tuple[str, ast.Module]],
) -> None:
    bad = foreign_private_attributes(modules)
    assert not bad, (
        "private attributes of objects defined elsewhere (give their owner a public method):"
        "\n  " + "\n  ".join(bad))


def test_the_checks_on_a_small_tree() -> None:
    """Each check finds what it claims to, on made-up sources."""
    owner = ast.parse("class Backlog:\n    def __init__(self):\n        self._pending = []\n"
                      "    def _take(self):\n        return self._pending.pop()\n"
                      "def helper(b):\n    return b._pending\n")
    reader = ast.parse("from taskorch._parent.backlog import _helper, Backlog\n"
                       "import os\n"
                       "def f(backlog):\n    backlog._pending.clear()\n    os._exit(1)\n"
                       "    return super()._x\n")
    trees = [("taskorch/_parent/backlog.py", owner), ("taskorch/_service/server.py", reader)]
    assert foreign_private_attributes(trees) == [
        "taskorch/_service/server.py:4: backlog._pending"]
    assert private_imports(trees) == [
        "taskorch/_service/server.py:1: from taskorch._parent.backlog import _helper"]
    long_function = ast.parse("def f():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert oversized([("m.py", long_function)], {"m.py": MAX_MODULE_LINES + 1}) == [
        f"m.py: {MAX_MODULE_LINES + 1} lines (at most {MAX_MODULE_LINES})",
        f"m.py:1: f() is {MAX_FUNCTION_LINES + 1} lines (at most {MAX_FUNCTION_LINES})"]
