"""Operating a served pool (issue 25): task records, cancel, retry and purge by id, with real
servers and clients; every wait is a handshake (a started file, a release FIFO), never a
sleep."""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

import _tasks as t
import pytest
import test_service
from _tasks import wait_until
from test_service import R
from test_service_journal import kill

from taskorch import Policy, TaskInfo, TaskNotFoundError

NO_RETRY = Policy(retries=0)
short_dir = test_service.short_dir
start_server = test_service.start_server


def _busy(client, short_dir, name="busy"):  # the one worker runs a blocker until released
    gate = t.Gate(short_dir, name)
    future = client.with_policy(NO_RETRY).run(t.blocker, str(gate.started), str(gate.release_fifo))
    gate.wait_started()
    return gate, future


def test_records_list_newest_first_by_state_with_names_args_and_pages(start_server,
                                                                      short_dir) -> None:
    server = start_server("--workers", "1")
    with server.connect() as client:
        gate, running = _busy(client, short_dir)
        queued = [client.run(t.add, i, 10, policy="p") for i in range(5)]
        ids = [client.accepted(f, R) for f in queued]
        infos = client.tasks(state="queued")
        assert [i.id for i in infos] == ids[::-1]
        first = infos[-1]
        assert isinstance(first, TaskInfo) and first.name == "_tasks.add"
        assert first.args_repr == "0, 10, policy='p'" and first.state == "queued"
        page = client.tasks(limit=2, before_id=ids[3])
        assert [i.id for i in page] == [ids[2], ids[1]]
        mine = client.task(running.task_id)
        assert mine.state == "running" and mine.worker_pid == int(gate.started.read_text())
        assert mine.started_at is not None and mine.started_at >= mine.accepted_at
        gate.release()
        assert [f.result(R) for f in queued] == [(i + 10, "p") for i in range(5)]
        done = client.task(ids[0])
        assert done.state == "succeeded" and done.result_repr == "(10, 'p')"
        assert done.finished_at is not None and done.attempts == 1
        with pytest.raises(TaskNotFoundError):
            client.task(10 ** 9)
        with pytest.raises(ValueError, match="unknown states"):
            client.tasks(state="sleeping")


def test_cancel_a_queued_task_by_id_and_by_its_future(start_server, short_dir) -> None:
    server = start_server("--workers", "1")
    out = short_dir / "ran.txt"
    with server.connect() as client:
        gate, running = _busy(client, short_dir)
        a = client.run(t.record, str(out), "a")
        b = client.run(t.record, str(out), "b")
        c = client.run(t.record, str(out), "c")
        a_id = client.accepted(a, R)
        client.accepted(b, R)
        assert client.cancel(a_id) is True
        assert b.cancel() is True and b.cancelled()  # a client future, queued at the server
        with pytest.raises(concurrent.futures.CancelledError):
            b.result(R)
        with pytest.raises(concurrent.futures.CancelledError):
            a.result(R)
        assert client.cancel(a_id) is False  # already ended
        assert client.cancel(running.task_id) is False  # running: runs on
        with pytest.raises(TaskNotFoundError):
            client.cancel(10 ** 9)
        gate.release()
        assert running.result(R) == "go" and c.result(R) == "c"
        assert client.task(a_id).state == "cancelled"
        assert client.task(b.task_id).state == "cancelled"
        assert client.cancel(c.task_id) is False
    assert out.read_text().split() == ["c"]


def test_a_cancel_survives_a_kill_9_and_a_restart(start_server, short_dir) -> None:
    journal = short_dir / "j.sqlite3"
    out = short_dir / "ran.txt"
    a = start_server("--journal", str(journal), "--workers", "1")
    client = a.connect()
    try:
        _busy(client, short_dir)
        victim = client.run(t.record, str(out), "victim")
        other = client.run(t.record, str(out), "other")
        victim_id, other_id = client.accepted(victim, R), client.accepted(other, R)
        assert client.cancel(victim_id) is True
    finally:
        client.close(0)
    kill(a)
    b = start_server("--journal", str(journal), "--workers", "1", like=a)
    with b.connect() as client:
        assert client.result(other_id, R) == "other"
        assert client.task(victim_id).state == "cancelled"
        assert client.task(other_id).state == "succeeded"
    assert "victim" not in out.read_text().split()


