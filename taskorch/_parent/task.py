"""Parent process: one accepted task (``WorkItem``) and the Future handed to the caller
(``TaskFuture``); ``resolve`` resolves the futures.

Life of a task (each accepted task ends in exactly one terminal state, and its future is
resolved then):

    queued --start ack--> running --> succeeded | failed
      |                      |  \\
      |                      |   crash or hard timeout, budget left: re-dispatched, still running
      |                      +--> abandoned   (stop's timeout expired while it ran)
      +--> cancelled          (future.cancel() before its start, or stop's timeout expired)
      +--> expired            (not started by its ``expires_at``: never runs, even as a
                               crash retry)

"queued" covers both the parent's backlog and a worker's prefetch (handed over, no start ack
yet): a task handed to a worker that dies before starting it goes back to the front of the
backlog with no attempt charged.

Which thread runs user code. The dispatcher threads resolve futures (``resolve``) and must
never run user code: one slow ``__setstate__`` or blocking done-callback there once held every
other task and made ``stop(timeout=0.5)`` return 5 s late with no future resolved (#11). So:

- a result (or a task's exception) is unpickled lazily, by the first thread that calls
  ``result()`` or ``exception()`` on its future (for ``asyncio.wrap_future``, the event loop's
  thread), once; the future is resolved (done) with the bytes still pickled;
- done-callbacks run on one thread, "taskorch-callbacks" (``callbacks``), in the order
  they were added; a callback added to a future already done runs at once in the thread that
  adds it, and the callbacks of a future cancelled by ``future.cancel()`` run in that caller's
  thread before it returns, both as in ``concurrent.futures``.

A finished task's ``WorkItem`` drops its payload (the pickled arguments), policy bytes and
worker references, and its future drops the cancel hook that led to the item: a finished
future holds its outcome and nothing else (#11: 200 held futures had kept 200 worker sentinel
fds open, 50 with 4 MiB arguments 200 MiB).
"""

from __future__ import annotations

import enum
import logging
import os
import threading
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Protocol

from taskorch._errors import OrchestratorBrokenError
from taskorch._parent.callbacks import call_each, run_or_queue
from taskorch._parent.condition import FutureCondition
from taskorch._parent.outcome import PICKLED_RESULT, PickledError, unpickled

if TYPE_CHECKING:
    from taskorch._policy import Policy
    from taskorch._stats import Progress

log = logging.getLogger("taskorch")

class TaskState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ABANDONED = "abandoned"
    EXPIRED = "expired"


_ENDED = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)


# What Future.__init__ sets, when it is exactly this (CPython 3.11-3.13): TaskFuture sets it
# itself, with its lighter condition, instead of making a Condition to throw away.
_FUTURE_FIELDS = {"_condition", "_state", "_result", "_exception", "_waiters", "_done_callbacks"}
_OWN_INIT = set(vars(Future())) == _FUTURE_FIELDS


