"""``options(key=)`` and ``options(after=)`` through ``taskorch serve``: a key dedups across
clients and across a SIGKILL and restart; dependencies by future or id, their failures with
their causes, and their durability. Real server processes (the fixtures of ``test_service``);
gates order the events, never sleeps."""

from __future__ import annotations

import asyncio
import concurrent.futures

import _tasks as t
import pytest
import test_service
from test_service import R
from test_service_journal import hold_a_worker, kill

from taskorch import (
    DependencyFailedError,
    Policy,
    RemoteTaskError,
    TaskExpiredError,
    TaskOrchestrator,
    WorkerCrashedError,
)
from taskorch._wire import RemoteTraceback

short_dir = test_service.short_dir
start_server = test_service.start_server


def test_a_key_dedups_across_two_clients(start_server, short_dir) -> None:
    server = start_server("--workers", "2")
    gate = t.Gate(short_dir, "k")
    with server.connect() as one, server.connect() as two:
        first = one.options(key="tenant-42:cleanup").run(t.blocker, str(gate.started),
                                                         str(gate.release_fifo))
        assert first is not None
        gate.wait_started()
        again = two.options(key="tenant-42:cleanup").run(t.identity, "never")
        other = two.options(key="tenant-43:cleanup").run(t.identity, 43)
        assert again is not None and other is not None
        assert two.accepted(again, R) == one.accepted(first, R)
        assert other.result(R) == 43
        assert one.stats().submitted == 2  # the second of one key enqueued nothing
        gate.release("done")
        assert first.result(R) == again.result(R) == "done"
        later = two.options(key="tenant-42:cleanup").run(t.identity, "next")  # free again
        assert later is not None and later.result(R) == "next"
        assert later.task_id != first.task_id


def test_a_key_dedups_across_a_sigkill_and_restart(start_server, short_dir) -> None:
    journal = short_dir / "j.sqlite3"
    gate = t.Gate(short_dir, "busy")
    a = start_server("--journal", str(journal), "--workers", "1")
    client = a.connect()
    try:
        hold_a_worker(client, gate)
        keyed = client.options(key="report:7").run(t.identity, "first")
        assert keyed is not None
        keyed_id = client.accepted(keyed, R)
        kill(a)
        gate.started.unlink()
        b = start_server("--journal", str(journal), "--workers", "1", like=a)
        gate.wait_started()  # the busy one runs again: the keyed one is still queued
        with b.connect() as other:
            again = other.options(key="report:7").run(t.identity, "second")
            assert again is not None and other.accepted(again, R) == keyed_id
            assert other.task(keyed_id).state == "queued"
            gate.release()
            assert again.result(R) == keyed.result(R) == "first"
            fresh = other.options(key="report:7").run(t.identity, "third")  # ended: free
            assert fresh is not None and fresh.result(R) == "third"
            assert other.stats().submitted == 3  # (busy, keyed, fresh: recovered and new)
    finally:
        client.close()


def test_a_chain_where_the_middle_fails_carries_each_cause(start_server) -> None:
    server = start_server("--workers", "2")
    with server.connect() as client, server.connect() as other:
        a = client.run(t.identity, 1)
        assert a is not None
        b = client.options(after=[a]).run(t.raise_value_error, "middle")
        assert b is not None
        c = client.options(after=[b]).run(t.identity, 3)
        assert c is not None
        d = client.options(after=[c]).run(t.identity, 4)
        assert d is not None
        assert a.result(R) == 1
        with pytest.raises(ValueError, match="middle"):
            b.result(R)
        with pytest.raises(DependencyFailedError) as info:
            c.result(R)
        error = info.value
        assert (error.task_id, error.dependency, error.what) == (c.task_id, b.task_id, "failed")
        assert isinstance(error.__cause__, ValueError) and "middle" in str(error.__cause__)
        assert isinstance(error.__cause__.__cause__, RemoteTraceback)  # the worker's traceback
        deeper = d.exception(R)
        assert isinstance(deeper, DependencyFailedError) and deeper.dependency == c.task_id
        assert isinstance(deeper.__cause__, DependencyFailedError)
        assert isinstance(deeper.__cause__.__cause__, ValueError)
        with pytest.raises(DependencyFailedError) as seen:  # by id, from another client
            other.result(c.task_id, R)
        assert isinstance(seen.value.__cause__, ValueError)
        info_c = other.task(c.task_id)
        assert info_c.state == "failed" and "DependencyFailedError" in (info_c.error or "")
        s = client.stats()
        assert (s.succeeded, s.failed, s.queued) == (1, 3, 0)


