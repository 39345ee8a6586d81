"""``taskorch serve``'s tasks by id: journal first, then the backlog (server process).

``TaskRegistry`` sits between the connections and the orchestrator. A submission arrives with
a backlog slot already held (``Intake.reserve``, by the connection); the registry journals it
and, once the record is committed, enqueues it in that slot (``Intake.admit_reserved``): a
task is accepted only when committed, and a committed task always has its slot. It then
watches the task: its start and its outcome go to the journal, and its outcome to whoever
waits for that id (``Outcome`` futures: the submitting connection, ``Client.result()``
callers on any connection).

Threads: ``submit``/``find``/``watch`` run in connection readers and the asyncio thread; the
journal's writer runs the commit callbacks (``_committed``: admit, answer); the dispatcher
runs ``_started`` under the backlog lock (it only queues a journal op); the "taskorch-
callbacks" thread runs ``_task_done``. ``_lock`` guards ``_live`` and orders "the outcome is
queued for the journal" before "the id leaves ``_live``", so that a lookup that misses
``_live`` is queued after the outcome and finds it. Never held across a callback.

Stopping with a durable journal: tasks that the drain's timeout cancels (queued) or abandons
(running) are not recorded as ended: they stay queued or running in the journal, and the next
server runs them (charging the abandoned ones an attempt, as a crash). Their clients get no
outcome now; after reconnecting they get it from the next server.
"""

from __future__ import annotations

import functools
import logging
import pickle
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from taskorch._errors import JournalError, TaskAbandonedError, TaskorchError
from taskorch._service.journal import DONE, Journal, Row
from taskorch._service.protocol import (
    O_CANCELLED,
    O_ERROR,
    O_RAISED,
    O_RESULT,
    WirePolicy,
    decode_builtins,
    decode_service_policy,
    encode_service_error,
)
from taskorch._wire import PROTOCOL

if TYPE_CHECKING:
    from taskorch._parent.orchestrator import TaskOrchestrator
    from taskorch._parent.task import RawOutcome, TaskFuture, WorkItem

log = logging.getLogger("taskorch")


class Outcome(NamedTuple):
    """A task's end as ``S_DONE`` carries it (see ``protocol``)."""

    outcome: int
    attempts: int
    seconds: float | None
    data: Any


#: What a submission became: ``(task_id, the Outcome future)``, or the error that refused it
#: (QueueFullError, OrchestratorClosedError, JournalError, ...).
Admission = "tuple[int, Future[Outcome]] | BaseException"


