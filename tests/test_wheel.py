"""Packaging: ``python -m build`` makes a wheel and an sdist of the checkout; the wheel installs
into a fresh venv, where ``taskorch --help`` and one task run (from outside the checkout, so
that nothing comes from it). pip's cache is used as usual; the build and the install reach
PyPI only for what they cannot find there."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from _tasks import scaled

ROOT = Path(__file__).resolve().parent.parent
R = scaled(600)  # seconds: a deadlock guard; a cold pip cache means downloads


def run(*argv: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    out = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=R,
                         env=env, **kwargs)  # type: ignore[call-overload]
    assert out.returncode == 0, f"{argv} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out  # type: ignore[no-any-return]


@pytest.mark.timeout(R * 3)
def test_the_wheel_builds_installs_in_a_fresh_venv_and_runs_a_task(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    run(sys.executable, "-m", "build", "--outdir", dist, ROOT)
    [wheel] = dist.glob("taskorch-*.whl")
    [sdist] = dist.glob("taskorch-*.tar.gz")
    names = zipfile.ZipFile(wheel).namelist()
    assert "taskorch/py.typed" in names and "taskorch/cli/main.py" in names
    assert not any(n.startswith(("tests/", "workers/")) for n in names)
    with tarfile.open(sdist) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    assert {"pyproject.toml", "README.md", "taskorch/__init__.py"} <= members

    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    bin_dir = venv / "bin"
    run(bin_dir / "python", "-m", "pip", "install", "--quiet", wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run(bin_dir / "taskorch", "--help", cwd=elsewhere)
    assert "run" in out.stdout and "serve" in out.stdout
    where = run(bin_dir / "python", "-c", "import taskorch; print(taskorch.__file__)",
                cwd=elsewhere).stdout
    assert str(venv) in where and str(ROOT) not in where
    (elsewhere / "job.py").write_text("def square(x):\n    return x * x\n")
    out = run(bin_dir / "taskorch", "run", "job.py:square", input="[7]\n", cwd=elsewhere)
    assert '"result": 49' in out.stdout and '"ok": true' in out.stdout
