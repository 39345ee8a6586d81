"""``taskorch serve``'s outcomes (server process): a task's end as ``S_DONE`` carries it
(``Outcome``, from the task's future: ``outcome_and_status``), and the other way round, the futures
that a served task's dependencies (``options(after=)``) are to the backlog (``Dependency``).

The backlog's ``waits`` wait for futures; a served task waits for tasks known by their
journal ids. For each of them the registry makes a ``Dependency``: a ``Sink`` that watches
that task like any client, and so hears of its outcome once it is committed (a dependant never
starts before its dependency's success is durable: after a kill -9 the journal never shows a
dependant that ran after a dependency that will run again), and resolves its future from it:
a success with None, a task's own exception as a ``RawOutcome`` (the server never unpickles
a user object; ``waits.fail_dependant`` reads its type and message), a taskorch error as
itself, a cancel as a cancel. The waits' rules then apply unchanged: a dependency that did not
succeed fails its dependant with ``DependencyFailedError``.

That dependant's outcome for its clients (``dependency_outcome``): O_DEPENDENCY, the
``DependencyFailedError`` with the journal's ids, and as its cause the dependency's own
outcome, which the client decodes as that dependency's future would (its exception itself,
unpickled there, with its remote traceback). Down a chain they nest: at most MAX_CHAIN deep,
past which the innermost is its error without its cause (the outcome stays small).

Threads: a ``Dependency`` is resolved by whoever publishes its task's outcome (the journal's
writer, after the commit) or, for one that had ended, by the registry's caller (the writer
again, or the main thread at recovery). A success releases the dependant right there, in that
thread (the intake's ``InlineCallback``: ``waits``'s docstring): hazard, the journal's writer
then takes the backlog's lock, so no holder of that lock may wait for the journal's writer.
A failure's done-callbacks run on "taskorch-callbacks" (they unpickle the error).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

from taskorch._errors import DependencyFailedError, TaskAbandonedError
from taskorch._parent.task import RawOutcome, TaskFuture
from taskorch._service.protocol import (
    O_CANCELLED,
    O_DEPENDENCY,
    O_ERROR,
    O_RAISED,
    O_RESULT,
)
from taskorch._service.server.callbacks import OneByOne
from taskorch._service.server.records import status_of
from taskorch._service.values import decode_service_error, encode_service_error

#: The deepest chain of causes an O_DEPENDENCY outcome carries (its size grows with each).
MAX_CHAIN = 8

#: What a dependant keeps of its dependency's outcome: a failure's data is its cause
#: (``dependency_outcome``); a success's result is never read, so it is dropped, in memory
#: (``as_cause``: a fan-in over large results holds none of them while it waits) and when a
#: dependency's row is read (this SQL, ``submissions.dependency_rows``). One rule, two spellings.
CAUSE_DATA_SQL = f"CASE WHEN outcome = {O_RESULT} THEN NULL ELSE data END"


class Outcome(NamedTuple):
    """A task's end as ``S_DONE`` carries it (see ``protocol``)."""

    outcome: int
    attempts: int
    seconds: float | None
    data: Any


class Sink(Protocol):
    """Who hears about a task from the registry (a connection): each call names the request
    it answers. Called by the journal's writer (``admitted``, ``outcome``, and their batches)
    or the caller of ``watch`` and ``find``; must not block."""

    def admitted(self, req: int, admission: int | BaseException, joined: bool = False) -> None:
        """Committed and enqueued as task ``admission``, or refused with that error.
        ``joined``: task ``admission`` is another submission's, which this one joined by its
        key (``submissions``): a withdraw of ``req`` then only stops watching it."""

    def outcome(self, req: int, outcome: Outcome) -> None:
        """The task ended (its outcome is committed)."""

    def admitted_all(self, accepted: list[tuple[int, int]]) -> None:
        """``admitted(req, task_id)`` for each (req, task_id), in order: the submissions of one
        journal batch that made their own tasks (the writer's; one call, not one per task)."""

    def outcomes(self, ended: list[tuple[int, Outcome]]) -> None:
        """``outcome(req, outcome)`` for each (req, outcome), in order (as ``admitted_all``)."""

    def wanted(self, req: int) -> bool:
        """At the commit, before the enqueue: False if ``req`` was withdrawn meanwhile (its
        record is forgotten, or its join of another's task dropped, and nothing is enqueued;
        ``admitted`` is not called)."""

    def rejected(self, req: int, error: BaseException) -> None:
        """A ``watch`` that cannot be answered with an outcome (unknown id, not ended)."""