def test_a_cancel_racing_the_start_ends_in_exactly_one_of_cancelled_or_ran(start_server,
                                                                          short_dir) -> None:
    server = start_server("--workers", "1")
    with server.connect() as client:
        for n in range(5):
            out = short_dir / f"ran{n}.txt"
            gate, running = _busy(client, short_dir, f"busy{n}")
            racer = client.run(t.record, str(out), n)
            racer_id = client.accepted(racer, R)
            answer: list[bool] = []
            go = threading.Barrier(2)

            def cancel(task_id: int = racer_id) -> None:
                go.wait()
                answer.append(client.cancel(task_id))

            canceller = threading.Thread(target=cancel)
            canceller.start()
            go.wait()
            gate.release()  # the worker frees up: the racer starts, unless cancelled first
            canceller.join(R)
            assert running.result(R) == "go"
            # A cancel's answer may come before the outcome frame that resolves the future.
            concurrent.futures.wait([racer], timeout=R)
            ran = racer.exception(R) is None if not racer.cancelled() else False
            assert answer == [not ran] and racer.cancelled() == (not ran)
            assert out.exists() == ran
            assert client.task(racer_id).state == ("succeeded" if ran else "cancelled")


def test_retry_a_failed_task_as_a_new_one(start_server, short_dir) -> None:
    server = start_server("--workers", "1")
    counter = short_dir / "counter"
    with server.connect() as client:
        failed = client.with_policy(NO_RETRY).run(t.fail_until, str(counter), 2)
        with pytest.raises(ConnectionError):
            failed.result(R)
        old = client.task(failed.task_id)
        assert old.state == "failed" and old.error == "ConnectionError: attempt 1 failed"
        assert old.traceback is not None and "ConnectionError" in old.traceback
        new_id = client.retry(failed.task_id)
        assert new_id > failed.task_id
        assert client.result(new_id, R) == 2
        new = client.task(new_id)
        assert new.retry_of == failed.task_id and new.name == "_tasks.fail_until"
        with pytest.raises(ValueError, match="succeeded"):
            client.retry(new_id)
        with pytest.raises(TaskNotFoundError):
            client.retry(10 ** 9)


def test_purge_cancels_1000_queued_tasks(start_server, short_dir) -> None:
    server = start_server("--workers", "1", "--backlog", "2000")
    out = short_dir / "ran.txt"
    with server.connect() as client:
        gate, running = _busy(client, short_dir)
        futures = [client.run(t.record, str(out), i) for i in range(1000)]
        keep = client.run(t.square, 3)
        for f in futures + [keep]:
            client.accepted(f, R)
        assert client.purge(name="_tasks.record") == 1000
        assert len(client.tasks(state="cancelled", limit=1000)) == 1000
        wait_until(lambda: all(f.cancelled() for f in futures), what="the S_DONEs")
        gate.release()
        assert keep.result(R) == 9 and running.result(R) == "go"
        assert client.purge() == 0
    assert not out.exists()