class TaskRegistry:
    def __init__(self, orchestrator: TaskOrchestrator, journal: Journal) -> None:
        self._orchestrator = orchestrator
        self._intake = orchestrator.intake
        self.journal = journal
        self._lock = threading.Lock()
        # Accepted, outcome not yet queued for the journal: the Outcome future and the task's.
        self._live: dict[int, tuple[Future[Outcome], TaskFuture]] = {}
        # Set when the server starts to stop (main thread); read by _task_done.
        self.stopping = False
        self.left_for_next_start = 0  # tasks the drain ended that stay live in the journal

    # -- recovery (main thread, before the journal's writer and the listener start) ---------

    def recover(self) -> tuple[int, int, int]:
        """Enqueue what the journal holds unfinished, in id order. Returns (queued again,
        running ones retried, running ones failed: their attempts were spent)."""
        rows = self.journal.rows_to_recover()
        requeued: list[tuple[int, int]] = []
        counts = [0, 0, 0]
        for row in rows:
            crashed = row.state != "queued"
            attempts = max(1, row.attempts) if crashed else row.attempts
            policy, policy_bytes = self._policy(row.policy)
            item = self._intake.prepare(row.payload or b"", policy, policy_bytes, raw=True)
            item.on_start = functools.partial(self._started, row.id)
            out: Future[Outcome] = Future()
            with self._lock:
                self._live[row.id] = (out, item.future)
            future = self._intake.recover(item, attempts, crashed)
            future.add_done_callback(functools.partial(self._task_done, row.id, out))
            if crashed:
                requeued.append((row.id, attempts))
            failed = crashed and future.done()
            counts[2 if failed else 1 if crashed else 0] += 1
        self.journal.requeue(requeued)
        return counts[0], counts[1], counts[2]

    # -- submitting (readers, the asyncio thread, the journal's writer) ----------------------

    def submit_reserved(
        self, client: bytes, sub: int, payload: bytes, wire_policy: WirePolicy | None,
        on_admitted: Callable[[Any], None],
    ) -> None:
        """Journal a submission whose backlog slot is held; ``on_admitted(Admission)`` is
        called (by the journal's writer) once it is committed and enqueued, or refused.
        ValueError (slot released, nothing sent to the journal): a bad policy."""
        try:
            policy, policy_bytes = self._policy_of(wire_policy)
        except ValueError:
            self._intake.unreserve()
            raise
        item = self._intake.prepare(payload, policy, policy_bytes, raw=True)
        blob = None if wire_policy is None else pickle.dumps(wire_policy, PROTOCOL)
        self.journal.submit(client, sub, payload, blob, functools.partial(
            self._committed, item, on_admitted))

    def _committed(
        self, item: WorkItem, on_admitted: Callable[[Any], None], task_id: int,
        existing: Row | None, error: JournalError | None,
    ) -> None:
        """The journal's writer, after COMMIT."""
        if error is not None or existing is not None:
            self._intake.unreserve()
            if error is not None:
                on_admitted(error)
            else:
                assert existing is not None
                self._attach(existing, on_admitted)
            return
        item.on_start = functools.partial(self._started, task_id)
        out: Future[Outcome] = Future()
        with self._lock:
            self._live[task_id] = (out, item.future)
        try:
            future = self._intake.admit_reserved(item)
        except TaskorchError as exc:  # stopping: the record goes, then the client is told
            with self._lock:
                self._live.pop(task_id, None)
            self.journal.forget(task_id, functools.partial(on_admitted, exc))
            return
        on_admitted((task_id, out))
        future.add_done_callback(functools.partial(self._task_done, task_id, out))

    def find(self, client: bytes, sub: int, on_found: Callable[[Any], None],
             on_missing: Callable[[], None]) -> None:
        """A retried submission: ``on_found(Admission)`` if its record exists, else
        ``on_missing()`` (both from the journal's writer)."""
        def found(row: Row | None) -> None:
            if row is None:
                on_missing()
            else:
                self._attach(row, on_found)

        self.journal.find(client, sub, found)

    def watch(self, task_id: int, on_watch: Callable[[Future[Outcome] | None], None]) -> None:
        """The Outcome future of ``task_id`` (None: unknown id) for ``Client.result()``."""
        with self._lock:
            live = self._live.get(task_id)
            if live is None:
                self.journal.lookup(task_id, lambda row: on_watch(self._from_row(task_id, row)))
                return
        on_watch(live[0])

    def cancel(self, task_id: int) -> None:
        """A run_async() withdrawn just as it was accepted: cancel it if not started."""
        with self._lock:
            live = self._live.get(task_id)
        if live is not None:
            live[1].cancel()  # succeeds only while queued in the backlog

    def _attach(self, row: Row, on_admitted: Callable[[Any], None]) -> None:
        out = self._from_row(row.id, row)
        assert out is not None
        on_admitted((row.id, out))

    def _from_row(self, task_id: int, row: Row | None) -> Future[Outcome] | None:
        if row is None:
            return None
        with self._lock:
            live = self._live.get(task_id)
        if live is not None:  # live: its record says queued or running
            return live[0]
        out: Future[Outcome] = Future()
        if row.state == DONE and row.outcome is not None:
            data = decode_builtins(row.data) if row.data is not None else None
            out.set_result(Outcome(row.outcome, row.attempts, row.seconds, data))
        else:
            out.set_result(Outcome(O_ERROR, row.attempts, None, encode_service_error(
                JournalError(f"task {task_id} is not running here and its outcome was not "
                             "journaled (see the server's log; it runs again at a restart)"))))
        return out

    # -- the task's life ----------------------------------------------------------------------

    def _started(self, task_id: int, item: WorkItem) -> None:
        """The dispatcher, under the backlog lock: only queue the record."""
        self.journal.started(task_id, item.attempts)

    def _task_done(self, task_id: int, out: Future[Outcome], future: Any) -> None:
        """The "taskorch-callbacks" thread: journal the outcome, then publish it."""
        outcome = _outcome_of(future)
        if self.stopping and self.journal.durable and (
                outcome.outcome == O_CANCELLED or _abandoned(future)):
            with self._lock:
                self._live.pop(task_id, None)
                self.left_for_next_start += 1
            return  # left live in the journal for the next start (see the module docstring)
        blob = pickle.dumps(outcome.data, PROTOCOL)
        with self._lock:
            self.journal.finished(task_id, outcome.outcome, outcome.attempts, outcome.seconds,
                                  blob)
            self._live.pop(task_id, None)
        out.set_result(outcome)

    def _policy(self, blob: bytes | None) -> tuple[Any, bytes | None]:
        return self._policy_of(None if blob is None else decode_builtins(blob))

    def _policy_of(self, wire_policy: WirePolicy | None) -> tuple[Any, bytes | None]:
        if wire_policy is None:
            return self._orchestrator.policy, None
        return decode_service_policy(wire_policy)


def _outcome_of(future: TaskFuture) -> Outcome:
    attempts, seconds = future.attempts, future.seconds
    if future.cancelled():
        return Outcome(O_CANCELLED, attempts, seconds, None)
    exc = future.exception()
    if exc is not None:
        return Outcome(O_ERROR, attempts, seconds, encode_service_error(exc))
    raw: RawOutcome = future.result()
    return Outcome(O_RESULT if raw.ok else O_RAISED, attempts, seconds, raw.data)


def _abandoned(future: TaskFuture) -> bool:
    return not future.cancelled() and isinstance(future.exception(), TaskAbandonedError)
