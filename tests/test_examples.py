"""The documentation's examples run as written: each ```python and ```sh block of README.md and
of every page of ``docs/`` is run (a script, or bash with -e and pipefail), in its page's order,
in one temporary directory per page that holds a copy of ``workers/`` as a checkout does (so a
later block may use a file an earlier one of the same page made, as a reader following along
would), with this venv's ``python`` and ``taskorch`` first on PATH.

An HTML comment on the line before a block changes that, and is meant to be rare:

- ``<!-- readme-test: skip (why) -->``: not run; the reason is required (a block that runs
  for minutes, or needs machines the test does not have).
- ``<!-- readme-test: server PATH -->``: a ``taskorch serve --socket PATH`` is started in
  the page's directory first, and must drain and exit 143 on SIGTERM afterwards.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
from _tasks import scaled, wait_until

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
R = scaled(120)  # seconds: a deadlock guard for one block (the Dask one starts a local cluster)
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_MARKER = re.compile(r"^<!--\s*readme-test:\s*(.*?)\s*-->$", re.M)  # alone on its line


class Block(NamedTuple):
    page: str  # relative to the checkout: README.md, docs/cli.md
    line: int
    language: str
    code: str
    marker: str | None  # the readme-test comment before it, if any


def page_blocks(page: Path) -> list[Block]:
    text = page.read_text()
    name = page.relative_to(ROOT).as_posix()
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = _MARKER.fullmatch(before)
        blocks.append(Block(name, text.count("\n", 0, match.start()) + 1, match.group(1),
                            match.group(2), marker.group(1) if marker else None))
    return blocks


BLOCKS = [block for page in PAGES for block in page_blocks(page)]
RUNNABLE = [b for b in BLOCKS if b.language in ("python", "sh", "bash")]


def test_markers_are_few_and_say_why() -> None:
    skipped = [b for b in RUNNABLE if b.marker and b.marker.startswith("skip")]
    for block in skipped:
        assert re.fullmatch(r"skip \(.+\)", block.marker or ""), f"{block}: no reason"
    for block in RUNNABLE:
        if block.marker:
            assert re.fullmatch(r"skip \(.+\)|server \S+", block.marker), block
    assert len(skipped) <= 6 and len(RUNNABLE) - len(skipped) >= 18
    for page in PAGES:
        markers = _MARKER.findall(page.read_text())
        marked = sum(1 for b in page_blocks(page) if b.marker and b.language in ("python", "sh",
                                                                                 "bash"))
        assert len(markers) == marked, f"{page.name}: a marker that marks no runnable block"


def test_every_page_is_read_and_the_readme_runs_its_quick_start() -> None:
    names = {b.page for b in RUNNABLE if not b.marker}
    assert "README.md" in names and "docs/cli.md" in names, names
    assert len(PAGES) >= 10, PAGES


@pytest.fixture(scope="module")
def checkout_like(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """One directory per page, made on its first block: a copy of workers/ and taskorch.toml."""
    directories: dict[str, Path] = {}

    def directory_for(page: str) -> Path:
        if page not in directories:
            directory = tmp_path_factory.mktemp(re.sub(r"\W", "_", page))
            shutil.copytree(ROOT / "workers", directory / "workers",
                            ignore=shutil.ignore_patterns("__pycache__"))
            shutil.copy(ROOT / "taskorch.toml", directory / "taskorch.toml")  # the demo's config
            directories[page] = directory
        return directories[page]

    return directory_for


@pytest.mark.parametrize("block", RUNNABLE,
                         ids=[f"{b.page}:line{b.line}-{b.language}" for b in RUNNABLE])
def test_example_runs_as_written(block: Block, checkout_like: Callable[[str], Path]) -> None:
    if block.marker and block.marker.startswith("skip"):
        pytest.skip(block.marker)
    cwd = checkout_like(block.page)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    server = None
    if block.marker and block.marker.startswith("server "):
        server = _start_server(block.marker.split(None, 1)[1], cwd, env)
    try:
        if block.language == "python":
            (cwd / "example.py").write_text(block.code)
            argv = [sys.executable, "example.py"]
        else:
            (cwd / "example.sh").write_text(block.code)
            argv = ["bash", "-e", "-o", "pipefail", "example.sh"]
        out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                             timeout=R, stdin=subprocess.DEVNULL)
        assert out.returncode == 0, (
            f"{block.page} line {block.line} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
        assert "Traceback" not in out.stderr, out.stderr
    finally:
        if server is not None:
            proc, log = server
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(R) == 143, log.read_text()


def _start_server(socket: str, cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen[bytes],
                                                                          Path]:
    log = cwd / "serve.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "taskorch", "serve", "--socket", socket],
                                cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}:\n{log.read_text()}")
        return "listening on" in log.read_text()

    wait_until(ready, what="the docs' server")
    return proc, log
