"""The project's scripts (issue 26): ``./scripts/test`` and ``./scripts/demo`` make the venv
through one helper, ``scripts/setup-venv``, under a lock, so that both run at once do not race.

The helper runs on a copy, with a stand-in interpreter (``PYTHON``) that logs each step: its
``-m venv`` waits for a release file (a handshake), so the second helper is started while the
first is inside the creation, and is seen blocked on the lock (``/proc/locks``) before the
first is released."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from _tasks import DEADLOCK_TIMEOUT, wait_until

ROOT = Path(__file__).resolve().parent.parent

# The stand-in interpreter: "-m venv DIR" logs, waits for the release file, makes DIR/bin/python
# (itself); "-m pip ..." logs. TAG tells the two helpers apart.
FAKE_PYTHON = """#!{python}
import os, sys, time
log, release, tag = os.environ["FAKE_LOG"], os.environ["FAKE_RELEASE"], os.environ["TAG"]
def note(what):
    with open(log, "a") as f:
        f.write(f"{{tag}} {{what}}\\n")
if sys.argv[1:3] == ["-m", "venv"]:
    note("venv-begin")
    deadline = time.monotonic() + {deadline}
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.makedirs(os.path.join(sys.argv[3], "bin"))
    os.symlink(os.path.abspath(__file__), os.path.join(sys.argv[3], "bin", "python"))
    note("venv-end")
elif sys.argv[1:3] == ["-m", "pip"] and "install" in sys.argv and "-e" in sys.argv:
    note("pip-install " + sys.argv[-1])
elif sys.argv[1] == "-c":  # (the lock without flock(1))
    exec(sys.argv[2])
"""


def _blocked_on_a_lock(pid: int) -> bool:
    """Is a child of ``pid`` (flock(1)) waiting for a lock? /proc/locks lists each waiter
    with "->"."""
    try:
        children = {c.pid for c in psutil.Process(pid).children()}
    except psutil.NoSuchProcess:
        return False
    with open("/proc/locks") as f:
        return any("->" in line and int(line.split("->")[1].split()[3]) in children
                   for line in f)


@pytest.mark.parametrize("flock", [True, False], ids=["flock(1)", "no flock(1), as on macOS"])
def test_two_setups_at_once_make_the_venv_once_one_after_the_other(tmp_path: Path,
                                                                   flock: bool) -> None:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "setup-venv", repo / "scripts" / "setup-venv")
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable, deadline=DEADLOCK_TIMEOUT))
    fake.chmod(0o755)
    log, release = tmp_path / "log", tmp_path / "release"
    env = {**os.environ, "PYTHON": str(fake), "VENV": ".venv", "FAKE_LOG": str(log),
           "FAKE_RELEASE": str(release)}
    if not flock:  # a PATH with what the script runs but flock(1)
        tools = tmp_path / "bin"
        tools.mkdir()
        for tool in ("bash", "dirname", "grep"):
            (tools / tool).symlink_to(shutil.which(tool) or tool)
        env["PATH"] = str(tools)

    def lines() -> list[str]:
        return log.read_text().splitlines() if log.exists() else []

    def setup(tag: str, extras: str) -> subprocess.Popen[str]:
        return subprocess.Popen([str(repo / "scripts" / "setup-venv"), extras], text=True,
                                env={**env, "TAG": tag}, stderr=subprocess.PIPE)

    first = setup("test", "test,bench")
    try:
        wait_until(lambda: "test venv-begin" in lines(), what="the first setup making the venv")
        second = setup("demo", "")
        try:
            # Without the lock, the second would find no venv and make one too.
            wait_until(lambda: _blocked_on_a_lock(second.pid) or len(lines()) > 1,
                       what="the second setup waiting for the lock")
            release.touch()
            assert first.wait(DEADLOCK_TIMEOUT) == 0, first.communicate()[1]
            assert second.wait(DEADLOCK_TIMEOUT) == 0, second.communicate()[1]
        finally:
            second.kill()
            second.communicate()
    finally:
        first.kill()
        first.communicate()
    assert lines() == ["test venv-begin", "test venv-end", "test pip-install .[test,bench]",
                       "demo pip-install ."]
    assert (repo / ".venv.lock").exists()


def test_test_and_demo_make_the_venv_through_the_locked_helper() -> None:
    for script in ("test", "demo"):
        text = (ROOT / "scripts" / script).read_text()
        assert "./scripts/setup-venv" in text and " -m venv" not in text, script