class TaskFuture(Future[Any]):
    """The ``concurrent.futures.Future`` of one task, with what the worker reported.

    ``attempts`` (attempts started so far) and ``seconds`` (worker-side time of the last
    run, all its attempts included) are set before the future resolves. ``cancel()`` succeeds
    while the task is queued: waiting in the parent's backlog, or handed to a worker that has
    not started it (local workers: it is recalled, and cancel() waits for the worker's answer,
    at most ``intake.RECALL_WAIT``). Once started it returns False, as for
    ``concurrent.futures`` executors. (On a Dask cluster a call handed over is not recalled
    for a cancel: cancel() returns False for it.)

    Threads (see the module docstring): the future is done as soon as the outcome arrives,
    still pickled; the first ``result()`` or ``exception()`` call unpickles it, in its own
    thread, once (others wait for it, then share the object). A result that does not unpickle
    raises ``SerializationError`` from ``result()`` and is returned by ``exception()``; unlike
    a task's own exception it is only known then, so ``wait(return_when=FIRST_EXCEPTION)``
    counts it as a result. Done-callbacks run on the "taskorch-callbacks" thread, in order; one
    that raises is logged (logger "taskorch"), as ``concurrent.futures`` does; one that blocks
    delays the callbacks after it, never a task or ``stop()``.
    """

    # Future's own (CPython, not in typeshed): the callbacks added before it was done, a list
    # made by the first (most futures never get one, and each list is one more object for the
    # garbage collector to go through while the future is kept: see ``condition``).
    _done_callbacks: list[Callable[[Future[Any]], object]] | tuple[()]
    _condition: FutureCondition  # type: ignore[assignment]  # (Future's: a threading.Condition)
    _waiter_list: list[Any] | None = None  # (``_waiters``: made by the first wait())
    #: The backlog of the orchestrator that accepted it (set by its ``Intake``): what tells
    #: a future of this orchestrator from another's in ``options(after=...)``.
    owner: object = None

    def __init__(self) -> None:
        if _OWN_INIT:
            self._condition = FutureCondition()
            self._state = PENDING
            self._result = None
            self._exception = None
            self._done_callbacks = ()
        else:  # another Future.__init__: let it set what it sets, then swap the condition
            super().__init__()
            self._condition = FutureCondition()
        self.task_id = 0
        self.attempts = 0
        self.seconds: float | None = None
        self.latest_progress: Progress | None = None  # (the dispatcher sets, any thread reads)
        # Set by the orchestrator (takes a queued task out); dropped once done (leads to the item).
        self._cancel_hook: Callable[[TaskFuture], bool] | None = None
        # The worker's outcome, still pickled: ("result", pickle bytes) or ("error",
        # encode_exception() tuple). Set by the dispatcher before it resolves the future; read
        # and cleared by the first result()/exception(), which unpickles it (``_decode``).
        self._undecoded: tuple[str, Any] | None = None
        # Set while a thread unpickles the outcome (user code) out of `_condition`: others wait.
        self._decoding = False
        # Internal: called once, with this future, in the thread that resolves it, before
        # its done-callbacks are queued (taskorch serve's registry journals the outcome). Must
        # be quick and never block or raise: it runs on a dispatcher thread mostly (else a
        # canceller's, stop()'s, the server's recovery). Not for user code.
        self._observer: Callable[[TaskFuture], None] | None = None

    @property
    def _waiters(self) -> list[Any]:
        """Future's waiters of ``wait()`` / ``as_completed()`` (which append and remove
        theirs), made by the first: most futures' would stay empty (``_finish`` never makes it)."""
        waiters = self._waiter_list
        if waiters is None:
            waiters = self._waiter_list = []
        return waiters

    @_waiters.setter
    def _waiters(self, waiters: list[Any]) -> None:
        self._waiter_list = waiters

    def progress(self) -> Progress | None:
        """The latest ``taskorch.progress()`` the task reported while it ran, or None."""
        return self.latest_progress

    def cancel(self) -> bool:
        hook = self._cancel_hook
        _inline.callbacks = True  # cancelled here: the callbacks run here, as for any Future
        try:
            if hook is None or self.done():
                return super().cancel()
            return hook(self)
        finally:
            _inline.callbacks = False

    def add_done_callback(self, fn: Callable[[Future[Any]], object]) -> None:
        with self._condition:
            if self._state not in _ENDED:
                if self._done_callbacks:
                    self._done_callbacks.append(fn)
                else:
                    self._done_callbacks = [fn]
                return
        super().add_done_callback(fn)  # done: Future runs it now, in this thread

    # -- for the package: what its other modules may do to a future ---------------------------

    def set_canceller(self, hook: Callable[[TaskFuture], bool] | None) -> None:
        """What ``cancel()`` does while the future is not done (the orchestrator: take the
        task out of the backlog if it is still there; None: ``Future.cancel``)."""
        self._cancel_hook = hook

    def set_observer(self, observer: Callable[[TaskFuture], None] | None) -> None:
        """Call ``observer`` once, in the thread that resolves this future (see
        ``_observer``); None: no more."""
        self._observer = observer

    def mark_running(self) -> None:
        """Its first attempt started: RUNNING, unless the caller resolved it itself (as
        ``set_running_or_notify_cancel`` does for a pending future: no callbacks run)."""
        with self._condition:
            if self._state == PENDING:
                self._state = RUNNING

    def cancel_now(self) -> None:
        """Cancel for real (the orchestrator decided) and wake wait()/as_completed() callers."""
        self._cancel_hook = None
        with self._condition:  # (a running attempt killed for a cancel: made pending first)
            self._state = PENDING if self._state == "RUNNING" else self._state
        Future.cancel(self)
        self.set_running_or_notify_cancel()

    def fail_in_forked_child(self, error: BaseException) -> None:
        """In a forked child, at the fork: this future's task belongs to the parent. Fail it
        here, so that nothing here waits for it forever. Its locks may have been copied held,
        and its waiters (``wait()``, ``as_completed()``) are threads of the parent: new locks,
        no waiters (one thread runs in the child now)."""
        self._condition = FutureCondition()
        self._decoding = False
        self._waiter_list = None
        self._cancel_hook = None
        self._observer = None
        self._undecoded = None
        if not self.done():
            self.set_exception(error)

    # -- the outcome, unpickled by the first thread that asks ------------------------------

    def result(self, timeout: float | None = None) -> Any:
        self._wait_decoded(timeout)
        exception = self._exception  # (final: see _wait_decoded)
        if exception is None:
            return self._result
        try:
            raise exception
        finally:
            exception = self = None  # type: ignore[assignment]  # (no cycle through the frame)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._wait_decoded(timeout)
        return self._exception

    def _wait_decoded(self, timeout: float | None) -> None:
        """Wait until done (CancelledError, TimeoutError as Future does), then make sure the
        outcome is unpickled. `_undecoded` is set before the future is published as done, and
        cleared only after the decoded outcome is stored under `_condition`: a reader that
        sees it None finds the final outcome (done, it never changes again). FINISHED is
        final too: seen without the lock, it spares Future's wait a hold of it."""
        if self._state != FINISHED:
            super().exception(timeout)
        if self._undecoded is not None:
            self._decode()

    def settled(self) -> tuple[bool, BaseException | None, Any]:
        """A done future's end as it was set: (cancelled, exception, result), with one hold of
        the lock and no unpickling (for its observer: a raw future's result is a RawOutcome)."""
        with self._condition:
            return (self._state in (CANCELLED, CANCELLED_AND_NOTIFIED), self._exception,
                    self._result)

    def set_undecoded(self, kind: str, data: Any) -> None:
        """Resolve with the worker's outcome still pickled (dispatcher thread: no user code
        runs, done-callbacks are queued for the callback thread)."""
        if kind == "result":
            self._finish(PICKLED_RESULT, None, (kind, data))
        else:
            self._finish(None, PickledError("the task's exception is not unpickled yet"),
                         (kind, data), failed=True)

    def set_result(self, result: Any) -> None:  # (a raw task's outcome: ``resolve``)
        self._finish(result, None, None)

    def set_exception(self, exception: BaseException | None) -> None:
        self._finish(None, exception, None, failed=True)  # (None too, as Future's does)

    def _finish(self, result: Any, exception: BaseException | None,
                undecoded: tuple[str, Any] | None, failed: bool = False) -> None:
        """Future.set_result / set_exception (CPython 3.11-3.13's) but for reading
        ``_waiter_list``, not to make it (see ``_waiters``)."""
        with self._condition:
            if self._state in _ENDED:  # (resolved by its caller, say: theirs stands)
                raise InvalidStateError(f"{self._state}: {self!r}")
            self._undecoded = undecoded  # (before FINISHED: see _wait_decoded)
            self._result, self._exception, self._state = result, exception, FINISHED
            for waiter in self._waiter_list or ():
                if failed:
                    waiter.add_exception(self)
                else:
                    waiter.add_result(self)
            if self._condition.sleepers:  # (else no call: _finish runs once per task)
                self._condition.notify_all()
        if self._observer is not None or self._done_callbacks:
            self._invoke_callbacks()

    def _decode(self) -> None:
        """Unpickle the outcome (the caller's thread; user code), once: the first caller claims
        it, the others wait (a claim given up by an exception, Ctrl-C most likely, passes on)."""
        outcome, claimed = None, False
        try:  # (the claim, too: a signal may raise as the block below is left)
            with self._condition:
                while self._decoding:
                    self._condition.wait()
                pending = self._undecoded
                if pending is None:
                    return  # another thread did it while we waited
                kind, data = pending  # (set only with its stand-in outcome: ``_finish``)
                claimed = self._decoding = True  # (claimed first: see the finally)
            outcome = unpickled(kind, data)
        finally:
            if claimed:
                with self._condition:  # the outcome stored and the claim let go at once
                    if outcome is not None:
                        self._result, self._exception = outcome
                        self._undecoded = None
                    self._decoding = False
                    self._condition.notify_all()

    def __repr__(self) -> str:
        pending = self._undecoded  # never unpickle here: repr runs in logs, on any thread
        if pending is not None:
            what = "result" if pending[0] == "result" else "exception"
            return (
                f"<{type(self).__name__} at {id(self):#x} state=finished "
                f"({what} not unpickled yet)>"
            )
        return super().__repr__()

    # -- done-callbacks, on the callback thread --------------------------------------------

    def _invoke_callbacks(self) -> None:
        """Called by Future when the future becomes done, in the thread that resolved it."""
        observer = self._observer
        if observer is not None:
            self._observer = None
            try:
                observer(self)
            except BaseException:  # noqa: BLE001 - a bug there must not end the resolver
                log.exception("the internal observer of %r failed", self)
        callbacks = self._done_callbacks
        if not callbacks:
            return
        self._done_callbacks = ()  # done: nothing is added any more; let them go once run
        (call_each if getattr(_inline, "callbacks", False) else run_or_queue)(  # (run_or_queue:
            self, callbacks)  # taskorch's ``InlineCallback``s run there)


