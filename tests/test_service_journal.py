"""``taskorch serve``'s journal: real server processes, real signals (SIGKILL, SIGSTOP).

Each server is a ``python -m taskorch serve`` subprocess (the fixtures of ``test_service``).
A server killed on purpose is expected to exit -9; every other one is stopped by the fixture
with SIGTERM and must drain (143). Ordering comes from gates (a started file, a release FIFO),
from answers on the connection and from the journal itself; never from sleeps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import resource
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import _tasks as t
import pytest
import test_service
from _tasks import sigstop, wait_until
from test_service import R, _env, _taskorch

from taskorch import (
    JournalError,
    OrchestratorClosedError,
    Policy,
    QueueFullError,
    ServerTimeoutError,
    ServerUnavailableError,
    TaskFuture,
    TaskNotFoundError,
    WorkerCrashedError,
    connect,
)
from taskorch._service.client.requests import Request, new_future, payload
from taskorch._service.protocol import O_ERROR, O_RESULT, S_ACCEPTED, submit_frame

NO_RETRY = Policy(retries=0)
# test_service's fixtures, used here by name.
short_dir = test_service.short_dir
start_server = test_service.start_server


def journal_counts(path: Path) -> dict[str, int]:
    """Records by state (done ones by outcome code), read from the file (server stopped)."""
    db = sqlite3.connect(path)
    try:
        out: dict[str, int] = {}
        for state, outcome, n in db.execute(
                "SELECT state, outcome, count(*) FROM tasks GROUP BY state, outcome"):
            out[state if state != "done" else f"done:{outcome}"] = n
        return out
    finally:
        db.close()


def kill(server: Any) -> None:
    server.proc.send_signal(signal.SIGKILL)
    assert server.proc.wait(R) == -signal.SIGKILL
    server.expected_exit = -signal.SIGKILL


def hold_a_worker(client: Any, gate: t.Gate) -> Any:
    """A task that keeps a worker busy until ``gate`` is released and runs once more after a
    kill -9 of its server (``retries=1``): started when this returns; its future."""
    busy = client.with_policy(Policy(retries=1, backoff_initial=0)).run(
        t.blocker, str(gate.started), str(gate.release_fifo))
    assert busy is not None
    gate.wait_started()
    return busy


def test_sigkill_mid_load_then_restart_loses_nothing(start_server, short_dir) -> None:
    """2,000 tasks queued and 2 running when the server is SIGKILLed; a new server on the same
    journal and socket: the client reconnects by itself and every future resolves."""
    journal = short_dir / "j.sqlite3"
    out = short_dir / "ran.txt"
    a = start_server("--journal", str(journal), "--workers", "2", "--backlog", "3000")
    retried, poisoned = t.Gate(short_dir, "retried"), t.Gate(short_dir, "poisoned")
    client = a.connect()
    try:
        # Both workers busy: one task that may be retried, one that may not.
        first = client.with_policy(Policy(retries=1, backoff_initial=0)).run(
            t.blocker, str(retried.started), str(retried.release_fifo))
        second = client.with_policy(NO_RETRY).run(
            t.hang, str(poisoned.started), str(poisoned.release_fifo))
        assert first is not None and second is not None
        retried.wait_started()
        poisoned.wait_started()
        futures = [client.with_policy(NO_RETRY).run(t.record, str(out), i) for i in range(2000)]
        # run() spends credits, without a round trip: a task id comes once committed.
        assert len({client.accepted(f, R) for f in futures}) == 2000
        kill(a)
        assert journal_counts(journal) == {"queued": 2000, "running": 2}
        with pytest.raises(ServerUnavailableError):  # at once, not after a timeout
            wait_until(lambda: client.run(t.square, 1) and False, what="the client to notice")

        retried.started.unlink()
        b = start_server("--journal", str(journal), "--workers", "2", "--backlog", "3000",
                         like=a)
        b.wait_logged("2000 queued tasks queued again, 1 that were running retried (an "
                      "attempt charged), 1 failed (attempts spent)")
        retried.wait_started()  # run again, with its second (last) attempt
        retried.release()
        assert [f.result(R) for f in futures] == list(range(2000))  # re-attached, resolved
        assert first.result(R) == "go" and first.attempts == 2
        with pytest.raises(WorkerCrashedError, match="taskorch serve died while it ran"):
            second.result(R)
        s = client.stats()
        assert (s.submitted, s.succeeded, s.failed, s.queued, s.running) == (2002, 2001, 1, 0, 0)
        assert s.crashes == 2
    finally:
        client.close()
    b.stop()
    assert b.proc.returncode == 143, b.stderr()
    assert journal_counts(journal) == {f"done:{O_RESULT}": 2001, f"done:{O_ERROR}": 1}
    ran = out.read_text().split()
    assert set(ran) == {str(i) for i in range(2000)}  # none lost (at least once each)


def test_a_restart_charges_every_attempt_the_task_started(start_server, short_dir) -> None:
    """Retried inside its worker, a task is on its third attempt when the server is SIGKILLed:
    the journal says so, and the next server charges all three (a budget of 4 leaves one)."""
    journal = short_dir / "j.sqlite3"
    gate = t.Gate(short_dir, "third")
    a = start_server("--journal", str(journal))
    client = a.connect()
    try:
        future = client.with_policy(Policy(retries=3, backoff_initial=0)).run(
            t.fail_then_block, str(short_dir / "calls"), 2, str(gate.started),
            str(gate.release_fifo))
        assert future is not None
        task_id = client.accepted(future, R)
        gate.wait_started()

        def attempts_journaled() -> int:
            db = sqlite3.connect(journal)  # (WAL: a reader beside the running server)
            try:
                return int(db.execute("SELECT attempts FROM tasks WHERE id=?",
                                      (task_id,)).fetchone()[0])
            finally:
                db.close()

        wait_until(lambda: attempts_journaled() == 3, what="the third attempt journaled")
        kill(a)
        gate.started.unlink()
        b = start_server("--journal", str(journal), like=a)
        b.wait_logged("1 that were running retried (an attempt charged)")
        gate.wait_started()
        gate.release()
        assert future.result(R) == "go" and future.attempts == 4
    finally:
        client.close()


def test_submitters_during_a_sigkill_get_each_task_accepted_once(start_server, short_dir) -> None:
    """8 threads submit while the server is killed and replaced: a submission whose answer was
    lost is sent again and found in the journal, never accepted twice."""
    journal = short_dir / "j.sqlite3"
    out = short_dir / "ran.txt"
    a = start_server("--journal", str(journal), "--backlog", "100000")
    accepted: list[Any] = []
    unavailable = [0]
    lock = threading.Lock()
    stop = threading.Event()
    client = a.connect()

    def submit(n: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                f = client.with_policy(NO_RETRY).run(t.record, str(out), f"{n}-{i}")
            except ServerUnavailableError:
                with lock:
                    unavailable[0] += 1
                client._session._link.up.wait(R)  # (a test's shortcut: wait for the reconnection)
                continue
            with lock:
                accepted.append(f)
            i += 1

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(8)]
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: len(accepted) >= 400, what="submissions flowing")
        kill(a)
        b = start_server("--journal", str(journal), "--backlog", "100000", like=a)
        count = len(accepted)
        wait_until(lambda: len(accepted) >= count + 400, what="submissions flowing again")
        stop.set()
        for thread in threads:
            thread.join(R)
        values = [f.result(R) for f in accepted]
    finally:
        stop.set()
        client.close()
    b.stop()
    assert len(set(values)) == len(values) == len(accepted)
    assert journal_counts(journal) == {f"done:{O_RESULT}": len(accepted)}  # no duplicate
    assert set(out.read_text().split()) == set(values)


def test_a_resent_submission_is_found_in_the_journal(start_server) -> None:
    """The protocol itself: the same (client token, req) sent again with ``retry`` on a new
    connection is answered with the first task's id; nothing new is enqueued."""
    a = start_server()
    with a.connect() as first, a.connect() as second:
        session = first._session
        f = first.run(t.square, 7)
        assert f.result(R) == 49
        request = Request(new_future(lambda build, what: {"answer": False}))
        second._session.token = session.token  # as if the same client, reconnected
        req = second._session._start(request, lambda req: submit_frame(
            1, payload(t.square, (8,), {}), None, wait=False, client=session.token, retry=True,
            credit=False))
        assert req >= 1 and request.event.wait(R)
        assert request.answer[:3] == (S_ACCEPTED, 1, f.task_id)
        assert second.stats().submitted == 1


