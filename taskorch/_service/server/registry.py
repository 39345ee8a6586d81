"""``taskorch serve``'s tasks by id: journal first, then the backlog (server process).

``TaskRegistry`` sits between the connections and the orchestrator. A submission arrives with
a backlog slot already held (``Intake.reserve``, by the connection); the registry journals it
and, once the record is committed, enqueues it in that slot (``Intake.admit_reserved``): a
task is accepted only when committed, and a committed task always has its slot. It then
watches the task: its start and its outcome go to the journal, and once the outcome is
committed, to whoever waits for that id (a ``Sink`` and its request number: the submitting
connection, ``Client.result()`` callers on any connection).

The outcome path: the dispatcher resolves the task's future, whose observer
(``TaskFuture.set_observer``, called in the resolving thread, never user code) queues the outcome
for the journal; the journal's writer commits it with the others of its batch, then publishes
it (``_publish``) to the sinks, which queue S_DONE for their connection's writer.

Threads: ``submit_reserved``/``find``/``watch`` run in connection readers and the asyncio
thread; the journal's writer runs the commit callbacks (``_committed``: admit, answer) and
``_publish``; the dispatcher runs ``_Live.started`` (a ``TaskListener``) under the backlog lock
and ``_ended`` (the observer) after it, both only queue a journal op (``_ended`` in whichever
thread resolves the future: a canceller, ``stop()``, recovery). ``_lock`` guards ``_live``; an
id leaves ``_live`` only once its outcome is committed, so that a lookup that misses ``_live``
(queued after that commit) finds the outcome in the journal; or with no outcome at all: a task
left for the next start at stop, or a record forgotten because the server stopped before
enqueuing it. Never held across a callback.

Stopping with a durable journal: tasks that the drain's timeout cancels (queued) or abandons
(running) are not recorded as ended: they stay queued or running in the journal, and the next
server runs them (charging the abandoned ones an attempt, as a crash). Their clients get no
outcome now; after reconnecting they get it from the next server.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import pickle
import threading
from typing import TYPE_CHECKING, Any, Callable

from taskorch._errors import (
    DependencyFailedError,
    JournalError,
    SerializationError,
    TaskNotFoundError,
)
from taskorch._options import Resolved, check_resolved
from taskorch._parent.task import TaskListener, TaskState
from taskorch._service.protocol import O_CANCELLED, O_ERROR, O_RESULT, WireTiming
from taskorch._service.server.callbacks import Grouped, guarded, nothing
from taskorch._service.server.journal import DONE, Journal
from taskorch._service.server.journal_file import Row, after_ids_of
from taskorch._service.server.outcomes import (
    Dependency,
    Outcome,
    Sink,
    abandoned,
    dependency_outcome,
    outcome_and_status,
)
from taskorch._service.server.submissions import Existing
from taskorch._service.values import (
    WirePolicy,
    decode_builtins,
    decode_service_policy,
    encode_service_error,
)
from taskorch._stats import Progress
from taskorch._wire import PROTOCOL

if TYPE_CHECKING:
    from taskorch._parent.orchestrator import TaskOrchestrator
    from taskorch._parent.task import TaskFuture, WorkItem

log = logging.getLogger("taskorch")

#: A named tuple from its fields (``tuple.__new__`` in C: a ``Grouped`` callback per task).
_new = tuple.__new__


class _Live(TaskListener):
    """An accepted task whose outcome is not committed yet: its future, who waits for it (the
    first watcher inline, the others in a list), and the task's hooks (bound methods of this
    object, not partials: a live task holds few objects for the garbage collector to visit)."""

    __slots__ = ("registry", "task_id", "item", "future", "sink", "req", "more", "after")

    def __init__(self, registry: TaskRegistry, task_id: int, item: WorkItem,
                 watcher: tuple[Sink, int] | None) -> None:
        self.registry = registry
        self.task_id = task_id
        self.item = item  # (for a terminate: ``Dispatcher.terminate``)
        self.future = item.future
        self.sink: Sink | None = None
        self.req = 0
        if watcher is not None:
            self.sink, self.req = watcher
        self.more: list[tuple[Sink, int]] | None = None
        # Its ``options(after=)``, by journal id, while it has some (``outcomes``).
        self.after: dict[int, Dependency] | None = None

    def watch(self, sink: Sink, req: int) -> None:  # (registry lock held)
        if self.sink is None:
            self.sink, self.req = sink, req
        elif self.more is None:
            self.more = [(sink, req)]
        else:
            self.more.append((sink, req))

    def watchers(self) -> list[tuple[Sink, int]]:
        first = [] if self.sink is None else [(self.sink, self.req)]
        return first + (self.more or [])

    def started(self, item: WorkItem, now: float) -> None:
        """A ``TaskListener`` moment (the task's own, ``WorkItem.listener``): the dispatcher,
        under the backlog lock: only queue the record."""
        self.registry.journal.started(self.task_id, item.attempts,
                                      getattr(item.started_on, "pid", None))

    def ended(self, future: TaskFuture) -> None:
        """The future's observer (``TaskFuture.set_observer``): see ``TaskRegistry._ended``."""
        self.registry._ended(self.task_id, future, self.after)


class _Pending:
    """A submission being journaled: its record's fields (``Journal.submit``'s), its task
    (not enqueued yet) and who hears of it; ``again``: journaled a second time (``_answer_by``)."""

    __slots__ = ("record", "item", "sink", "req", "again")

    def __init__(self, record: tuple[Any, ...], item: WorkItem, sink: Sink, req: int) -> None:
        self.record = record
        self.item = item
        self.sink = sink
        self.req = req
        self.again = False


class TaskRegistry:
    def __init__(self, orchestrator: TaskOrchestrator, journal: Journal) -> None:
        self._orchestrator = orchestrator
        self._intake = orchestrator.intake
        self.journal = journal
        self._lock = threading.Lock()
        # Accepted, outcome not yet committed: by task id (see the module docstring).
        self._live: dict[int, _Live] = {}
        # Set when the server starts to stop (main thread); read by _ended.
        self.stopping = False
        self.left_for_next_start = 0  # tasks the drain ended that stay live in the journal

    def reserve_slot(self, what: str) -> bool:
        """Hold a backlog slot for ``submit_reserved`` (``Intake.reserve``)."""
        return self._intake.reserve(what)

    # -- recovery (main thread, before the journal's writer and the listener start) ---------

    def recover(self) -> tuple[int, int, int]:
        """Enqueue what the journal holds unfinished, in id order. Returns (queued again,
        running ones retried, running ones failed: their attempts were spent)."""
        rows = self.journal.rows_to_recover()
        # A queued task waits again for the tasks it runs after: those that ended meanwhile
        # are read here (their outcomes), the others are recovered before it (lower ids). One
        # that was running had seen them succeed.
        after = {row.id: after_ids_of(row.after) for row in rows
                 if row.after and row.state == "queued"}
        ended = self.journal.dependency_rows(sorted(
            {i for ids in after.values() for i in ids} - {row.id for row in rows}))
        requeued: list[tuple[int, int]] = []
        counts = [0, 0, 0]
        for row in rows:
            crashed = row.state != "queued"
            attempts = max(1, row.attempts) if crashed else row.attempts
            policy, policy_bytes = self._policy(row.policy)
            item = self._intake.prepare(row.payload or b"", policy, policy_bytes, raw=True)
            self._intake.time(item, Resolved(row.priority, row.not_before, row.expires))
            live = self._track(row.id, item, None)
            if row.id in after:
                self._await(live, item, after[row.id], ended)
            future = self._intake.recover(item, attempts, crashed)
            if crashed:
                requeued.append((row.id, attempts))
            failed = crashed and future.done()
            counts[2 if failed else 1 if crashed else 0] += 1
        self.journal.requeue(requeued)
        return counts[0], counts[1], counts[2]

    # -- submitting (readers, the asyncio thread, the journal's writer) ----------------------

    def submit_reserved(self, client: bytes, sub: int, payload: bytes,
                        wire_policy: WirePolicy | None, sink: Sink, req: int,
                        timing: WireTiming | None = None, key: str | None = None,
                        after: tuple[int, ...] | None = None) -> None:
        """Journal a submission whose backlog slot is held; ``sink.admitted(req, ...)`` is
        called (by the journal's writer) once it is committed and enqueued, or refused (a
        ValueError for an ``after`` id the journal does not have before it), and
        ``sink.outcome(req, ...)`` when it ends. An unfinished task with its ``key`` answers
        instead (``submissions``). ValueError (slot released, nothing sent to the journal): a
        bad policy or timing (``options()``: all kept in the journal)."""
        try:
            policy, policy_bytes = self._policy_of(wire_policy)
            resolved = None if timing is None else check_resolved(*timing)
        except ValueError:
            self._intake.unreserve()
            raise
        item = self._intake.prepare(payload, policy, policy_bytes, raw=True)
        if resolved is not None:
            self._intake.time(item, resolved)
        blob = None if wire_policy is None else pickle.dumps(wire_policy, PROTOCOL)
        pending = _Pending((client, sub, payload, blob, resolved, key, after), item, sink, req)
        self.journal.submit(client, sub, payload, blob, _new(Grouped, (
            self._committed_all, pending)), resolved, key, after)  # (``_journal``, inline)

    def _journal(self, pending: _Pending) -> None:
        client, sub, payload, blob, resolved, key, after = pending.record
        self.journal.submit(client, sub, payload, blob, _new(Grouped, (
            self._committed_all, pending)), resolved, key, after)

    def _committed_all(self, answers: list[tuple[_Pending, int, Existing | None,
                                                 BaseException | None, list[Row] | None]]
                       ) -> None:
        """The journal's writer, after COMMIT: a batch's submissions, answered in order
        (``Grouped``). A run of those that made their own tasks is enqueued one by one, then
        answered per sink in one call (``Sink.admitted_all``: a connection takes its lock and
        puts in its outbox once for them all); any other is answered alone (``_committed``),
        after its sink's run before it. One that fails is logged; the others are answered."""
        accepted: dict[Sink, list[tuple[int, int]]] = {}
        for pending, task_id, existing, error, dependencies in answers:
            if existing is not None or error is not None or dependencies:
                earlier = accepted.pop(pending.sink, None)  # (its connection's, told first)
                if earlier:
                    guarded(pending.sink.admitted_all, earlier)
                guarded(self._committed, pending, task_id, existing, error, dependencies)
                continue
            try:
                if not self._admit(pending, task_id, None):
                    continue
            except BaseException:  # a bug: this one is lost (see the log), not the batch
                log.exception("taskorch serve: task %d could not be enqueued", task_id)
                continue
            group = accepted.get(pending.sink)
            if group is None:
                group = accepted[pending.sink] = []
            group.append((pending.req, task_id))
        # Before any outcome: both run on the journal's writer, which alone publishes.
        for sink, admitted in accepted.items():
            guarded(sink.admitted_all, admitted)

    def _committed(self, pending: _Pending, task_id: int, existing: Existing | None,
                   error: BaseException | None, dependencies: list[Row] | None) -> None:
        """The journal's writer, after COMMIT: one submission."""
        if error is not None:
            self._intake.unreserve()
            pending.sink.admitted(pending.req, error)
        elif existing is not None:
            self._answer_by(existing, pending)
        elif self._admit(pending, task_id, dependencies):
            pending.sink.admitted(pending.req, task_id)

    def _admit(self, pending: _Pending, task_id: int, dependencies: list[Row] | None) -> bool:
        """Enqueue the task of a new record, unless withdrawn or the server is stopping;
        True if it was (and its submitter is to be told)."""
        item, sink, req = pending.item, pending.sink, pending.req
        if not sink.wanted(req):  # a run_async() cancelled while its record was committed
            self._intake.unreserve()
            self.journal.forget(task_id, nothing)
            return False
        live = self._track(task_id, item, (sink, req))
        if dependencies:
            self._await(live, item, [row.id for row in dependencies],
                        {row.id: row for row in dependencies})
        try:
            self._intake.admit_reserved(item)
        except Exception as exc:  # stopping (or a bug): the record goes, then the client is told
            with self._lock:
                self._live.pop(task_id, None)
            item.future.set_observer(None)
            self.journal.forget(task_id, functools.partial(sink.admitted, req, exc))
            return False
        return True

    def _answer_by(self, existing: Existing, pending: _Pending) -> None:
        """The journal's writer: a record that exists answers ``pending`` (its own, found
        again, or another's it joined by its key). A withdrawn one is not answered (nor is its
        task cancelled: a joined task is not its own). The record's own submission was made
        before it and answered before it (the writer calls back in order): the record is live
        or ended, else it was forgotten since it was read (that submission was withdrawn; the
        forget is applied before the submissions of the next batch): then ``pending`` is
        journaled again, as new, once (a stopping server leaves records neither live nor
        ended: ``_attach`` says so)."""
        sink, req = pending.sink, pending.req
        if not sink.wanted(req):
            self._intake.unreserve()
            return
        row = existing.row
        with self._lock:
            live = row.id in self._live
        if not live and row.state != DONE and not pending.again:
            pending.again = True
            self._journal(pending)  # (it keeps its backlog slot)
            return
        self._intake.unreserve()
        self._attach(row, sink, req, joined=existing.joined)

    def _track(self, task_id: int, item: WorkItem, watcher: tuple[Sink, int] | None) -> _Live:
        live = _Live(self, task_id, item, watcher)
        item.listener = live
        item.future.set_observer(live.ended)
        with self._lock:
            self._live[task_id] = live
        return live

    def _await(self, live: _Live, item: WorkItem, ids: tuple[int, ...] | list[int],
               ended: dict[int, Row]) -> None:
        """Give ``item`` (not enqueued yet) the tasks it runs after (``outcomes``): each
        watched for its committed outcome, from its row if ``ended`` has it (at once if it
        is done), else as a live task of this server."""
        dependencies = {task_id: Dependency(task_id) for task_id in ids}
        for task_id, dependency in dependencies.items():
            row = ended.get(task_id)
            if row is not None:
                self._attach(row, dependency, 0, admitted=False)
                continue
            with self._lock:
                watched = self._live.get(task_id)
                if watched is not None:
                    watched.watch(dependency, 0)
            if watched is None:
                dependency.rejected(0, TaskNotFoundError(
                    f"task {task_id}'s record is gone (its outcome was pruned after "
                    "--result-ttl while the server was down)"))
        live.after = dependencies
        item.after = tuple(d.future for d in dependencies.values())

    def find(self, client: bytes, sub: int, sink: Sink, req: int,
             on_missing: Callable[[], None]) -> None:
        """A retried submission: its record, if there is one, answers ``req`` (admitted, then
        its outcome when there is one); else ``on_missing()`` (from the journal's writer)."""
        def found(existing: Existing | None) -> None:
            if existing is None:
                on_missing()
            else:
                self._attach(existing.row, sink, req, joined=existing.joined)

        self.journal.find(client, sub, found)

    def watch(self, task_id: int, sink: Sink, req: int, wait: bool) -> None:
        """``Client.result()``: ``sink.outcome(req, ...)`` once task ``task_id`` has ended (at
        once if it has); ``sink.rejected(req, ...)`` for an unknown id, or, without ``wait``,
        for a task that has not ended."""
        with self._lock:
            live = self._live.get(task_id)
            if live is not None and wait:
                live.watch(sink, req)
                return
            if live is None:  # (queued after its outcome, if it has one: see the docstring)
                self.journal.lookup(task_id, functools.partial(self._looked_up, task_id, sink,
                                                                 req))
                return
        sink.rejected(req, TimeoutError(f"task {task_id} has not ended (queued or running)"))

    def _looked_up(self, task_id: int, sink: Sink, req: int, row: Row | None) -> None:
        if row is None:
            sink.rejected(req, TaskNotFoundError(
                f"taskorch serve knows no task {task_id}: never accepted, or its outcome was "
                "pruned (--result-ttl)"))
        else:
            self._attach(row, sink, req, admitted=False)

    def cancel(self, task_id: int) -> bool | None:
        """Cancel task ``task_id`` if it has not started (``Client.cancel()``; a withdrawn
        run_async(): ``withdrawn``): True if it was, False if it had started, None if
        it is not live here (ended, or unknown). Its cancelled outcome goes to the journal as
        any outcome does (``watch`` says when it is committed)."""
        with self._lock:
            live = self._live.get(task_id)
        if live is None:
            return None
        return live.future.cancel()  # succeeds only while queued in the backlog

    def withdrawn(self, task_id: int, sink: Sink, req: int) -> None:
        """``req``'s run_async() was withdrawn once its task ``task_id`` was accepted: cancel
        the task if it has not started, unless someone else watches it by now (a submission
        that joined it by its key, a dependant): then the task goes on for them, and the
        withdrawn request's outcome is dropped by its connection."""
        with self._lock:
            live = self._live.get(task_id)
            if live is None or any(watcher != (sink, req) for watcher in live.watchers()):
                return
        live.future.cancel()  # succeeds only while queued in the backlog

    def progress_of(self, task_id: int) -> Progress | None:
        """A live task's latest ``taskorch.progress()`` (``TaskFuture.latest_progress``)."""
        with self._lock:
            live = self._live.get(task_id)
        return None if live is None else live.future.latest_progress

    def waiting(self, task_id: int) -> bool | None:
        """Does queued task ``task_id`` wait (for a time, a dependency or a limit: the
        backlog's ``waiting_for_locked``)? None if it is not queued here."""
        with self._lock:
            live = self._live.get(task_id)
        if live is None or live.item.state is not TaskState.QUEUED:
            return None
        backlog = self._orchestrator.backlog
        with backlog.locked():
            return backlog.waiting_for_locked(live.item) is not None

    def terminate(self, task_id: int) -> bool:
        """Kill task ``task_id``'s running attempt; it ends cancelled (``_parent.terminate``).
        False if it is not running here (on Dask, its worker process is restarted)."""
        with self._lock:
            live = self._live.get(task_id)
        return live is not None and self._orchestrator.dispatcher.terminate(live.item)

    def _attach(self, row: Row, sink: Sink, req: int, admitted: bool = True,
                joined: bool = False) -> None:
        """An existing record answers ``req``: admitted (a submission found again, or one
        that ``joined`` it), then its outcome: now if it has one, else when it comes."""
        if admitted:
            sink.admitted(req, row.id, joined)
        with self._lock:
            live = self._live.get(row.id)
            if live is not None:  # live: its record says queued or running
                live.watch(sink, req)
                return
        if row.state == DONE and row.outcome is not None:
            data = decode_builtins(row.data) if row.data is not None else None
            sink.outcome(req, Outcome(row.outcome, row.attempts, row.seconds, data))
        else:
            sink.outcome(req, Outcome(O_ERROR, row.attempts, None, encode_service_error(
                JournalError(f"task {row.id} is not running here and its outcome was not "
                             "journaled (see the server's log; it runs again at a restart)"))))

    # -- the task's life ----------------------------------------------------------------------

    def _ended(self, task_id: int, future: TaskFuture,
               after: dict[int, Dependency] | None = None) -> None:
        """The future's observer, in the thread that resolved it: queue the outcome for the
        journal, which publishes it once committed."""
        outcome, status = outcome_and_status(future)
        if after is not None and outcome.outcome == O_ERROR:
            error = future.settled()[1]
            if isinstance(error, DependencyFailedError):
                outcome = dependency_outcome(task_id, error, after, outcome)
        if (outcome.outcome == O_RESULT and isinstance(outcome.data, bytes)
                and len(outcome.data) > self.journal.max_result_bytes):
            outcome = Outcome(O_ERROR, outcome.attempts, outcome.seconds, encode_service_error(
                SerializationError(
                    f"task {task_id} returned a result of {len(outcome.data):,} bytes, over "
                    f"this server's --max-result-bytes ({self.journal.max_result_bytes:,}): "
                    "it was discarded (the task ran). Return a smaller result (large data "
                    "belongs in a file, returned by path), or raise --max-result-bytes")))
        if self.stopping and self.journal.durable and (
                outcome.outcome == O_CANCELLED or abandoned(future)):
            with self._lock:
                self._live.pop(task_id, None)
                self.left_for_next_start += 1
            return  # left live in the journal for the next start (see the module docstring)
        last = future.latest_progress
        self.journal.finished(task_id, outcome.outcome, outcome.attempts, outcome.seconds,
                              outcome.data, _new(Grouped, (self._publish_all, (task_id, outcome))),
                              status, None if last is None else pickle.dumps(
                                  dataclasses.astuple(last), PROTOCOL))

    def _publish_all(self, ended: list[tuple[int, Outcome]]) -> None:
        """The journal's writer, once a batch's outcomes are committed (or failed to be):
        to each task's watchers; a task's only watcher (the common case) hears of it with the
        others of its sink in one call (``Sink.outcomes``)."""
        with self._lock:
            lives = [self._live.pop(task_id, None) for task_id, _ in ended]
        only: dict[Sink, list[tuple[int, Outcome]]] = {}
        for live, (_, outcome) in zip(lives, ended):
            if live is None:
                continue
            if live.more is None and live.sink is not None:
                group = only.get(live.sink)
                if group is None:
                    group = only[live.sink] = []
                group.append((live.req, outcome))
            else:
                for sink, req in live.watchers():
                    guarded(sink.outcome, req, outcome)
        for sink, outcomes in only.items():
            guarded(sink.outcomes, outcomes)

    def _policy(self, blob: bytes | None) -> tuple[Any, bytes | None]:
        return self._policy_of(None if blob is None else decode_builtins(blob))

    def _policy_of(self, wire_policy: WirePolicy | None) -> tuple[Any, bytes | None]:
        if wire_policy is None:
            return self._orchestrator.policy, None
        return decode_service_policy(wire_policy)

