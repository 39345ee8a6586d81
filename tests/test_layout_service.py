"""The layering of the service and the CLI, read from the source (no process started).

- only ``taskorch/cli/`` (and ``taskorch/__main__.py``) import ``taskorch.cli``;
- the service's modules host no argparse; the CLI's commands do not import ``cli.main``
  (which imports them all), so there is no cycle;
- ``_wire`` carries the worker channel only; the service protocol lives in ``_service``;
- every service and CLI module says what it is (a docstring) and stays readable (<= 500 lines).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "taskorch"
OURS = sorted([*PACKAGE.glob("_service/**/*.py"), *PACKAGE.glob("cli/*.py")])


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_only_the_cli_imports_the_cli() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("cli/") or relative == "__main__.py":
            continue
        if any(name == "taskorch.cli" or name.startswith("taskorch.cli.")
               for name in _imports(path)):
            offenders.append(relative)
    assert offenders == []


@pytest.mark.parametrize("path", [p for p in OURS if "_service" in p.parts],
                         ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_service_modules_host_no_argparse(path: Path) -> None:
    assert "argparse" not in _imports(path)


@pytest.mark.parametrize("path", [p for p in OURS if p.parent.name == "cli" and p.name not in
                                  ("main.py", "__init__.py", "demo.py")], ids=lambda p: p.name)
def test_cli_commands_do_not_import_cli_main(path: Path) -> None:
    assert "taskorch.cli.main" not in _imports(path)


def test_wire_carries_the_worker_channel_only() -> None:
    source = (PACKAGE / "_wire.py").read_text()
    defined = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined.update(target.id for target in node.targets if isinstance(target, ast.Name))
    service = {"SERVICE_VERSION", "SERVICE_MAX_FRAME", "C_SUBMIT", "S_HELLO", "O_RESULT",
               "encode_service_frame", "decode_client_frame", "encode_stats",
               "ServiceProtocolError"}
    assert defined & service == set()
    assert "noqa: E402" not in source


@pytest.mark.parametrize("path", [p for p in OURS if p.name != "demo.py"],
                         ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_modules_have_a_docstring_and_stay_under_500_lines(path: Path) -> None:
    source = path.read_text()
    assert ast.get_docstring(ast.parse(source)), f"{path.name} has no module docstring"
    assert source.count("\n") <= 500, f"{path.name} has {source.count(chr(10))} lines"