def test_a_journal_written_before_the_records_gains_them_and_the_listing_index(
        short_dir) -> None:
    """A journal of schema 1 as first written (no timing nor record columns) opens: its rows
    get their states, the listing index is made, and they list as records."""
    import sqlite3

    from taskorch._service.server.journal import Journal
    from taskorch._service.server.operator import Operator

    path = short_dir / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '1');
        CREATE TABLE tasks (id INTEGER PRIMARY KEY AUTOINCREMENT, client BLOB NOT NULL,
            sub INTEGER NOT NULL, payload BLOB, policy BLOB, state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, submitted REAL NOT NULL, started REAL,
            finished REAL, outcome INTEGER, seconds REAL, data BLOB, UNIQUE (client, sub));
        INSERT INTO tasks (client, sub, state, attempts, submitted, finished, outcome)
            VALUES (x'01', 1, 'done', 1, 1.0, 2.0, 4), (x'01', 2, 'queued', 0, 3.0, NULL, NULL);
    """)
    db.commit()
    db.close()
    journal = Journal(str(path), result_ttl=1e12)  # (its outcome, of 1970, stays)
    try:
        indexes = {r[1] for r in journal._db.execute("PRAGMA index_list(tasks)")}
        assert "tasks_listing" in indexes
        journal.start()

        class Registry:
            def progress_of(self, task_id: int) -> None:
                return None

            def waiting(self, task_id: int) -> None:
                return None

        Registry.journal = journal  # type: ignore[attr-defined]
        operator = Operator(Registry())  # type: ignore[arg-type]
        assert [(i.id, i.state) for i in operator.tasks()] == [(2, "queued"), (1, "cancelled")]
        assert [i.id for i in operator.tasks(("cancelled",))] == [1]
    finally:
        journal.close()


def test_terminate_kills_a_task_stuck_in_c_code_and_replaces_its_worker(start_server,
                                                                         short_dir) -> None:
    server = start_server("--workers", "1")
    started = short_dir / "stuck.started"
    with server.connect() as client:
        stuck = client.with_policy(Policy(retries=3)).run(
            t.hang_in_c_with_signals_blocked, str(started))
        wait_until(lambda: started.exists() and started.read_text(), what="the stuck task")
        pid = int(started.read_text())
        assert client.cancel(stuck.task_id) is False  # running: without terminate, it runs on
        assert not stuck.done()
        assert client.cancel(stuck.task_id, terminate=True) is True
        # Its outcome reaches the future on its own frame, after the cancel's answer.
        concurrent.futures.wait([stuck], timeout=R)
        assert stuck.cancelled()  # never retried, though its policy allows 3 retries
        info = client.task(stuck.task_id)
        assert info.state == "cancelled" and info.attempts == 1
        assert client.run(t.getpid).result(R) != pid  # a new worker
        wait_until(lambda: not _alive(pid), what=f"worker pid {pid} to be gone")
        assert client.cancel(stuck.task_id, terminate=True) is False  # ended


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_progress_from_a_task_reaches_a_local_future(make_orchestrator, gates) -> None:
    import taskorch

    assert taskorch.progress(1, 2, "outside a worker") is None  # a no-op here
    orchestrator = make_orchestrator(worker_count=1)
    gate = gates("report")
    future = orchestrator.run(t.report_then_block, str(gate.started), str(gate.release_fifo))
    assert future.progress() is None or future.progress().done == 3
    gate.wait_started()
    reported = wait_until(future.progress, what="the progress report")
    assert (reported.done, reported.total, reported.message) == (3, 10, "three")
    assert isinstance(reported, taskorch.Progress) and reported.at > 0
    gate.release()
    assert future.result(R) == "go" and future.progress() == reported  # the latest stays


def test_progress_is_seen_from_a_client_while_the_task_runs(start_server, short_dir) -> None:
    server = start_server("--workers", "1")
    gate = t.Gate(short_dir, "report")
    with server.connect() as client:
        future = client.run(t.report_then_block, str(gate.started), str(gate.release_fifo))
        gate.wait_started()
        reported = wait_until(future.progress, what="the progress at the server")
        assert (reported.done, reported.total, reported.message) == (3, 10, "three")
        info = client.task(future.task_id)
        assert info.state == "running" and info.progress == reported
        assert client.tasks(state="running")[0].progress == reported
        gate.release()
        assert future.result(R) == "go"
        assert client.task(future.task_id).progress == reported  # kept in the journal
        assert client.run(t.square, 2).progress() is None  # never reported


def test_the_cli_lists_cancels_retries_and_purges_with_exit_codes(start_server,
                                                                   short_dir) -> None:
    import json
    import subprocess

    from test_service import _env, _taskorch

    server = start_server("--workers", "1")

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            _taskorch(*argv, "--socket", str(server.address), "--authkey-file",
                      str(server.authkey_file)),
            capture_output=True, text=True, timeout=R, env=_env())

    counter = short_dir / "counter"
    with server.connect() as client:
        failed = client.with_policy(NO_RETRY).run(t.fail_until, str(counter), 2)
        with pytest.raises(ConnectionError):
            failed.result(R)
        gate, running = _busy(client, short_dir)
        queued = [client.run(t.square, i) for i in range(3)]
        ids = [client.accepted(f, R) for f in queued]

        table = cli("tasks")
        assert table.returncode == 0, table.stderr
        lines = table.stdout.splitlines()
        assert lines[0].split()[:4] == ["ID", "NAME", "STATE", "TRIES"]
        assert [line.split()[0] for line in lines[1:]] == [
            str(i) for i in [*ids[::-1], running.task_id, failed.task_id]]
        assert "ConnectionError: attempt 1 failed" in lines[-1]
        listed = cli("tasks", "--state", "queued", "--json", "--limit", "2")
        records = [json.loads(line) for line in listed.stdout.splitlines()]
        assert [r["id"] for r in records] == [ids[2], ids[1]]
        assert {r["state"] for r in records} == {"queued"}

        done = cli("cancel", str(ids[0]))
        assert done.returncode == 0 and done.stdout == f"task {ids[0]}: cancelled\n"
        again = cli("cancel", str(ids[0]), "999999")
        assert again.returncode == 1
        assert "is cancelled" in again.stderr and "knows no task 999999" in again.stderr
        busy = cli("cancel", str(running.task_id))
        assert busy.returncode == 1 and "--terminate" in busy.stderr

        retried = cli("retry", str(failed.task_id))
        assert retried.returncode == 0, retried.stderr
        new_id = int(retried.stdout.split()[-1])
        assert cli("retry", str(ids[1])).returncode == 1  # queued: nothing to retry

        assert cli("purge").returncode == 2  # without --yes
        purged = cli("purge", "--yes", "--name", "_tasks.square")
        assert purged.returncode == 0 and purged.stdout == "2 queued tasks cancelled\n"
        assert cli("tasks", "--state", "sleeping").returncode == 2
        gate.release()
        assert client.result(new_id, R) == 2
        assert all(f.cancelled() for f in queued)


def _listing_agrees_with_records(client, states=("queued", "waiting", "running")) -> dict:
    """For each state: the ids the filter lists, checked against every record's own state."""
    every = client.tasks(limit=1000)
    by_state = {}
    for state in states:
        listed = client.tasks(state=state, limit=1000)
        assert [i.id for i in listed] == [i.id for i in every if i.state == state], state
        assert all(i.state == state for i in listed)
        by_state[state] = [i.id for i in listed]
    return by_state