def test_with_wait_spends_a_credit_held_without_a_round_trip(start_server, short_dir) -> None:
    # Issue 23: a producer that waits for room pays no round trip while the server has granted
    # this client slots (credits); a stopped server shows it: the call returns all the same.
    a = start_server("--journal", str(short_dir / "j.sqlite3"))
    with a.connect() as client:
        first = client.with_wait(R).run(t.square, 2)
        assert client.accepted(first, R) == first.task_id > 0  # (credits granted by now)
        sigstop(a.proc.pid)
        try:
            stalled = client.with_wait(R).run(t.square, 3)  # returned without the server
            assert stalled.task_id == 0 and not stalled.done()
        finally:
            a.proc.send_signal(signal.SIGCONT)
        assert stalled.result(R) == 9 and first.result(R) == 4
        assert client.accepted(stalled, R) == stalled.task_id > first.task_id


def test_accepted_waits_for_the_commit_of_a_run_that_spent_a_credit(
        start_server, short_dir) -> None:
    a = start_server("--journal", str(short_dir / "j.sqlite3"))
    client = a.connect()
    try:
        first = client.run(t.square, 2)
        assert first is not None
        task_id = client.accepted(first, R)
        assert task_id == first.task_id > 0
        sigstop(a.proc.pid)
        try:
            stalled = client.run(t.square, 3)  # a credit: returned without the server
            assert stalled is not None and stalled.task_id == 0
            with pytest.raises(TimeoutError, match="did not commit the task within 0.2 s"):
                client.accepted(stalled, 0.2)
        finally:
            a.proc.send_signal(signal.SIGCONT)
        assert client.accepted(stalled, R) == stalled.task_id > task_id
        with a.connect() as other:  # committed: any client finds it by its id
            assert other.result(stalled.task_id, R) == 9
        sigstop(a.proc.pid)
        try:  # closing the client ends the wait, whether it began before or after
            last = client.run(t.square, 4)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(client.accepted, last, R)
                client.close(0)
                with pytest.raises(OrchestratorClosedError):
                    waiting.result(R)
        finally:
            a.proc.send_signal(signal.SIGCONT)
    finally:
        client.close()
    with pytest.raises(ValueError, match="returned"):
        client.accepted(TaskFuture(), R)  # not one of its futures: never to be answered


