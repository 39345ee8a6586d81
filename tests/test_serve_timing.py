"""``options(priority=, delay=, expires=)`` through ``taskorch serve``: kept in the journal, so
that a SIGKILL and a restart keep every task's priority, not-before time and expiry. Real
server processes (the fixtures of ``test_service``); gates order the events, and the only waits
on the clock are for the times the test is about."""

from __future__ import annotations

import sqlite3
import time

import _tasks as t
import pytest
import test_service
from _tasks import wait_until
from test_service import R
from test_service_journal import hold_a_worker, kill

from taskorch import TaskExpiredError

short_dir = test_service.short_dir
start_server = test_service.start_server


def test_priority_delay_and_expiry_survive_a_sigkill_and_restart(start_server,
                                                                 short_dir) -> None:
    journal = short_dir / "j.sqlite3"
    log = str(short_dir / "log")
    gate = t.Gate(short_dir, "busy")
    a = start_server("--journal", str(journal), "--workers", "1")
    client = a.connect()
    try:
        hold_a_worker(client, gate)
        submitted = time.time()
        delayed = client.options(delay=4.0).run(t.log_start, log, "delayed")
        doomed = client.options(expires=1.0).run(t.log_start, log, "doomed")
        low = client.options(priority=0).run(t.log_start, log, "low")
        high = client.options(priority=9).run(t.log_start, log, "high")
        futures = [delayed, doomed, low, high]
        assert all(f is not None for f in futures)
        ids = [client.accepted(f, R) for f in futures]  # type: ignore[arg-type]
        kill(a)
        db = sqlite3.connect(journal)
        try:
            rows = {row[0]: row[1:] for row in db.execute(
                "SELECT id, priority, not_before, expires FROM tasks")}
        finally:
            db.close()
        assert rows[ids[0]][1] == pytest.approx(submitted + 4.0, abs=1.0)
        assert rows[ids[1]][2] == pytest.approx(submitted + 1.0, abs=1.0)
        assert (rows[ids[2]][0], rows[ids[3]][0]) == (0, 9)

        wait_until(lambda: time.time() > rows[ids[1]][2], what="the expiry to pass")
        gate.started.unlink()
        b = start_server("--journal", str(journal), "--workers", "1", like=a)
        gate.wait_started()  # the blocker again (its attempt was charged)
        gate.release()
        with pytest.raises(TaskExpiredError):
            doomed.result(R)  # type: ignore[union-attr]
        assert [f.result(R) for f in (high, low, delayed)] == [  # type: ignore[union-attr]
            "high", "low", "delayed"]
        starts = t.logged(log)
        assert [label for label, _ in starts] == ["high", "low", "delayed"]
        assert dict(starts)["delayed"] >= rows[ids[0]][1]  # not run early after the restart
        assert client.stats().expired == 1
    finally:
        client.close()
    b.stop()
    assert b.proc.returncode == 143, b.stderr()


def test_status_shows_delayed_tasks_and_when_the_next_is_due(start_server) -> None:
    import json
    import re
    import subprocess

    from test_service import _env, _taskorch

    server = start_server()
    with server.connect() as client:
        due = time.time() + 3  # (soon: the fixture's stop drains them)
        futures = [client.options(at=due + i / 10).run(t.square, i) for i in range(3)]
        assert all(f is not None and client.accepted(f, R) for f in futures)
        assert (client.stats().delayed, client.stats().queued) == (3, 3)
        for bad, option in (({"delay": -1}, "delay"), ({"priority": False}, "priority"),
                            ({"delay": 5, "expires": 1}, "expires")):
            with pytest.raises(ValueError, match=option):
                client.options(**bad).run(t.square, 1)  # type: ignore[arg-type]
        assert client.stats().submitted == 3  # nothing was sent
        status = ["status", "--socket", server.address, "--authkey-file",
                  str(server.authkey_file)]
        out = subprocess.run(_taskorch(*status, "--json"), capture_output=True, text=True,
                             timeout=R, env=_env())
        assert out.returncode == 0, out.stderr
        fields = json.loads(out.stdout)
        assert fields["delayed"] == 3
        assert fields["next_delayed_at"] == pytest.approx(due, abs=1.0)
        out = subprocess.run(_taskorch(*status), capture_output=True, text=True, timeout=R,
                             env=_env())
        assert re.search(r"delayed\s+3", out.stdout), out.stdout
        assert "next delayed due" in out.stdout and time.strftime(
            "%Y-%m-%d", time.gmtime(due)) in out.stdout, out.stdout
        assert [f.result(R) for f in futures] == [0, 1, 4]  # type: ignore[union-attr]
        assert time.time() >= due


def test_metrics_count_expired_and_delayed_tasks(tmp_path) -> None:
    from prometheus_client import CollectorRegistry
    from test_metrics import samples

    from taskorch import TaskOrchestrator
    from taskorch.metrics import TaskorchCollector

    with TaskOrchestrator(1) as o:
        registry = CollectorRegistry()
        registry.register(TaskorchCollector(o))
        gate = t.Gate(tmp_path, "busy")
        held = o.run(t.blocker, str(gate.started), str(gate.release_fifo))
        gate.wait_started()
        later = o.options(delay=3600).run(t.square, 1)
        doomed = o.options(expires=0.05).run(t.square, 2)
        with pytest.raises(TaskExpiredError):
            doomed.result(R)  # type: ignore[union-attr]
        parsed = samples(registry)
        assert parsed[("taskorch_tasks_expired_total", ())] == 1
        assert parsed[("taskorch_tasks_delayed", ())] == 1
        gate.release()
        assert held is not None and held.result(R) == "go"
        assert later is not None and later.cancel()


OLD_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tasks (
    id INTEGER PRIMARY KEY AUTOINCREMENT, client BLOB NOT NULL, sub INTEGER NOT NULL,
    payload BLOB, policy BLOB, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    submitted REAL NOT NULL, started REAL, finished REAL, outcome INTEGER, seconds REAL,
    data BLOB, UNIQUE (client, sub)
);
INSERT INTO meta VALUES ('schema', '1');
"""


def test_a_journal_written_before_the_timing_columns_opens_and_recovers(tmp_path) -> None:
    from taskorch._service.server.journal import Journal

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO tasks (client, sub, payload, state, submitted) "
               "VALUES (x'01', 1, x'00', 'queued', 0)")
    db.commit()
    db.close()
    journal = Journal(str(path))
    try:
        (row,) = journal.rows_to_recover()
        assert (row.state, row.priority, row.not_before, row.expires) == ("queued", 0, None,
                                                                          None)
    finally:
        journal.close()
    db = sqlite3.connect(path)
    try:
        columns = {r[1] for r in db.execute("PRAGMA table_info(tasks)")}
    finally:
        db.close()
    assert {"priority", "not_before", "expires", "key", "after_ids"} <= columns
