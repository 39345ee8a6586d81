"""Parent process, the dispatcher thread: what the dispatcher core asks of a worker pool, and the
typed events a pool hands back.

The core (``dispatch.DispatcherCore``) owns a task's life; a pool (``local.LocalPool``: worker
processes on this machine; ``dask.DaskPool``: a Dask cluster) owns how calls reach workers and
what comes back. A call crosses once each way: out through ``hand_over`` (the pool pulls what
it has room for with ``take``), back as a ``PoolEvent`` from ``wait`` (or from the other
methods that return events). The core applies each batch of events under the backlog lock in
one pass, where the rules are written once (requeue uncharged, charge a crash, the breaker,
stop). A pool never takes the backlog lock and never resolves a future.

Every method runs on the dispatcher thread, except those marked "any thread".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator, NamedTuple, Protocol, Union

if TYPE_CHECKING:
    from taskorch._parent.figures import WorkerView
    from taskorch._parent.task import WorkItem
    from taskorch._parent.terminate import TerminateRequest
    from taskorch._wire import Outcome


class AttemptStarted(NamedTuple):
    """Attempt ``attempt`` of ``item`` began on a worker (the first one frees its slot)."""

    item: WorkItem
    attempt: int


class AttemptRetrying(NamedTuple):
    """Attempt ``attempt`` failed inside the worker, which retries after ``delay`` seconds."""

    item: WorkItem
    attempt: int
    summary: str
    delay: float
    timed_out: bool


class TaskFinished(NamedTuple):
    """The task's outcome: a Succeeded or Failed event (``_wire``)."""

    item: WorkItem
    outcome: Outcome


class CallsReturned(NamedTuple):
    """Calls handed over that never started, in hand-over order: back to the front of the
    backlog, uncharged (or cancelled, if a caller waits to cancel one)."""

    items: list[WorkItem]


class AttemptLost(NamedTuple):
    """The attempt of ``item`` that started was lost with its worker (a death, a hard timeout):
    charged. ``note`` begins the warning the core logs, which it ends with what became of the
    task ("retrying in 0.1 s", "task failed")."""

    item: WorkItem
    error: BaseException
    note: str


class AttemptLostUncharged(NamedTuple):
    """The attempt of ``item`` that started was stopped through no fault of its own (taskorch
    restarted its Dask worker to kill another task's attempt): run again, not charged.
    ``note`` begins the warning the core logs."""

    item: WorkItem
    note: str


class CannotRun(NamedTuple):
    """``item`` fails with ``error`` without a retry: the pool could not run it."""

    item: WorkItem
    error: BaseException


class WorkersChanged(NamedTuple):
    """The pool has ``workers`` workers now (``stats().workers``)."""

    workers: int


class WorkersRestarted(NamedTuple):
    """``started`` workers started to replace others; ``cause`` (for metrics), if known."""

    started: int
    cause: str | None


class PoolBroken(NamedTuple):
    """No task can run any more (``reason``): the core settles everything."""

    reason: str


PoolEvent = Union[AttemptStarted, AttemptRetrying, TaskFinished, CallsReturned, AttemptLost,
                  AttemptLostUncharged, CannotRun, WorkersChanged, WorkersRestarted, PoolBroken]


class Take(Protocol):
    def __call__(self, limit: int, budget: int | None = None, first_may_exceed: bool = True,
                 plain_after: int | None = None) -> list[WorkItem]:
        """Up to ``limit`` calls from the front of the backlog, as the circuit breaker allows;
        with a ``budget`` (payload bytes), a call that would cross it is left for later unless
        it is the first and ``first_may_exceed``; the calls from position ``plain_after`` on
        are prefetched (``order``: then none while priorities mix, none with an expiry).
        Takes the backlog lock briefly."""


class WorkerPool(Protocol):
    #: The dispatcher thread's name (a stack dump then reads like a diagram).
    thread_name: str
    #: Can ``recall`` take back a call handed over and not started (for a cancel)?
    recalls_for_cancel: bool
    #: Can ``terminate`` kill a running attempt (``terminate``; on Dask, with the others of
    #: its worker process)?
    terminates: bool

    def terminate(self, request: TerminateRequest) -> None:
        """Kill the worker running ``request.item``'s attempt, if it still does: its loss
        comes back as ``AttemptLost`` with ``terminate.Terminated``. Answer ``request``, now
        or later: False if that worker cannot be killed (dispatcher thread)."""

    @property
    def pids(self) -> tuple[int, ...]:
        """Worker processes on this machine (swapped whole; any thread)."""

    def wake(self) -> None:
        """Make ``wait`` return soon (new tasks, or stop() was called). Any thread."""

    def effective_worker_count(self) -> int:
        """How many tasks may run at once now. Any thread."""

    def worker_views(self) -> list[WorkerView]:
        """The workers now, for the dashboard (any thread, no lock: a snapshot that may be a
        moment stale)."""

    def open(self) -> list[PoolEvent]:
        """Start the workers or connect; raise if nothing can run."""

    def describe_start_failure(self, exc: BaseException) -> str:
        """Why ``open`` failed, for OrchestratorBrokenError."""

    def wait(self, timeout: float | None) -> list[PoolEvent]:
        """Block until something comes back, a wakeup, or ``timeout``; what came."""

    def hand_over(self, now: float, waiting: int, take: Take,
                  finishing: bool) -> list[PoolEvent]:
        """Take calls for the workers with room (``waiting`` wait in the backlog) and send
        them. ``finishing``: stop() was called and nothing waits in the backlog or backs off
        (no replacement worker is needed unless calls are still out)."""

    def has_room(self, now: float) -> bool:
        """Could a worker take another call now?"""

    def has_inflight(self) -> bool:
        """Are calls handed over and not finished?"""

    def recall_unstarted(self, now: float) -> float | None:
        """Nothing waits in the backlog: take back calls a busy worker holds unstarted while
        another idles (they come back as ``CallsReturned``). When to look again (None: no need)."""

    def recall_prefetched(self) -> None:
        """Tasks of another priority wait in the backlog: take back the calls that busy
        workers hold and have not started (they come back ``CallsReturned``), so that none
        runs before a task that outranks it. A pool that cannot does nothing."""

    def recall(self, items: list[WorkItem]) -> list[WorkItem]:
        """Take back ``items`` (handed over, not started when asked) for a cancel: each comes
        back as ``CallsReturned`` if it had not started. Returns those it cannot recall. Only
        called if ``recalls_for_cancel``."""

    def deadlines(self) -> Iterable[float | None]:
        """The pool's own timers (hard timeouts, respawns, probes)."""

    def fire_timers(self, now: float) -> list[PoolEvent]:
        """Act on the pool's timers that are due. A timer may only mark work for the next
        ``hand_over`` (the local pool's respawn does): the core calls ``hand_over`` in the same
        round unless the orchestrator is broken."""

    def stop_all(self) -> tuple[list[PoolEvent], list[tuple[WorkItem, str]]]:
        """Settling: stop everything now. What came back before (it still counts), and every
        call handed over, each with what stop() did to it if it runs."""

    def shut_down(self, deadline: float | None) -> Iterator[list[PoolEvent]]:
        """Everything ran (or nothing can): let the workers go, by ``deadline`` (a
        ``time.monotonic()`` value) if one was set; yields what comes back meanwhile."""

    def close(self) -> list[PoolEvent]:
        """The thread ends: release what the pool holds (workers, channels, a client)."""

    def forget_in_forked_child(self) -> None:
        """In a forked child: close this process's copies of the parent's channels (never send
        on them, never shut a shared socket down)."""