def test_a_stopped_server_makes_calls_fail_within_their_timeout(start_server, short_dir) -> None:
    # A backlog of 128 (serve's default before issue 23): its credits (a quarter of it) run out
    # well before the 1,000 calls below fill the socket.
    a = start_server("--backlog", "128")
    client = connect(a.address, authkey_file=a.authkey_file, request_timeout=0.5)
    try:
        assert client.run(t.square, 2).result(R) == 4
        a.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(ServerTimeoutError, match="did not answer run"):
                for _ in range(1000):  # the first ones spend credits: no answer awaited
                    client.run(t.square, 3)
            with pytest.raises(ServerTimeoutError):
                client.stats()
        finally:
            a.proc.send_signal(signal.SIGCONT)
        assert client.run(t.square, 4).result(R) == 16  # the same client, once it answers
    finally:
        client.close()


def test_run_async_waits_for_the_reconnection(start_server, short_dir) -> None:
    journal = short_dir / "j.sqlite3"
    a = start_server("--journal", str(journal))
    client = connect(a.address, authkey_file=a.authkey_file, request_timeout=R)
    try:
        kill(a)
        wait_until(lambda: client._session.down_reason, what="the client to notice")

        async def submit() -> Any:
            fut = await client.run_async(t.square, 5)
            return await asyncio.wrap_future(fut)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(asyncio.run, submit())
            start_server("--journal", str(journal), like=a)
            assert pending.result(R) == 25
    finally:
        client.close()