def test_the_state_filter_and_the_records_state_are_one_rule(start_server, short_dir) -> None:
    """queued, waiting (a delay) and running tasks list under the state their records show,
    and each under that one only."""
    server = start_server("--workers", "1")
    with server.connect() as client:
        gate, running = _busy(client, short_dir)
        queued = client.run(t.square, 3)
        delayed = client.options(delay=3600).run(t.square, 4)
        ids = [client.accepted(f, R) for f in (queued, delayed)]
        assert _listing_agrees_with_records(client) == {
            "queued": [ids[0]], "waiting": [ids[1]], "running": [running.task_id]}
        assert client.task(ids[1]).state == "waiting"
        assert client.cancel(ids[1]) is True
        gate.release()
        assert queued.result(R) == 9


def test_a_task_the_backlog_holds_back_lists_as_waiting_whatever_its_row_says(
        short_dir) -> None:
    """A queued row with no not-before time that the backlog holds back (a dependency, a
    limit: the registry's answer) is "waiting" in its record and in the filter; a row whose
    not-before time is past, which the backlog does not hold, is "queued"; rows the backlog
    does not know fall back to their not-before time."""
    import time

    from taskorch._service.server.journal import Journal
    from taskorch._service.server.operator import Operator

    journal = Journal(str(short_dir / "j.sqlite3"), result_ttl=1e12)
    now, later = time.time(), time.time() + 3600
    rows = [(1, "queued", None), (2, "queued", now - 60), (3, "queued", later),
            (4, "queued", None), (5, "running", None)]
    for task_id, status, not_before in rows:
        journal._db.execute(
            "INSERT INTO tasks (id, client, sub, state, status, submitted, not_before, name) "
            "VALUES (?, x'01', ?, ?, ?, ?, ?, 'n')",
            (task_id, task_id, "queued" if status == "queued" else "running", status, now,
             not_before))
    journal._db.commit()
    try:
        journal.start()

        class Registry:
            held = {1: True, 2: False}  # what the backlog says of the tasks it holds

            def progress_of(self, task_id: int) -> None:
                return None

            def waiting(self, task_id: int) -> bool | None:
                return self.held.get(task_id)

        Registry.journal = journal  # type: ignore[attr-defined]
        operator = Operator(Registry())  # type: ignore[arg-type]
        assert {i.id: i.state for i in operator.tasks()} == {
            1: "waiting", 2: "queued", 3: "waiting", 4: "queued", 5: "running"}
        assert [i.id for i in operator.tasks(("waiting",))] == [3, 1]
        assert [i.id for i in operator.tasks(("queued",))] == [4, 2]
        assert [i.id for i in operator.tasks(("queued", "running"))] == [5, 4, 2]
        # A page of 1 row that the filter leaves out reads on to fill the page.
        assert [i.id for i in operator.tasks(("waiting",), limit=1)] == [3]
        assert [i.id for i in operator.tasks(("queued",), limit=1, before_id=4)] == [2]
        assert [i.state for i in map(operator.task, (1, 2, 3))] == ["waiting", "queued",
                                                                   "waiting"]
    finally:
        journal.close()


