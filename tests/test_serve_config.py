"""``taskorch serve --config``: options and schedules from a TOML file, ``--check-config``, and a
real server whose schedule runs end to end."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from _tasks import scaled, sigstop, wait_until

from taskorch import ServerUnavailableError, connect
from taskorch._service.protocol import trigger_request_frame

R = scaled(30)
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


def hourly_config(tmp_path: Path, out: Path) -> Path:
    """One schedule, "hourly", that stamps ``out`` (an hour apart: it runs when triggered)."""
    return write_config(tmp_path, f'''
[[schedule]]
name = "hourly"
target = "job.py:stamp"
args = ["{out}"]
every = "1h"
''')


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
     "\\[\\[schedule\\]\\] #1 \\('a'\\): .*the minute field '61' is out of range"),
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


class Served(subprocess.Popen[str]):
    said: str = ""  # stderr up to the ready line


def _serve(tmp_path: Path, config: Path, *extra: str) -> tuple[Served, Path]:
    sock = tmp_path / "s.sock"
    proc = Served(
        [sys.executable, "-m", "taskorch", "serve", "--config", str(config), "--socket",
         str(sock), *extra], cwd=tmp_path, env=ENV, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    # The ready line is the handshake. Read a byte at a time from the pipe itself: iterating
    # the file object reads ahead, and what it buffered past the ready line (a schedule's
    # first log line) would never reach communicate(), which reads the pipe.
    while line := _line_of(proc.stderr.fileno()):
        proc.said += line
        if "listening on" in line:
            return proc, sock
    raise AssertionError(f"taskorch serve did not start (exit {proc.wait()})")


def _line_of(fd: int) -> str:
    data = b""
    while not data.endswith(b"\n") and (byte := os.read(fd, 1)):
        data += byte
    return data.decode()


def _stop(proc: Served) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=R)
    assert proc.returncode == 143, err
    return proc.said + err


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
    proc, sock = _serve(tmp_path, config, "--no-journal")  # (waits for "listening on")
    try:
        assert f"listening on unix:{sock} " in proc.said, proc.said  # --socket won over the file
        wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= 2,
                   what="two scheduled runs")
        assert not (tmp_path / "wrong.sock").exists()
    finally:
        _stop(proc)
    stamps = [float(x.split()[0]) for x in out.read_text().splitlines()]
    assert all(b > a for a, b in zip(stamps, stamps[1:]))


def _status(sock: Path, tmp_path: Path) -> dict[str, Any]:
    proc = taskorch("status", "--socket", str(sock), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


def test_status_lists_the_schedules_and_trigger_runs_one_now(tmp_path: Path) -> None:
    out = tmp_path / "stamps"
    config = hourly_config(tmp_path, out)
    proc, sock = _serve(tmp_path, config, "--no-journal")
    try:
        assert not out.exists()
        done = taskorch("trigger", "hourly", "--socket", str(sock), cwd=tmp_path)
        assert done.returncode == 0 and "submitted" in done.stdout, done.stderr
        wait_until(lambda: out.exists(), what="the triggered run")
        wait_until(lambda: _status(sock, tmp_path)["schedules"][0]["last_outcome"] == "succeeded",
                   what="its outcome in status")
        [hourly] = _status(sock, tmp_path)["schedules"]
        assert hourly["name"] == "hourly" and hourly["next_run"] > time.time()
        table = taskorch("status", "--socket", str(sock), cwd=tmp_path)
        assert "schedules:" in table.stdout and "hourly: next" in table.stdout, table.stdout
        nope = taskorch("trigger", "nope", "--socket", str(sock), cwd=tmp_path)
        assert nope.returncode == 1 and "no schedule named 'nope'" in nope.stderr, nope.stderr
    finally:
        _stop(proc)
    assert len(out.read_text().splitlines()) == 1


def test_the_last_fire_survives_restarts_and_missed_ticks_coalesce(tmp_path: Path) -> None:
    from taskorch._service.server.journal import Journal

    out, journal_path = tmp_path / "stamps", tmp_path / "journal.db"
    config = write_config(tmp_path, f'''
[[schedule]]
name = "ten"
target = "job.py:stamp"
args = ["{out}"]
every = "10m"
''')
    # A previous server fired "ten" an hour ago and then was down: six ticks passed since.
    journal = Journal(str(journal_path))
    journal.start()
    journal.schedule_fired("ten", time.time() - 3600)
    journal.close()
    proc, sock = _serve(tmp_path, config, "--journal", str(journal_path))
    try:
        wait_until(lambda: out.exists(), what="the one run for the missed ticks")
        [ten] = _status(sock, tmp_path)["schedules"]
    finally:
        err = _stop(proc)
    assert "missed" in err and "one run for them (misfire=coalesce)" in err, err
    assert len(out.read_text().splitlines()) == 1  # one run for six ticks
    assert ten["last_run"] <= time.time() and ten["next_run"] > time.time()
    # Restarted at once: the last tick ran, so nothing runs now, and status remembers it.
    proc, sock = _serve(tmp_path, config, "--journal", str(journal_path))
    try:
        [again] = _status(sock, tmp_path)["schedules"]
    finally:
        _stop(proc)
    assert again["last_run"] == ten["last_run"]
    assert len(out.read_text().splitlines()) == 1  # no second run for the same tick


def test_a_trigger_whose_answer_was_lost_is_not_sent_again_after_a_reconnect(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A trigger is not idempotent: sent again on the new link, its schedule would run twice if
    # the first frame had been read. The caller gets ServerUnavailableError instead, as for
    # stats(). Order: the server is stopped (SIGSTOP) so no answer can come; the trigger frame
    # is sent (a hook on the session's send); then the server dies and another takes its
    # place on the same socket, where the client reconnects.
    out = tmp_path / "stamps"
    config = hourly_config(tmp_path, out)
    first, sock = _serve(tmp_path, config, "--no-journal")
    second: Served | None = None
    client = connect(str(sock), request_timeout=R)
    try:
        session = client._session
        send = session._send
        sent = threading.Event()

        def send_and_tell(frame: bytes) -> None:
            send(frame)
            if threading.current_thread().name == "test-trigger":
                sent.set()

        monkeypatch.setattr(session, "_send", send_and_tell)
        outcome: list[object] = []

        def trigger() -> None:
            try:
                outcome.append(session.ask(
                    lambda req: trigger_request_frame(req, "hourly"), "trigger()"))
            except Exception as exc:
                outcome.append(exc)

        sigstop(first.pid)
        caller = threading.Thread(target=trigger, name="test-trigger")
        caller.start()
        assert sent.wait(R), "the trigger frame was never sent"
        first.kill()  # (stopped: it never read the frame)
        first.communicate(timeout=R)
        second, _ = _serve(tmp_path, config, "--no-journal")
        caller.join(R)
        assert not caller.is_alive()
        [answer] = outcome
        assert isinstance(answer, ServerUnavailableError), answer
        wait_until(lambda: session.down_reason is None, what="the reconnection")
        # Frames are read in order: whatever the reconnection re-sent came before this.
        assert client.stats().submitted == 0
    finally:
        client.close()
        if first.poll() is None:
            first.kill()
            first.communicate(timeout=R)
        if second is not None:
            _stop(second)
    assert not out.exists()


def test_the_journal_is_ready_again_once_a_commit_goes_through(tmp_path: Path) -> None:
    # /readyz's "journal" check: a failed commit makes it unready until one goes through,
    # a pruning pass included (a server nobody submits to must not stay unready).
    from taskorch._service.server.journal import Journal

    journal = Journal(str(tmp_path / "j.db"))
    try:
        assert journal.unwritable() is None
        journal.last_failure = "OperationalError: database or disk is full"
        assert "disk is full" in (journal.unwritable() or "")
        journal._prune()  # what the writer does at least every PRUNE_INTERVAL
        assert journal.unwritable() is None
    finally:
        journal.close()


def test_check_config_shows_every_wrong_schedule(tmp_path: Path) -> None:
    config = write_config(tmp_path, (
        '[[schedule]]\nname = "a"\ntarget = "job.py:stamp"\ncron = "61 * * * *"\n'
        '[[schedule]]\nname = "b"\ntarget = "job.py:stamp"\nevery = "1m"\n'
        '[[schedule]]\nname = "c"\ntarget = "job.py:stamp"\ncron = "0 0 * 13 *"\n'))
    proc = taskorch("serve", "--config", str(config), "--check-config", cwd=tmp_path)
    assert proc.returncode == 2
    assert f"2 errors in --config {config}" in proc.stderr, proc.stderr
    assert "#1 ('a'): schedule 'a': cron '61 * * * *': the minute field '61'" in proc.stderr
    assert "#3 ('c'): schedule 'c': cron '0 0 * 13 *': the month field '13'" in proc.stderr
    assert "('b')" not in proc.stderr