def test_map_waits_for_the_reconnection(start_server, short_dir) -> None:
    # As run_async(): a chunk submitted while the link is down is sent once it is back; it
    # does not raise ServerUnavailableError.
    journal = short_dir / "j.sqlite3"
    a = start_server("--journal", str(journal))
    client = connect(a.address, authkey_file=a.authkey_file, request_timeout=R)
    try:
        kill(a)
        session = client._session
        wait_until(lambda: session.down_reason, what="the client to notice")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(lambda: list(client.map(t.square, range(6), chunksize=2)))
            # Its first chunk is waiting for the link before there is a server to take it.
            wait_until(lambda: session._requests or pending.done(), what="a chunk to wait")
            assert not pending.done(), pending.exception()
            start_server("--journal", str(journal), like=a)
            assert pending.result(R) == [i * i for i in range(6)]
    finally:
        client.close()


def test_with_wait_rides_out_a_restart_and_times_out_only_past_its_seconds(
        start_server, short_dir) -> None:
    # Sync back-pressure: with_wait(seconds).run() waits for the link instead of raising
    # ServerUnavailableError at once, and raises it only once its seconds have passed.
    journal = short_dir / "j.sqlite3"
    a = start_server("--journal", str(journal))
    client = connect(a.address, authkey_file=a.authkey_file, request_timeout=R)
    try:
        kill(a)
        session = client._session
        wait_until(lambda: session.down_reason, what="the client to notice")
        with pytest.raises(ServerUnavailableError):
            client.run(t.square, 2)  # (run() itself does not wait)
        with pytest.raises(ServerUnavailableError):
            client.with_wait(0.2).run(t.square, 3)
        assert not session._requests  # withdrawn: not sent again on reconnection
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(lambda: client.with_wait(R).run(t.square, 5).result(R))
            wait_until(lambda: session._requests or pending.done(), what="the run to wait")
            assert not pending.done(), pending.exception()
            start_server("--journal", str(journal), like=a)
            assert pending.result(R) == 25
        s = client.stats()
        assert (s.submitted, s.succeeded) == (1, 1)  # the timed-out one was never enqueued
    finally:
        client.close()


def test_a_second_server_on_the_same_journal_is_refused(start_server, short_dir) -> None:
    journal = short_dir / "j.sqlite3"
    a = start_server("--journal", str(journal))
    with a.connect() as client:
        assert client.run(t.square, 3).result(R) == 9
    second = subprocess.run(
        _taskorch("serve", "--socket", str(short_dir / "other.sock"), "--journal", str(journal)),
        capture_output=True, text=True, timeout=R, env=_env())
    assert second.returncode == 2
    assert f"in use by another taskorch serve (pid {a.proc.pid})" in second.stderr
    with a.connect() as client:  # the first one is untouched
        assert client.run(t.square, 4).result(R) == 16


@pytest.mark.parametrize("content", [b"this is not a database" * 100, "other-sqlite"])
def test_a_corrupt_or_foreign_journal_is_refused_and_left_alone(short_dir, content) -> None:
    journal = short_dir / "j.sqlite3"
    if content == "other-sqlite":
        db = sqlite3.connect(journal)
        db.execute("CREATE TABLE mine (x)")
        db.commit()
        db.close()
        expected = "not a taskorch journal"
    else:
        journal.write_bytes(content)
        expected = "not a readable SQLite database"
    before = journal.read_bytes()
    proc = subprocess.run(
        _taskorch("serve", "--socket", str(short_dir / "s.sock"), "--journal", str(journal)),
        capture_output=True, text=True, timeout=R, env=_env())
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
    assert journal.read_bytes() == before
    assert not (short_dir / "s.sock").exists()