def outcome_and_status(future: TaskFuture) -> tuple[Outcome, str]:
    """A served task's outcome from its (raw) future, done, and the task's ``TaskInfo`` state
    (``records``), from one read of the future (the dispatcher's path, once per task)."""
    attempts, seconds = future.attempts, future.seconds
    cancelled, exc, raw = future.settled()
    if cancelled:
        return Outcome(O_CANCELLED, attempts, seconds, None), "cancelled"
    if exc is not None:
        return (Outcome(O_ERROR, attempts, seconds, encode_service_error(exc)),
                status_of(exc))
    assert isinstance(raw, RawOutcome)
    if raw.ok:
        return Outcome(O_RESULT, attempts, seconds, raw.data), "succeeded"
    return Outcome(O_RAISED, attempts, seconds, raw.data), "failed"


def as_cause(outcome: Outcome) -> Outcome:
    """``outcome`` as a dependant keeps it (see CAUSE_DATA_SQL)."""
    if outcome.outcome != O_RESULT:
        return outcome
    return Outcome(O_RESULT, outcome.attempts, outcome.seconds, None)


def abandoned(future: TaskFuture) -> bool:
    cancelled, exc, _ = future.settled()
    return not cancelled and isinstance(exc, TaskAbandonedError)


class Dependency(OneByOne):
    """One dependency of a served task: a ``registry.Sink`` for that task's outcome, and the
    future the backlog waits for (its ``task_id``: the dependency's journal id)."""

    __slots__ = ("future", "ended")

    def __init__(self, task_id: int) -> None:
        self.future = TaskFuture()
        self.future.task_id = task_id
        self.ended: Outcome | None = None  # its outcome, once it has one (the dependant's cause)

    def rejected(self, req: int, error: BaseException) -> None:
        """Its task cannot be found (a record gone): it counts as failed with ``error``."""
        self.outcome(req, Outcome(O_ERROR, 0, None, encode_service_error(error)))

    def outcome(self, req: int, outcome: Outcome) -> None:
        future = self.future
        if future.done():
            return
        self.ended = as_cause(outcome)
        code, data = outcome.outcome, outcome.data
        if code == O_RESULT:
            future.set_result(None)
        elif code == O_RAISED:
            future.set_result(RawOutcome(False, data))
        elif code == O_CANCELLED:
            future.cancel_now()
        else:  # O_ERROR, O_DEPENDENCY: taskorch's own errors, which the server made
            future.set_exception(decode_service_error(data[0] if code == O_DEPENDENCY
                                                      else data))


def dependency_outcome(task_id: int, error: DependencyFailedError,
                       dependencies: dict[int, Dependency], outcome: Outcome) -> Outcome:
    """The O_DEPENDENCY outcome of task ``task_id`` (journal id), which ``error`` (from the
    backlog: its ``task_id`` is the backlog's) ended, with its dependency's outcome as cause."""
    rebuilt = DependencyFailedError(task_id, error.dependency, error.what)
    dependency = dependencies.get(error.dependency)
    cause = None if dependency is None else dependency.ended
    if cause is None:
        return Outcome(O_ERROR, outcome.attempts, outcome.seconds,
                       encode_service_error(rebuilt))
    code, data = cause.outcome, cause.data
    if code == O_DEPENDENCY and _depth(data) >= MAX_CHAIN:
        code, data = O_ERROR, data[0]
    return Outcome(O_DEPENDENCY, outcome.attempts, outcome.seconds,
                   (encode_service_error(rebuilt), code, data))


def _depth(data: Any) -> int:
    """How many DependencyFailedErrors an O_DEPENDENCY's data nests (itself included)."""
    depth = 1
    while isinstance(data, tuple) and len(data) == 3 and data[1] == O_DEPENDENCY:
        depth, data = depth + 1, data[2]
    return depth