def test_a_filtered_page_reads_the_journal_in_chunks_not_a_page_at_a_time(short_dir) -> None:
    """A page of 1 "waiting" task under 1,200 queued ones reads the journal a few times
    (it read it once per ``limit`` rows: 1,200 round trips to the journal's writer), and
    asks the registry for progress only of the rows it keeps."""
    import time

    from taskorch._service.server.journal import Journal
    from taskorch._service.server.operator import Operator

    journal = Journal(str(short_dir / "j.sqlite3"), result_ttl=1e12)
    now = time.time()
    journal._db.executemany(
        "INSERT INTO tasks (id, client, sub, state, status, submitted, name) "
        "VALUES (?, x'01', ?, 'queued', 'queued', ?, 'n')",
        [(task_id, task_id, now) for task_id in range(1, 1202)])
    journal._db.commit()
    try:
        journal.start()

        class Counting:
            runs = 0

            def run(self, fn: Any, then: Any) -> None:
                Counting.runs += 1
                journal.run(fn, then)

        class Registry:
            journal = Counting()
            progress_asked: list[int] = []

            def progress_of(self, task_id: int) -> None:
                self.progress_asked.append(task_id)

            def waiting(self, task_id: int) -> bool | None:
                return task_id == 1  # the oldest alone is held back

        registry = Registry()
        operator = Operator(registry)  # type: ignore[arg-type]
        assert [i.id for i in operator.tasks(("waiting",), limit=1)] == [1]
        assert Counting.runs <= 3 and registry.progress_asked == [1]
        assert [i.id for i in operator.tasks(("queued",), limit=2)] == [1201, 1200]
        assert len(operator.tasks(("waiting", "queued"), limit=1000)) == 1000
        assert [i.id for i in operator.tasks(("waiting",), limit=5)] == [1]  # (the end)
    finally:
        journal.close()