def test_an_unwritable_journal_location_is_refused(short_dir) -> None:
    (short_dir / "file").write_text("x")
    proc = subprocess.run(
        _taskorch("serve", "--socket", str(short_dir / "s.sock"),
                  "--journal", str(short_dir / "file" / "j.sqlite3")),
        capture_output=True, text=True, timeout=R, env=_env())
    assert proc.returncode == 2 and "cannot create the journal's lock file" in proc.stderr


def test_a_full_disk_fails_the_submission_and_nothing_half_written_runs(
        start_server, short_dir) -> None:
    """The server's files may not grow past 512 KiB (RLIMIT_FSIZE: writes fail with EFBIG,
    as on a full disk); each submission carries 64 KiB, so the WAL soon cannot grow."""
    journal = short_dir / "j.sqlite3"
    marks = short_dir / "marks"
    marks.mkdir()

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (512 * 1024, 512 * 1024))

    a = start_server("--journal", str(journal), preexec_fn=limit_files)
    refused: list[int] = []
    accepted = []
    client = a.connect()
    try:
        # run() spends credits: a refusal fails the future (a round trip would raise it).
        futures = [client.run(t.write_file, str(marks / str(i)), "x" * 65536) for i in range(40)]
        for i, f in enumerate(futures):
            try:
                client.accepted(f, R)  # (raises what refused it)
            except JournalError as exc:
                assert "NOT accepted" in str(exc)
                refused.append(i)
            else:
                accepted.append(f)
        assert refused, "the file size limit was never reached"
    finally:
        # Their outcomes may never be committed under this limit, and then are not sent:
        # waiting for them (close()'s default, 30 s) would only wait out its timeout.
        client.close(0)
    a.stop()
    assert a.proc.returncode == 143, a.stderr()
    ran = {int(p.name) for p in marks.iterdir()}
    assert ran.isdisjoint(refused) and len(ran) == len(accepted)


def test_without_a_journal_the_server_keeps_tasks_in_memory(start_server, short_dir) -> None:
    a = start_server("--no-journal")
    assert "journal in memory" in a.stderr()
    with a.connect() as client:
        assert client.run(t.square, 5).result(R) == 25
    assert not (short_dir / "state").exists()


def test_the_default_journal_lives_under_the_state_directory(start_server, short_dir) -> None:
    a = start_server()
    journals = list((short_dir / "state" / "taskorch").glob("*.journal"))
    assert len(journals) == 1 and f"journal {journals[0]}" in a.stderr()
    with a.connect() as client:
        assert client.run(t.square, 6).result(R) == 36
    a.stop()
    assert journal_counts(journals[0]) == {f"done:{O_RESULT}": 1}


