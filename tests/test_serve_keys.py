"""``options(key=)`` and ``options(after=)`` through ``taskorch serve`` where submissions race:
a withdrawn ``run_async()`` that joined a key, a join of a record forgotten since, two keyed
submissions in one batch, a keyed submission sent again after its answer was lost, what a
dependant holds while it waits, and ``Client.retry()`` of a keyed task and of a dependant.

Most tests run a ``Server`` in this process (as ``test_service_admission`` does), so that the
journal's writer can be held inside a batch (``Hold``: a ``Journal.run`` transaction that
waits for a release): what is submitted meanwhile goes into the next batch, together, and the
test knows each submission has reached the journal (``CountedJournal``). A withdraw is known
to have reached the server once a later request on its connection is answered and the
server's loop has run what was queued before (``barrier``). No sleeps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import pickle
import threading
from multiprocessing.connection import Client as RawClient
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Iterator

import _tasks as t
import pytest
import test_service
from test_service import R
from test_service_admission import KEY
from test_service_journal import hold_a_worker, kill

from taskorch import DependencyFailedError, TaskOrchestrator, connect
from taskorch._service.codec import encode_service_frame
from taskorch._service.protocol import (
    O_RAISED,
    O_RESULT,
    S_ACCEPTED,
    S_BATCH,
    S_CREDIT,
    S_DONE,
    S_HELLO,
    SubmitOptions,
    submit_frame,
)
from taskorch._service.server.journal import Journal
from taskorch._service.server.listener import bind_unix
from taskorch._service.server.outcomes import Dependency, Outcome
from taskorch._service.server.registry import TaskRegistry
from taskorch._service.server.server import Server
from taskorch._wire import encode_call

short_dir = test_service.short_dir
start_server = test_service.start_server


class CountedJournal(Journal):
    """An in-memory journal that counts the submissions handed to it."""

    def __init__(self) -> None:
        super().__init__(None)
        self.submits = 0
        self._counted = threading.Condition()

    def submit(self, *args: Any, **kwargs: Any) -> None:
        super().submit(*args, **kwargs)
        with self._counted:
            self.submits += 1
            self._counted.notify_all()

    def wait_submits(self, n: int) -> None:
        with self._counted:
            assert self._counted.wait_for(lambda: self.submits >= n, R), "never submitted"


class Hold:
    """The journal's writer held inside a batch until ``release()``: ops queued from now on
    wait, and go in one batch (or two, with a second Hold queued meanwhile)."""

    def __init__(self, journal: Journal) -> None:
        self.entered = threading.Event()
        self._release = threading.Event()
        journal.run(self._wait, lambda result: None)

    def _wait(self, db: object) -> None:
        self.entered.set()
        assert self._release.wait(R)

    def wait_entered(self) -> Hold:
        assert self.entered.wait(R), "the journal's writer never took the hold"
        return self

    def release(self) -> None:
        self._release.set()


class Served:
    """A server in this process: its address, its journal, its loop."""

    def __init__(self, server: Server, journal: CountedJournal) -> None:
        self.server = server
        self.journal = journal

    def connect(self) -> Any:
        return connect(self.server.listener.address, authkey=KEY)

    def barrier(self, client: Any) -> None:
        """Everything ``client`` sent before is read by its connection's reader, and what the
        reader queued on the server's loop (a withdraw) has run."""
        client.stats()
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), self.server.loop).result(R)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop in a thread of its own: ``run_async()`` submissions whose answers are
    awaited later (a ``run()`` may wait for a credit's round trip while the writer is held)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-loop")
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(R)
    loop.close()


def _submitted(loop: asyncio.AbstractEventLoop, submission: Any) -> Any:
    """``submission`` (a run_async() coroutine) on ``loop``: its future's future."""
    return asyncio.run_coroutine_threadsafe(submission, loop)


def _withdraw_once_journaled(served: Served, client: Any, key: str, value: str, n: int,
                             committed: bool = False,
                             before_cancel: Callable[[], None] = lambda: None) -> None:
    """``client``'s keyed run_async(), cancelled once its submission is the journal's
    ``n + 1``-th (``committed``: and committed and accepted, its answer unread), after
    ``before_cancel()``; the loop is blocked from the submission to the cancel, so no answer
    reaches the call: it raises CancelledError, as a withdrawn call does."""
    hold = Hold(served.journal).wait_entered() if committed else None

    async def withdrawn() -> None:
        task = asyncio.ensure_future(client.options(key=key).run_async(t.identity, value))
        await asyncio.to_thread(served.journal.wait_submits, n + 1)
        if hold is not None:
            hold.release()
            assert served.journal.flush(R)
        before_cancel()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(withdrawn())


@pytest.fixture
def served(make_orchestrator: Callable[..., TaskOrchestrator],
           short_dir: Path) -> Iterator[Served]:
    orchestrator = make_orchestrator(worker_count=1)
    journal = CountedJournal()
    server = Server(orchestrator, bind_unix(str(short_dir / "s.sock")), KEY,
                    registry=TaskRegistry(orchestrator, journal))
    journal.start()
    server.start()
    try:
        yield Served(server, journal)
    finally:
        server.close()
        journal.close()


def test_a_withdrawn_run_async_that_joined_a_key_leaves_the_task_alone(served: Served,
                                                                       short_dir: Path) -> None:
    gate = t.Gate(short_dir, "busy")
    with served.connect() as one, served.connect() as two:
        busy = one.run(t.blocker, str(gate.started), str(gate.release_fifo))
        gate.wait_started()
        k = one.options(key="shared").run(t.identity, "one's")
        k_id = one.accepted(k, R)
        submitted = one.stats().submitted
        n = served.journal.submits
        hold = Hold(served.journal).wait_entered()
        try:  # its join is being journaled when it is withdrawn
            _withdraw_once_journaled(served, two, "shared", "2", n)
            served.barrier(two)
        finally:
            hold.release()
        assert served.journal.flush(R)  # the join committed, and answered
        served.barrier(two)  # (a cancel it caused would be on its way now)
        assert one.task(k_id).state == "queued"
        gate.release()
        assert busy.result(R) == "go" and k.result(R) == "one's"
        assert one.stats().submitted == submitted  # the join enqueued nothing


def test_a_join_withdrawn_once_accepted_only_stops_watching(served: Served,
                                                            short_dir: Path) -> None:
    """The withdraw arrives after the server accepted the join (its S_ACCEPTED unread): the
    connection knows the task is not its own, and does not cancel it."""
    gate = t.Gate(short_dir, "busy")
    with served.connect() as one, served.connect() as two:
        busy = one.run(t.blocker, str(gate.started), str(gate.release_fifo))
        gate.wait_started()
        k = one.options(key="shared").run(t.identity, "one's")
        k_id = one.accepted(k, R)
        n = served.journal.submits
        _withdraw_once_journaled(served, two, "shared", "2", n, committed=True)  # (as k_id)
        served.barrier(two)
        assert one.task(k_id).state == "queued"
        gate.release()
        assert busy.result(R) == "go" and k.result(R) == "one's"


def test_an_owner_withdrawn_once_others_joined_leaves_the_task_to_them(
        served: Served, short_dir: Path) -> None:
    """``one``'s keyed run_async() is accepted (its S_ACCEPTED unread), ``two`` joins its task
    by the key, then ``one``'s is withdrawn: the task is two's too by then, so it runs on."""
    gate = t.Gate(short_dir, "busy")
    with served.connect() as one, served.connect() as two:
        busy = one.run(t.blocker, str(gate.started), str(gate.release_fifo))
        gate.wait_started()
        n = served.journal.submits
        joins: list[tuple[Any, int]] = []

        def joined_by_two() -> None:
            joined = two.options(key="shared").run(t.identity, "2")
            joins.append((joined, two.accepted(joined, R)))

        _withdraw_once_journaled(served, one, "shared", "1", n, committed=True,
                                 before_cancel=joined_by_two)
        ((joined, task_id),) = joins
        served.barrier(one)
        assert two.task(task_id).state == "queued"
        gate.release()
        assert busy.result(R) == "go" and joined.result(R) == "1"


def test_cancelling_a_joined_future_cancels_the_shared_task_as_locally(
        served: Served, short_dir: Path) -> None:
    gate = t.Gate(short_dir, "busy")
    with served.connect() as one, served.connect() as two:
        busy = one.run(t.blocker, str(gate.started), str(gate.release_fifo))
        gate.wait_started()
        k = one.options(key="shared").run(t.identity, "one's")
        joined = two.options(key="shared").run(t.identity, "two's")
        assert two.accepted(joined, R) == one.accepted(k, R)
        assert joined.cancel()  # (locally: the same future, cancelled for both)
        with pytest.raises(concurrent.futures.CancelledError):
            k.result(R)
        gate.release()
        assert busy.result(R) == "go"


@pytest.mark.parametrize("batch", ["same", "next"])
def test_a_join_of_a_record_forgotten_since_runs_as_a_new_task(
        served: Served, loop: asyncio.AbstractEventLoop, batch: str) -> None:
    """``one``'s keyed run_async() is withdrawn while its record is committed, so the record
    is forgotten; ``two``'s submission with the key joined it in the same batch, or in the
    next one (before the forget). It must run as a task of its own, not fail."""
    with served.connect() as one, served.connect() as two:
        submitted = one.stats().submitted
        n = served.journal.submits
        first = Hold(served.journal).wait_entered()
        holds = [first]
        try:
            _withdraw_once_journaled(served, one, "k2", "A", n)
            served.barrier(one)
            if batch == "next":  # one's record in a batch of its own, held before its COMMIT
                holds.append(Hold(served.journal))
                first.release()
                holds[-1].wait_entered()
            answer = _submitted(loop, two.options(key="k2").run_async(t.identity, "B"))
            served.journal.wait_submits(n + 2)
        finally:
            for hold in holds:
                hold.release()
        joined = answer.result(R)
        assert joined.result(R) == "B"
        assert one.stats().submitted == submitted + 1
        assert two.task(joined.task_id).state == "succeeded"


def test_two_submissions_with_one_key_in_one_batch_make_one_task(
        served: Served, loop: asyncio.AbstractEventLoop) -> None:
    with served.connect() as one, served.connect() as two:
        submitted = one.stats().submitted
        n = served.journal.submits
        hold = Hold(served.journal).wait_entered()
        try:
            answers = [_submitted(loop, one.options(key="batch").run_async(t.identity, "first"))]
            served.journal.wait_submits(n + 1)  # (first in the batch)
            answers += [_submitted(loop, two.options(key="batch").run_async(t.identity, "2nd")),
                        _submitted(loop, two.options(key="another").run_async(t.identity, "other"))]
            served.journal.wait_submits(n + 3)
        finally:
            hold.release()
        first, second, other = (answer.result(R) for answer in answers)
        assert second.task_id == first.task_id != other.task_id
        assert first.result(R) == second.result(R) == "first"
        assert other.result(R) == "other"
        assert one.stats().submitted == submitted + 2


def test_a_dependant_holds_no_result_of_its_dependencies(served: Served,
                                                         short_dir: Path) -> None:
    gate = t.Gate(short_dir, "last")
    with served.connect() as client:
        shards = [client.run(t.identity, b"x" * 2**20) for _ in range(4)]
        last = client.run(t.blocker, str(gate.started), str(gate.release_fifo))  # (1 worker)
        report = client.options(after=shards + [last]).run(t.identity, "report")
        assert all(s is not None and len(s.result(R)) == 2**20 for s in shards)
        gate.wait_started()
        assert served.journal.flush(R)  # every outcome published (to the dependencies too)
        ids = {client.accepted(s, R) for s in shards}
        gc.collect()
        heard = [o.ended for o in gc.get_objects()
                 if isinstance(o, Dependency) and o.future.task_id in ids and o.ended]
        assert len(heard) == 4  # each shard's success, heard of by the waiting report...
        assert [outcome.data for outcome in heard] == [None] * 4  # ...without its result
        gate.release()
        assert report.result(R) == "report"


def test_a_dependency_keeps_a_failures_data_as_the_cause() -> None:
    succeeded, failed = Dependency(1), Dependency(2)
    succeeded.outcome(0, Outcome(O_RESULT, 1, 0.5, b"x" * 1000))
    assert succeeded.ended == Outcome(O_RESULT, 1, 0.5, None)
    raised = (b"pickled", "ValueError", "no", "traceback")
    failed.outcome(0, Outcome(O_RAISED, 1, 0.5, raised))
    assert failed.ended == Outcome(O_RAISED, 1, 0.5, raised)


# -- a submission sent again after its answer was lost -------------------------------------


def _raw(served: Served) -> Connection[Any, Any]:
    conn = RawClient(served.server.listener.address, authkey=KEY)
    assert [message[0] for message in _read(conn, 2)] == [S_HELLO, S_CREDIT]
    return conn


def _read(conn: Connection[Any, Any], n: int) -> list[tuple[Any, ...]]:
    """The next ``n`` server messages (an S_BATCH holds several)."""
    messages: list[tuple[Any, ...]] = []
    while len(messages) < n:
        message = pickle.loads(conn.recv_bytes())
        messages += list(message[1]) if message[0] == S_BATCH else [message]
    return messages


def _keyed(req: int, token: bytes, retry: bool) -> bytes:
    return encode_service_frame(submit_frame(
        req, encode_call(t.identity, ("never",), {}), None, wait=False, client=token,
        retry=retry, credit=False, options=SubmitOptions(None, "sent twice", None)))


def test_a_keyed_submission_sent_again_finds_the_task_it_joined_after_it_ended(
        served: Served, short_dir: Path) -> None:
    gate = t.Gate(short_dir, "t")
    token = b"a client that reconnects"
    with served.connect() as one:
        task = one.options(key="sent twice").run(t.blocker, str(gate.started),
                                                  str(gate.release_fifo))
        task_id = one.accepted(task, R)
        gate.wait_started()
        with _raw(served) as first:
            first.send_bytes(_keyed(5, token, retry=False))
            assert _read(first, 1)[0][:3] == (S_ACCEPTED, 5, task_id)
        # (as if that S_ACCEPTED was lost with the connection)
        gate.release()
        assert task.result(R) == "go"
        submitted = one.stats().submitted
        with _raw(served) as again:
            again.send_bytes(_keyed(5, token, retry=True))
            accepted, done = _read(again, 2)
            assert accepted[:3] == (S_ACCEPTED, 5, task_id)
            assert done[:3] == (S_DONE, 5, O_RESULT)
        assert one.stats().submitted == submitted  # nothing ran again


# -- Client.retry() ----------------------------------------------------------------------------


def test_a_retry_keeps_the_key_and_leaves_the_dependencies(served: Served,
                                                           short_dir: Path) -> None:
    gate = t.Gate(short_dir, "busy")
    with served.connect() as client:
        failed = client.options(key="nightly").run(t.raise_value_error, "once")
        with pytest.raises(ValueError):
            failed.result(R)
        cancelled = client.options(delay=3600).run(t.identity, "never")
        dependant = client.options(after=[cancelled]).run(t.identity, "dependant")
        assert client.cancel(cancelled.task_id)
        with pytest.raises(DependencyFailedError):
            dependant.result(R)
        busy = client.run(t.blocker, str(gate.started), str(gate.release_fifo))
        gate.wait_started()
        retried = client.retry(failed.task_id)
        assert client.task(retried).retry_of == failed.task_id
        joins = client.options(key="nightly").run(t.identity, "joins the retry")
        assert client.accepted(joins, R) == retried  # the retry holds the key
        assert client.retry(failed.task_id) == retried  # and a second retry joins it
        again = client.retry(dependant.task_id)  # runs without its (cancelled) dependency
        gate.release()
        assert busy.result(R) == "go"
        with pytest.raises(ValueError, match="once"):
            client.result(retried, R)
        assert client.result(again, R) == "dependant"
        assert client.task(again).retry_of == dependant.task_id


# -- across a kill -9 and restart (a real server process) -------------------------------------


@pytest.mark.slow
def test_unanswered_keyed_and_after_submissions_are_sent_again_after_a_restart(
        start_server: Callable[..., Any], short_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    journal = short_dir / "j.sqlite3"
    gate = t.Gate(short_dir, "busy")
    a = start_server("--journal", str(journal), "--workers", "1")
    client = a.connect()
    try:
        busy = hold_a_worker(client, gate)
        keyed = client.options(key="rk").run(t.identity, "keyed")
        keyed_id = client.accepted(keyed, R)
        t.sigstop(a.proc.pid)  # what is sent now is never answered by this server
        unanswered = client.options(key="rk").run(t.identity, "joins")  # (a credit)
        session, sent = client._session, threading.Event()
        send = session._send
        monkeypatch.setattr(session, "_send", lambda frame: (send(frame), sent.set()))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            after = pool.submit(client.options(after=[keyed]).run, t.identity, "after")
            assert sent.wait(R)  # (its frame is written: the next server gets it again)
            kill(a)
            gate.started.unlink()
            b = start_server("--journal", str(journal), "--workers", "1", like=a)
            gate.wait_started()  # the busy one runs again (a crash retry)
            dependant = after.result(R)
        assert client.accepted(unanswered, R) == keyed_id  # sent again: it joins
        assert dependant is not None and dependant.task_id > keyed_id
        gate.release()
        assert busy.result(R) == "go"
        assert keyed.result(R) == unanswered.result(R) == "keyed"
        assert dependant.result(R) == "after"
        with b.connect() as other:
            assert other.stats().submitted == 3  # busy, keyed, after: recovered and new
    finally:
        client.close()