# cancel() sets `callbacks` for the duration of the call: the callbacks of the future it
# cancels run in its thread, as with any concurrent.futures.Future.
_inline = threading.local()


class RawOutcome(NamedTuple):
    """A raw task's result: the worker's outcome, still pickled, for a process that forwards
    it (``taskorch serve``) and must not unpickle user objects itself. ``ok``: ``data`` is the
    pickled return value; else ``data`` is ``_wire.encode_exception()``'s tuple."""

    ok: bool
    data: Any


class TaskListener:
    """A listener to the moments of tasks' lives; each method does nothing unless overridden.

    The dispatcher core and the backlog announce each moment once, where it happens, with the
    backlog lock held: ``accepted`` (a producer's thread, in ``Backlog``), ``started``,
    ``retrying``, ``finished``, ``crashed`` (the dispatcher thread, from the core's rules) and
    ``cancelled`` (whichever thread cancels it, in ``Backlog.finish_locked``). Listeners are
    the orchestrator's (``Backlog.listeners``: the metrics' ``figures.Figures``), which hear
    every moment, or one task's own (``WorkItem.listener``: ``taskorch serve``'s journal
    tracking, ``_service/server/registry``), which hears only ``started`` and ``cancelled``
    (its outcome reaches it through the future's observer, once resolved).
    A listener records, or queues something for another thread: no I/O, no lock that may be
    held while the backlog's is taken, never user code; it must not raise.
    """

    __slots__ = ()

    def accepted(self, item: WorkItem) -> None:
        """``item`` was accepted into the backlog (its task id is set)."""

    def started(self, item: WorkItem, now: float) -> None:
        """An attempt of ``item`` started (``item.attempts`` counts it); ``item.state`` is
        still QUEUED for its first (``now``: ``time.monotonic()``)."""

    def retrying(self, item: WorkItem, attempt: int, summary: str, delay: float) -> None:
        """Attempt ``attempt`` failed inside the worker, which retries after ``delay`` s."""

    def finished(self, item: WorkItem, seconds: float, error: Any) -> None:
        """An outcome came: ``error`` is the Failed event's ``error`` (``_wire``), or
        None for a success; ``seconds`` its attempts' run time in the worker."""

    def crashed(self, item: WorkItem, error: BaseException, ended: bool) -> None:
        """An attempt was lost with its worker (or could not run): ``ended``, the task fails
        with ``error``; else it is retried after the policy's backoff."""

    def cancelled(self, item: WorkItem) -> None:
        """``item`` ended cancelled before it started."""