def test_a_fan_in_of_50_shards_waits_as_waiting(start_server, short_dir) -> None:
    server = start_server("--workers", "2", "--backlog", "100")
    gate = t.Gate(short_dir, "first")
    with server.connect() as client:
        shards = [client.run(t.blocker, str(gate.started), str(gate.release_fifo))]
        shards += [client.run(t.square, i) for i in range(1, 50)]
        report = client.options(after=shards).run(t.identity, "report")
        assert report is not None and all(s is not None for s in shards)
        gate.wait_started()
        assert [s.result(R) for s in shards[1:]] == [i * i for i in range(1, 50)]  # type: ignore[union-attr]
        assert not report.done()
        assert client.task(report.task_id).state == "waiting"
        waiting = client.tasks(state="waiting")
        assert [info.id for info in waiting] == [report.task_id]
        assert report.task_id not in [info.id for info in client.tasks(state="queued")]
        gate.release("0")
        assert report.result(R) == "report"
        assert client.task(report.task_id).state == "succeeded"


def test_after_takes_task_ids_from_any_client(start_server, short_dir) -> None:
    server = start_server("--workers", "2")
    gate = t.Gate(short_dir, "a")
    log = str(short_dir / "log")
    with server.connect() as one, server.connect() as two:
        a = one.run(t.blocker, str(gate.started), str(gate.release_fifo))
        assert a is not None
        a_id = one.accepted(a, R)
        gate.wait_started()
        b = two.options(after=[a_id, a_id]).run(t.log_start, log, "b")
        assert b is not None and b.task_id  # (a round trip: accepted when run() returns)
        assert two.task(b.task_id).state == "waiting"

        async def later() -> object:
            f = await two.options(after=[b.task_id]).run_async(t.log_start, log, "c")
            return await asyncio.wrap_future(f)

        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            c = pool.submit(asyncio.run, later())
            gate.release()
            assert c.result(R) == "c"
        assert b.result(R) == "b" and a.result(R) == "go"
        assert [label for label, _ in t.logged(log)] == ["b", "c"]


def test_bad_dependencies_are_value_errors_and_enqueue_nothing(start_server, tmp_path) -> None:
    server = start_server("--workers", "1")
    with server.connect() as client, server.connect() as other, TaskOrchestrator(1) as local:
        mine = client.run(t.identity, 1)
        theirs = other.run(t.identity, 2)
        here = local.run(t.identity, 3)
        assert mine is not None and theirs is not None and here is not None
        last = max(client.accepted(mine, R), other.accepted(theirs, R))
        for bad, message in (([theirs], "not a future of this client"),
                             ([here], "not a future of this client"),
                             ([0], "not a task id"), ([True], "not a future"),
                             (mine, "after must be a list"), ("1", "after must be a list")):
            with pytest.raises(ValueError, match=message):
                client.options(after=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="key must be"):
            client.options(key="")
        submitted = client.stats().submitted
        with pytest.raises(ValueError, match=f"task {last + 1} is this task itself"):
            client.options(after=[mine, last + 1]).run(t.identity, "never")  # (the next id)
        with pytest.raises(ValueError, match="knows no task 999999"):
            client.options(after=[mine, 999999]).run(t.identity, "never")

        async def unknown() -> None:
            await client.options(after=[999998]).run_async(t.identity, "never")

        with pytest.raises(ValueError, match="knows no task 999998"):
            asyncio.run(unknown())
        assert client.stats().submitted == submitted
        assert client.options(after=[mine, theirs.task_id]).run(  # type: ignore[union-attr]
            t.identity, "fine").result(R) == "fine"


def test_cancelled_and_expired_dependencies_fail_their_dependants(start_server,
                                                                  short_dir) -> None:
    server = start_server("--workers", "1")
    gate = t.Gate(short_dir, "busy")
    with server.connect() as client:
        busy = client.run(t.blocker, str(gate.started), str(gate.release_fifo))
        assert busy is not None
        gate.wait_started()
        later = client.options(delay=3600).run(t.identity, "later")
        doomed = client.options(expires=0.2).run(t.identity, "doomed")
        assert later is not None and doomed is not None
        after_later = client.options(after=[later]).run(t.identity, "never")
        after_doomed = client.options(after=[doomed]).run(t.identity, "never")
        assert after_later is not None and after_doomed is not None
        assert client.cancel(later.task_id)
        with pytest.raises(DependencyFailedError, match="was cancelled") as info:
            after_later.result(R)
        assert isinstance(info.value.__cause__, concurrent.futures.CancelledError)
        with pytest.raises(DependencyFailedError, match="expired") as info:
            after_doomed.result(R)
        assert isinstance(info.value.__cause__, TaskExpiredError)
        gate.release()
        assert busy.result(R) == "go"