def _result_in_another_process(address: Any, key: Path, task_id: int, timeout: float) -> str:
    code = (
        "import sys, taskorch\n"
        f"c = taskorch.connect({address!r}, authkey_file={str(key)!r})\n"
        "try:\n"
        f"    print(repr(c.result({task_id}, timeout={timeout})))\n"
        "except BaseException as exc:\n"
        "    print(type(exc).__name__, exc)\n"
        "finally:\n"
        "    c.close()\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=R, env=_env()).stdout.strip()


def test_results_by_id_from_another_process_and_after_a_restart(start_server, short_dir) -> None:
    journal = short_dir / "j.sqlite3"
    a = start_server("--journal", str(journal))
    gate = t.Gate(short_dir, "slow")
    with a.connect() as client:
        done = client.run(t.square, 12)
        failed = client.with_policy(NO_RETRY).run(t.raise_value_error, "nope")
        slow = client.run(t.blocker, str(gate.started), str(gate.release_fifo))
        assert done.result(R) == 144
        with pytest.raises(ValueError):
            failed.result(R)
        # Another process fetches by id: a finished one, a failed one, one still running.
        assert _result_in_another_process(a.address, a.authkey_file, done.task_id, R) == "144"
        assert _result_in_another_process(
            a.address, a.authkey_file, failed.task_id, R) == "ValueError nope"
        gate.wait_started()
        waiting = _result_in_another_process(a.address, a.authkey_file, slow.task_id, 0.2)
        assert waiting.startswith("TimeoutError")
        with pytest.raises(TimeoutError):
            client.result(slow.task_id, timeout=0.05)
        gate.release("late")
        assert client.result(slow.task_id, timeout=R) == "late"
        with pytest.raises(TaskNotFoundError):
            client.result(99999, timeout=R)
    a.stop()
    b = start_server("--journal", str(journal))  # outcomes survive the restart
    with b.connect() as client:
        assert client.result(done.task_id, timeout=R) == 144
        assert client.result(slow.task_id, timeout=R) == "late"


def test_outcomes_are_pruned_after_the_result_ttl(start_server, short_dir) -> None:
    journal = short_dir / "j.sqlite3"
    a = start_server("--journal", str(journal), "--result-ttl", "0")
    with a.connect() as client:
        f = client.run(t.square, 2)
        assert f.result(R) == 4

        def pruned() -> bool:
            try:
                client.result(f.task_id, timeout=R)
            except TaskNotFoundError:
                return True
            return False

        wait_until(pruned, what="the outcome pruned")


def _submit_until_full(client: Any, accepted: list[Any], value: int) -> None:
    """run() until the server says full 20 times in a row (credits first, then round trips)."""
    fulls = 0
    while fulls < 20:
        try:
            accepted.append(client.run(t.square, value))
            fulls = 0
        except QueueFullError:
            fulls += 1


def test_credits_keep_the_backlog_bound_exact_across_8_clients(start_server, short_dir) -> None:
    a = start_server("--workers", "1", "--backlog", "50")
    gate = t.Gate(short_dir, "busy")
    owner = a.connect()
    clients = [a.connect() for _ in range(8)]
    released = False
    try:
        busy = owner.run(t.blocker, str(gate.started), str(gate.release_fifo))
        gate.wait_started()  # the only worker is busy: every task accepted now stays queued
        accepted: list[list[Any]] = [[] for _ in clients]
        barrier = threading.Barrier(len(clients))

        def submit(n: int) -> None:
            barrier.wait(R)
            _submit_until_full(clients[n], accepted[n], n)

        threads = [threading.Thread(target=submit, args=(n,)) for n in range(len(clients))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(R)
        total = sum(len(a) for a in accepted)
        wait_until(lambda: all(f.task_id for fs in accepted for f in fs), what="all committed")
        s = owner.stats()
        assert s.queued == total <= 50 and s.rejected > 0
        # Slots still held as credits are freed when their clients leave: the bound is exact,
        # and nothing leaks. A new client then fills the backlog to exactly 50.
        for client in clients:
            client.close(timeout=0)  # (their tasks stay queued behind the busy worker)
        more: list[Any] = []
        with a.connect() as last:
            _submit_until_full(last, more, 99)
            wait_until(lambda: all(f.task_id for f in more), what="all committed")
            assert owner.stats().queued == total + len(more) == 50
        gate.release()
        released = True
        assert busy.result(R) == "go"
        assert [f.result(R) for f in more] == [99 * 99] * len(more)
    finally:
        if not released:
            gate.release()
        for client in clients:
            client.close(timeout=0)
        owner.close(timeout=R)


def test_taskorch_status_shows_one_task(start_server, short_dir) -> None:
    a = start_server()
    gate = t.Gate(short_dir, "slow")
    with a.connect() as client:
        done = client.run(t.square, 11)
        assert done.result(R) == 121
        slow = client.run(t.blocker, str(gate.started), str(gate.release_fifo))
        wait_until(lambda: slow.task_id, what="committed")

        def status(task_id: int) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                _taskorch("status", "--socket", str(a.address), "--authkey-file",
                          str(a.authkey_file), "--task", str(task_id)),
                capture_output=True, text=True, timeout=R, env=_env())

        assert status(done.task_id).stdout == f"task {done.task_id}: succeeded: 121\n"
        assert status(slow.task_id).stdout == f"task {slow.task_id}: pending: queued or running\n"
        unknown = status(99999)
        assert unknown.returncode == 1 and "knows no task 99999" in unknown.stderr
        gate.release()
        assert slow.result(R) == "go"
