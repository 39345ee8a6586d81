"""Per-name limits in ``taskorch serve`` (issue 24): ``--limit`` and ``[[limit]]`` checked by
``--check-config`` (every error listed, each naming its entry or flag), and a real server that
holds every client's tasks of a limited name to its concurrency, measured by the tasks
themselves, while other tasks pass and the held ones show as waiting."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import _tasks as t
import pytest
import test_service
from test_service import R

from taskorch import Policy

short_dir = test_service.short_dir
start_server = test_service.start_server
NO_RETRY = Policy(retries=0)  # a second holder of the lock must fail, not wait and retry


def check(tmp_path: Path, body: str, *flags: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "taskorch.toml"
    config.write_text(body)
    return subprocess.run(
        [sys.executable, "-m", "taskorch", "serve", "--config", str(config), "--check-config",
         *flags], capture_output=True, text=True, timeout=R, cwd=tmp_path)


def test_check_config_prints_the_limits_of_the_file_and_the_flags(tmp_path: Path) -> None:
    proc = check(tmp_path, '[[limit]]\nname = "myapp.jobs.purge"\nconcurrency = 1\n'
                           'rate = "10/s"\n[[limit]]\nname = "myapp.jobs.mail"\nrate = "30/m"\n',
                 "--limit", "myapp.jobs.mail=concurrency:2", "--limit", "x.y=rate:1/h")
    assert proc.returncode == 0, proc.stderr
    assert "config ok: 0 schedule(s), 3 limit(s)" in proc.stdout
    assert "limit myapp.jobs.purge: concurrency 1, rate 10/s" in proc.stdout
    assert "limit myapp.jobs.mail: concurrency 2\n" in proc.stdout  # the command line wins
    assert "limit x.y: rate 1/h" in proc.stdout


@pytest.mark.parametrize(("entry", "message"), [
    ('name = "a.b"\nconcurency = 1', "#1 \\('a.b'\\): unknown field 'concurency' \\(did you "
                                     "mean 'concurrency'\\?\\)"),
    ('name = "a.b"\nrate = "10/d"', "#1 \\('a.b'\\): rate must be 'N/s', 'N/m' or 'N/h'"),
    ('name = "a.b"\nrate = 10', "#1 \\('a.b'\\): rate must be 'N/s'.*got 10"),
    ('name = "a.b"\nconcurrency = 0', "#1 \\('a.b'\\): concurrency must be an integer >= 1, "
                                      "got 0"),
    ('name = "a.b"\nconcurrency = "1"', "#1 \\('a.b'\\): concurrency must be .*, got '1'"),
    ('name = "a.b"', "#1 \\('a.b'\\): give concurrency, rate, or both"),
    ("concurrency = 1", "#1: 'name' is required"),
    ('name = "myapp.jobs:purge"\nconcurrency = 1',
     "#1 \\('myapp.jobs:purge'\\): a limit names a task by its module and qualified name, "
     "dot-joined: 'myapp.jobs.purge', not 'myapp.jobs:purge'"),
])
def test_a_bad_limit_entry_is_refused_naming_it(tmp_path: Path, entry: str,
                                                message: str) -> None:
    proc = check(tmp_path, f"[[limit]]\n{entry}\n")
    assert proc.returncode == 2
    assert re.search(f"--config {re.escape(str(tmp_path))}.*\\[\\[limit\\]\\] {message}",
                     proc.stderr), proc.stderr


def test_check_config_lists_every_wrong_limit_and_flag(tmp_path: Path) -> None:
    proc = check(tmp_path, '[[limit]]\nname = "a"\nconcurrency = 1\n'
                           '[[limit]]\nname = "a"\nrate = "1/s"\n'
                           '[[limit]]\nname = "b"\nrate = "often"\n'
                           '[[limit]]\nname = "c"\nconcurrency = 3\n'
                           '[[schedule]]\nname = "s"\ntarget = "nowhere.py:f"\nevery = "1m"\n',
                 "--limit", "x=concurrency:2", "--limit", "x=rate:1/s",
                 "--limit", "y=burst:3", "--limit", "z", "--limit", "w=rate:5/d",
                 "--limit", "jobs:purge=rate:1/s")
    assert proc.returncode == 2
    config = tmp_path / "taskorch.toml"
    assert f"8 errors in --config {config} and --limit:" in proc.stderr, proc.stderr
    for expected in ("[[schedule]] #1 ('s'): target:",
                     "[[limit]] #2 ('a'): a limit for 'a' is defined twice",
                     "[[limit]] #3 ('b'): rate must be 'N/s', 'N/m' or 'N/h'",
                     "--limit 'x=rate:1/s': a limit for 'x' is given twice",
                     "--limit 'y=burst:3': unknown field 'burst'",
                     "--limit 'z': expected NAME=concurrency:N,rate:N/s",
                     "--limit 'w=rate:5/d': rate must be",
                     "--limit 'jobs:purge=rate:1/s': a limit names a task by its module and "
                     "qualified name, dot-joined: 'jobs.purge', not 'jobs:purge'"):
        assert expected in proc.stderr, (expected, proc.stderr)
    assert "('c')" not in proc.stderr and "#1 ('a')" not in proc.stderr


def test_a_bad_limit_flag_stops_serve_before_it_listens(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "taskorch", "serve", "--socket", str(tmp_path / "s.sock"),
         "--no-journal", "--limit", "myapp.jobs.purge=concurrency:0"],
        capture_output=True, text=True, timeout=R, cwd=tmp_path)
    assert proc.returncode == 2
    assert ("--limit 'myapp.jobs.purge=concurrency:0': concurrency must be an integer >= 1"
            in proc.stderr), proc.stderr
    assert "listening" not in proc.stderr and not (tmp_path / "s.sock").exists()


def test_a_served_limit_holds_every_task_of_its_name_while_others_pass(start_server,
                                                                       short_dir) -> None:
    name = f"{t.exclusive_logged.__module__}.{t.exclusive_logged.__qualname__}"
    server = start_server("--workers", "3", "--limit", f"{name}=concurrency:1")
    lock, log = str(short_dir / "held"), str(short_dir / "log")
    gate = t.Gate(short_dir, "first")
    with server.connect() as client, server.connect() as other_client:
        first = client.with_policy(NO_RETRY).run(t.exclusive_logged, lock, log,
                                                 str(gate.started), str(gate.release_fifo))
        gate.wait_started()  # it holds the name's one slot, and the lock, until released
        try:  # 40 more of that name from two clients, then 30 others
            limited = [c.with_policy(NO_RETRY).run(t.exclusive_logged, lock, log)
                       for c in (client, other_client) for _ in range(20)]
            others = [client.run(t.square, i) for i in range(30)]  # on the two other workers
            assert [f.result(R) for f in others] == [i * i for i in range(30)]
            assert not first.done() and not any(f.done() for f in limited)
            ids = {c.accepted(f, R) for c, f in zip([client] * 20 + [other_client] * 20,
                                                    limited)}
            assert {client.task(i).state for i in ids} == {"waiting"}  # held by the limit
            assert {i.id for i in client.tasks(state="waiting", limit=100)} == ids
            assert not ids & {i.id for i in client.tasks(state="queued", limit=100)}
            assert client.task(client.accepted(first, R)).state == "running"
        finally:
            gate.release()
        assert first.result(R) == lock
        assert [f.result(R) for f in limited] == [lock] * 40  # none found the lock held
    assert t.most_at_once(log) == 1
    assert Path(log).read_text().count("+") == 41