class Holder(Protocol):
    """What a ``WorkItem`` needs of the worker holding its call (``process.WorkerProcess``)."""

    def send_recall(self) -> None:
        """Ask the worker for the calls it has not started back."""


class WorkItem:
    """The parent's record of an accepted task. Fields are guarded by the backlog's lock,
    except ``started_on``, ``attempts`` and ``attempt_started`` (dispatcher thread only).
    Once its future is resolved, ``release()`` drops what only a live task needs."""

    __slots__ = ("task_id", "future", "payload", "policy", "policy_bytes", "raw", "state",
                 "worker", "started_on", "attempts", "attempt_started", "accepted_at",
                 "cancel_request", "name", "listener", "priority", "not_before",
                 "expires_at", "key", "after", "waiting_for", "limit", "__weakref__")

    def __init__(
        self, task_id: int, future: TaskFuture, payload: bytes, policy: Policy,
        policy_bytes: bytes | None, raw: bool = False,
    ) -> None:
        self.task_id = task_id
        self.future = future
        self.payload = payload
        self.policy = policy
        self.policy_bytes = policy_bytes  # None: the workers' default policy
        # Raw: the future gets the worker's pickled outcome, undecoded (see RawOutcome).
        self.raw = raw
        self.state = TaskState.QUEUED
        self.worker: Holder | None = None  # set while handed over to a worker
        self.started_on: Holder | None = None  # the worker running its current attempt
        self.attempts = 0  # attempts started (and so charged) so far
        self.attempt_started = 0.0  # time.monotonic() of the current attempt's start ack
        self.accepted_at = 0.0  # time.monotonic() of its acceptance (status, queue wait)
        # Set while a caller waits to cancel it, handed over and not started (backlog lock).
        self.cancel_request: CancelRequest | None = None
        self.name = ""  # its label, set only while metrics are on (``figures``)
        # This task's own listener (``TaskListener``; taskorch serve journals its starts: a restart
        # charges what was spent), besides the orchestrator's. None: nobody asked.
        self.listener: TaskListener | None = None
        # Its place in the backlog (``order``): higher first, and not before this
        # ``Clock.monotonic()`` value (None: at once).
        self.priority = 0
        self.not_before: float | None = None
        # Not started by this ``Clock.monotonic()`` value, it ends expired (None: never).
        self.expires_at: float | None = None
        self.key: str | None = None  # ``options(key=)``: one unfinished task per key (backlog)
        # ``options(after=)``: the futures of the tasks it runs after (``waits``); None: none.
        self.after: tuple[TaskFuture, ...] | None = None
        # Why it waits in the backlog beyond its place in order (``waits.DEPENDENCY`` or
        # ``waits.LIMIT``; a ``not_before`` is read from it): see ``Backlog.waiting_for_locked``.
        self.waiting_for: str | None = None
        # The per-name limit whose slot it holds while handed over or running (``limits``).
        self.limit: Any = None

    def release(self) -> None:
        """The task is over and its future resolved (dispatcher thread, after the dispatcher
        is done with the item): drop the pickled call, the policy bytes and the worker
        handles (a worker's process object holds its sentinel fd), and the future's cancel
        hook, the only way from the future back to this item. The future the caller holds
        then keeps its outcome alone."""
        self.payload = b""
        self.policy_bytes = None
        self.worker = self.started_on = None
        self.listener = None
        self.after = None
        self.future.set_canceller(None)

    def __repr__(self) -> str:
        return f"<WorkItem {self.task_id} {self.state.value} attempts={self.attempts}>"