def test_waiting_tasks_survive_a_sigkill_and_restart(start_server, short_dir) -> None:
    journal = short_dir / "j.sqlite3"
    log = str(short_dir / "log")
    kept, doomed = t.Gate(short_dir, "kept"), t.Gate(short_dir, "doomed")
    a = start_server("--journal", str(journal), "--workers", "2")
    client = a.connect()
    try:
        done = client.run(t.identity, "done")
        failed = client.run(t.raise_value_error, "before")
        running = client.with_policy(Policy(retries=1, backoff_initial=0)).run(
            t.blocker, str(kept.started), str(kept.release_fifo))
        crashing = client.with_policy(Policy(retries=0)).run(
            t.blocker, str(doomed.started), str(doomed.release_fifo))
        assert done is not None and failed is not None and running is not None
        assert crashing is not None and done.result(R) == "done"
        with pytest.raises(ValueError):
            failed.result(R)
        kept.wait_started()
        doomed.wait_started()
        waits = client.options(after=[done, running]).run(t.log_start, log, "waits")
        dies = client.options(after=[crashing]).run(t.log_start, log, "dies")
        assert waits is not None and dies is not None
        ids = (client.accepted(waits, R), client.accepted(dies, R))
        kill(a)
        kept.started.unlink()
        b = start_server("--journal", str(journal), "--workers", "2", like=a)
        with b.connect() as other:
            kept.wait_started()  # running again; ``crashing`` spent its only attempt
            with pytest.raises(DependencyFailedError) as info:
                other.result(ids[1], R)
            assert isinstance(info.value.__cause__, WorkerCrashedError)
            assert other.task(ids[0]).state == "waiting"
            late = other.options(after=[failed.task_id]).run(t.identity, "never")
            with pytest.raises(DependencyFailedError) as info:  # its outcome: in the journal
                late.result(R)  # type: ignore[union-attr]
            assert isinstance(info.value.__cause__, ValueError)
            assert not isinstance(info.value.__cause__, RemoteTaskError)
            kept.release()
            assert other.result(ids[0], R) == "waits"
            assert waits.result(R) == "waits"  # (the first client reconnected)
        assert [label for label, _ in t.logged(log)] == ["waits"]
    finally:
        client.close()
    b.stop()
    assert b.proc.returncode == 143, b.stderr()


def test_a_recovered_dependant_of_a_task_that_failed_before_the_restart(start_server,
                                                                        short_dir) -> None:
    """The journal alone says the dependency failed, when its dependant is recovered: the
    dependant's record is pointed at a task that failed before the kill (edited while the
    server is down: the window in which that happens by itself is too short to hit)."""
    import sqlite3

    journal = short_dir / "j.sqlite3"
    gate = t.Gate(short_dir, "busy")
    a = start_server("--journal", str(journal), "--workers", "2")
    client = a.connect()
    try:
        busy = client.with_policy(Policy(retries=1, backoff_initial=0)).run(
            t.blocker, str(gate.started), str(gate.release_fifo))
        failed = client.run(t.raise_value_error, "journaled")
        assert busy is not None and failed is not None
        gate.wait_started()
        with pytest.raises(ValueError):
            failed.result(R)
        dependant = client.options(after=[busy]).run(t.identity, "never")
        assert dependant is not None
        ids = (client.accepted(failed, R), client.accepted(dependant, R))
        kill(a)
        db = sqlite3.connect(journal)
        try:
            db.execute("UPDATE tasks SET after_ids=? WHERE id=?", (str(ids[0]), ids[1]))
            db.commit()
        finally:
            db.close()
        gate.started.unlink()
        b = start_server("--journal", str(journal), "--workers", "2", like=a)
        with b.connect() as other:
            with pytest.raises(DependencyFailedError) as info:
                other.result(ids[1], R)
            assert info.value.dependency == ids[0]
            assert isinstance(info.value.__cause__, ValueError)
            gate.wait_started()
            gate.release()
            assert busy.result(R) == "go"
    finally:
        client.close()
