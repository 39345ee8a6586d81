"""``taskorch serve --config``: options and schedules from a TOML file, ``--check-config``, and a
real server whose schedule runs end to end."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _tasks import wait_until

R = 30
REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}

JOB = '''
import os, time
def stamp(path):
    with open(path, "a") as f:
        f.write(f"{time.time()} {os.getpid()}\\n")
    return path
'''


def taskorch(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "taskorch", *args], capture_output=True,
                          text=True, timeout=R, cwd=cwd, env=ENV)


def write_config(tmp_path: Path, body: str) -> Path:
    (tmp_path / "job.py").write_text(JOB)
    path = tmp_path / "taskorch.toml"
    path.write_text(body)
    return path


def test_the_repository_config_checks_and_prints_the_next_fire_times() -> None:
    proc = taskorch("serve", "--config", "taskorch.toml", "--check-config", cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "config ok: 4 schedule(s)" in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if x.startswith("rotate-logs:"))
    assert "cron '15 3 * * *' (Europe/Berlin)" in line and line.count("UTC") == 3


@pytest.mark.parametrize(("body", "message"), [
    ("workers = 2\n[[schedule]\n", "not valid TOML.*line 2"),
    ("wokers = 2\n", "unknown key 'wokers' \\(did you mean 'workers'\\?\\)"),
    ("workers = 0\n", "workers: .*>= 1"),
    ("drop = 3\n", "drop: must be true or false"),
    ('[[schedule]]\nname = "a"\ntarget = "job.py:stamp"\ncron = "61 * * * *"\n',
     "\\[\\[schedule\\]\\] #1 \\('a'\\): .*not a cron expression"),
    ('[[schedule]]\nname = "a"\ntarget = "job.py:nope"\nevery = "1m"\n',
     "#1 \\('a'\\): target: .*has no attribute 'nope'"),
    ('[[schedule]]\nname = "a"\ntarget = "job.py:stamp"\nevery = "1m"\n'
     '[[schedule]]\nname = "a"\ntarget = "job.py:stamp"\nevery = "2m"\n',
     "#2 \\('a'\\): a schedule named 'a' is defined twice"),
    ('[[schedule]]\nname = "a"\ntarget = "job.py:stamp"\nevry = "1m"\n',
     "unknown key 'evry' \\(did you mean 'every'\\?\\)"),
    ('[[schedule]]\ntarget = "job.py:stamp"\nevery = "1m"\n', "'name' is required"),
])
def test_a_bad_config_is_refused_with_the_file_and_the_key(
    tmp_path: Path, body: str, message: str,
) -> None:
    config = write_config(tmp_path, body)
    proc = taskorch("serve", "--config", str(config), "--check-config", cwd=tmp_path)
    assert proc.returncode == 2
    assert str(config) in proc.stderr
    assert re.search(message, proc.stderr), proc.stderr


def test_a_path_target_is_read_relative_to_the_config_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[[schedule]]\nname = "s"\ntarget = "job.py:stamp"\n'
                                    'args = ["x"]\nevery = "1h"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = taskorch("serve", "--config", str(config), "--check-config", cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert "s: job.py:stamp, every 3600 s" in proc.stdout


def test_a_real_server_runs_its_schedule_and_the_command_line_wins(tmp_path: Path) -> None:
    out = tmp_path / "stamps"
    config = write_config(tmp_path, f'''
socket = "{tmp_path / 'wrong.sock'}"
workers = 1
[[schedule]]
name = "stamp"
target = "job.py:stamp"
args = ["{out}"]
every = "1s"
overlap = "skip"
''')
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskorch", "serve", "--config", str(config), "--socket",
         str(sock)], cwd=tmp_path, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert f"listening on {sock}" in line or str(sock) in line, line
        wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= 2, timeout=R,
                   what="two scheduled runs")
        assert not (tmp_path / "wrong.sock").exists()  # --socket overrode the file's
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=R)
    assert proc.returncode == 143, err
    stamps = [float(x.split()[0]) for x in out.read_text().splitlines()]
    assert all(b > a for a, b in zip(stamps, stamps[1:]))