class CancelRequest:
    """``cancel()`` of calls handed to a worker and not started: the dispatcher recalls them,
    and answers each (under the backlog lock) when the worker's answer tells: granted if the
    call came back unstarted (it ends cancelled, and the caller cancels its future), refused
    if it started first. The caller waits on ``done``; one that stops waiting withdraws what
    is unanswered, under the same lock, so every call is answered at most once."""

    def __init__(self, items: list[WorkItem]) -> None:
        self.unanswered = len(items)
        self.granted: list[WorkItem] = []
        self.done = threading.Event()
        for item in items:
            item.cancel_request = self

    def answer_locked(self, item: WorkItem, granted: bool) -> None:
        item.cancel_request = None
        if granted:
            self.granted.append(item)
        self.unanswered -= 1
        if self.unanswered == 0:
            self.done.set()


def fail_in_forked_child(items: list[WorkItem], parent: int) -> None:
    """In a forked child: the futures of tasks that ``parent`` submitted fail at once (a wait
    on them would never end here)."""
    child = os.getpid()
    for item in items:
        item.future.fail_in_forked_child(OrchestratorBrokenError(
            f"task {item.task_id} was submitted in process {parent}, and this process "
            f"({child}) was forked from it: the task belongs to that process, runs there, "
            "and only there is its outcome known"))
