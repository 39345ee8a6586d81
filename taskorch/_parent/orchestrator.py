"""Parent process, the caller's threads: the ``TaskOrchestrator`` facade.

Everything here runs in the application's threads (or event loops) and does little: validate,
pickle the call (so a bad task fails in the caller), and offer it to the ``Backlog``. The
dispatcher thread (``_parent.dispatch`` and its pool) does the rest.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from taskorch._errors import OrchestratorClosedError
from taskorch._options import Duration, Limit, Moment, check_limits, timing_of
from taskorch._parent.backend import Backend, Dispatcher, LocalBackend, NothingRan, PoolConfig
from taskorch._parent.backlog import Backlog
from taskorch._parent.intake import Intake, PolicyOverride
from taskorch._parent.task import TaskFuture, fail_in_forked_child
from taskorch._policy import CircuitBreaker, Features, Policy, check_int, check_number
from taskorch._stats import Stats, StopReport

if TYPE_CHECKING:
    from datetime import datetime

    from taskorch._parent.scheduler import (
        ScheduledTask,
        Scheduler,
        ScheduleStatus,
        StateStore,
    )

log = logging.getLogger("taskorch")

#: stop() waits this much longer than its timeout for the dispatcher before giving up on it
#: (it only matters if the dispatcher itself is stuck, which would be a bug).
_STOP_SLACK = 5.0
#: How long the interpreter-exit hook lets an orchestrator that was never stopped drain.
EXIT_TIMEOUT = 30.0


class TaskOrchestrator:
    """Runs callables in worker processes, with a bounded backlog and a resilience policy.

    ``worker_count`` (default 2) worker processes start on first use (``run``, ``run_async``,
    ``map``, ``schedule``) or ``start()``, never in the constructor (loky's fork+exec). With
    ``backend=taskorch.dask.DaskBackend(address)`` the tasks run on a Dask cluster instead
    (connected in the constructor), with the same backlog, policy and stop semantics. At most
    ``max_backlog`` tasks wait to start; ``run()`` never waits for room, ``run_async()``
    does. ``policy`` (default ``Policy.default()``) applies to every task, unless overridden
    per task with ``with_policy()``.

    Fault tolerance: ``kill_grace`` (default 1 s) is how long past its per-attempt timeout a
    task that does not respond to the in-process interrupt may run before its worker is
    terminated (SIGTERM, then SIGKILL 0.5 s later). ``max_tasks_per_worker`` and
    ``max_memory_per_worker`` (MiB of resident memory, checked after each task) recycle a
    worker after the task that crossed the line; its replacement starts at once.
    ``circuit_breaker`` (a ``CircuitBreaker``) stops tasks from starting while the work keeps
    failing. ``limits`` (task name to ``Limit``: the name is the function's module and qualified
    name) caps how many tasks of a name run at once and how often one starts.

    Stop it with ``stop()``, ``with``, or ``async with``. One that is never stopped is stopped
    at interpreter exit (drained for up to ``EXIT_TIMEOUT`` seconds), and if it is garbage
    collected first, its intake closes and it drains in the background.
    """

    def __init__(
        self,
        worker_count: int | None = None,
        max_backlog: int = 128,
        features: Features = Features.NONE,
        policy: Policy | None = None,
        *,
        kill_grace: float | None = None,
        max_tasks_per_worker: int | None = None,
        max_memory_per_worker: float | None = None,
        circuit_breaker: CircuitBreaker | None = None,
        backend: Backend | None = None,
        limits: dict[str, Limit] | None = None,
    ) -> None:
        check_int("max_backlog", max_backlog, minimum=1)
        if not isinstance(features, Features):
            raise ValueError(f"features must be a taskorch.Features flag, got {features!r}")
        self._config = config = PoolConfig.checked(
            worker_count=worker_count, policy=policy, kill_grace=kill_grace,
            max_tasks_per_worker=max_tasks_per_worker,
            max_memory_per_worker=max_memory_per_worker, circuit_breaker=circuit_breaker)
        self._limits = check_limits(limits)
        self._max_backlog = max_backlog
        self._features = features
        self._drop_when_full = Features.ALLOW_SYNC_TASK_DROP in features
        self._policy = config.policy
        backend = LocalBackend() if backend is None else backend
        if not callable(getattr(backend, "create_dispatcher", None)):
            raise ValueError(
                f"backend must be a taskorch backend (e.g. DaskBackend), got {backend!r}")
        self._backend = backend
        # Fork (see _after_fork_in_child): the process this orchestrator's workers belong to,
        # and its fork generation; a forked child starts afresh under `_fork_lock`.
        self._pid = os.getpid()
        self._generation = _fork_generation
        self._fork_lock = threading.Lock()
        self._start()
        if not getattr(backend, "starts_lazily", True):
            self.start()  # (DaskBackend: checks the cluster and the options at once)
        _live.add(self)

    def _start(self, *, idle: bool = False) -> None:
        """Make the backlog, and a dispatcher that is not started yet (``_launch`` starts
        it). ``idle``: stopped in a forked child before any use there: nothing ever starts."""
        # The fork generation in which the dispatcher was started (-1: not started in this
        # process): run()'s hot path compares it with _fork_generation, one global read.
        self._launched = -1
        self._backlog = Backlog(self._max_backlog, limits=self._limits)
        self._intake = Intake(self._backlog, self._policy, self._drop_when_full)
        # Schedules are this process's own: a forked child starts with none.
        self._schedule_lock = threading.Lock()
        self._scheduler: Scheduler | None = None  # made by the first schedule()
        self._schedule_store: StateStore | None = None  # None: in memory
        self._schedules_closed = False  # stop() began: no new scheduler
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._dispatcher: Dispatcher = NothingRan(
            started=idle, worker_count=self._config.worker_count or 2)
        if idle:
            self._backlog.close(time.monotonic())
            self._launched = _fork_generation

    def start(self) -> None:
        """Start the workers now. Optional: the first ``run``, ``run_async``, ``map`` or
        ``schedule`` does it (so a module-level orchestrator costs nothing in a process that
        never submits, such as a gunicorn master or taskorch's own workers). Idempotent;
        raises ``OrchestratorBrokenError`` if no worker can start."""
        if self._launched != _fork_generation:
            self._launch()

    def _launch(self, *, nothing: bool = False) -> None:
        """Start the dispatcher (its thread opens the pool), once per process; ``nothing``
        (stop() before any use), or after a stop: nothing ever starts."""
        self._here()
        with self._fork_lock:
            if self._launched == _fork_generation:
                return  # another thread did it, or stop() came first
            if nothing or self._backlog.closed:
                self._backlog.close(time.monotonic())  # the intake raises OrchestratorClosed
                self._dispatcher, self._launched = NothingRan(started=True), _fork_generation
                return
            dispatcher = self._backend.create_dispatcher(self._backlog, self._config)
            # Not a bound method of self: the finalizer below must not keep self alive.
            self._backlog.connect(dispatcher.wake, dispatcher.recalls_for_cancel)
            self._dispatcher, self._launched = dispatcher, _fork_generation
            _running[dispatcher] = self._backlog
            # Garbage-collected without stop(): close intake and let the dispatcher drain.
            self._finalizer = weakref.finalize(
                self, _close_intake, self._backlog, dispatcher, EXIT_TIMEOUT)
            dispatcher.start()  # (a failure marks the backlog broken: later runs raise too)

    def _here(self) -> None:
        """Every entry point calls this first: a forked child that inherited this orchestrator
        starts its own workers on first use (one global read when nothing forked)."""
        if self._generation != _fork_generation:
            self._start_in_this_process()

    def _start_in_this_process(self, *, idle: bool = False) -> None:
        with self._fork_lock:
            if self._generation == _fork_generation:
                return  # another thread of this child did it
            parent, self._pid = self._pid, os.getpid()
            log.info(
                "a TaskOrchestrator made in process %d is used in process %d, forked from it: "
                "%s; the parent's tasks stay with the parent", parent, self._pid,
                "stopped before any use here, nothing started" if idle
                else "starting its own workers here",
            )
            self._start(idle=idle)
            self._generation = _fork_generation

    def _left_behind_in_child(self) -> None:
        """In a forked child, at the fork (one thread; the parent's threads are gone): give up
        the parent's state without touching the parent. Its locks may have been copied held;
        its fds (worker channels, wake pipe) are the parent's: closed here, never written.
        Futures of the parent's tasks fail here at once (a wait on them would never end);
        the parent's objects, in the parent, are untouched."""
        self._fork_lock = threading.Lock()
        if self._finalizer is not None:
            self._finalizer.detach()  # it would wake the parent's dispatcher through its pipe
            self._finalizer = None
        items = self._backlog.forget_in_forked_child()
        forget = getattr(self._dispatcher, "forget_in_forked_child", None)
        if forget is not None:
            items += forget()
        fail_in_forked_child(items, self._pid)

    # -- properties ------------------------------------------------------------------------

    @property
    def worker_count(self) -> int:
        """How many tasks run at once: the worker processes (local), or the in-flight bound
        on a cluster (which follows the cluster's threads unless worker_count was given)."""
        self._here()
        return self._dispatcher.effective_worker_count()

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def max_backlog(self) -> int:
        return self._max_backlog

    @property
    def features(self) -> Features:
        return self._features

    @property
    def policy(self) -> Policy:
        return self._policy

    # -- submitting ------------------------------------------------------------------------

    def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture | None:
        """Enqueue ``fn(*args, **kwargs)`` without waiting; return its Future.

        Raises ``QueueFullError`` when ``max_backlog`` tasks are queued (or, with
        ``Features.ALLOW_SYNC_TASK_DROP``, drops the task with a logged warning and returns
        None), ``SerializationError`` when the call does not pickle (nothing is enqueued), and
        ``OrchestratorClosedError`` after ``stop()``.
        """
        return self._run(self._policy, None, fn, args, kwargs)

    async def run_async(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Enqueue ``fn(*args, **kwargs)``, waiting without blocking the loop for room.

        Cancelling the wait enqueues nothing. Returns a ``concurrent.futures.Future``; await
        ``asyncio.wrap_future(fut)`` for its result.
        """
        return await self._run_async(self._policy, None, fn, args, kwargs)

    def with_policy(self, policy: Policy) -> PolicyOverride:
        """``o.with_policy(Policy(retries=5)).run(fn, x)``: ``options(policy=policy)``."""
        if not isinstance(policy, Policy):
            raise ValueError(f"policy must be a taskorch.Policy, got {policy!r}")
        return self.options(policy=policy)

    def options(self, *, priority: int | None = None, delay: Duration | None = None,
                at: Moment | None = None, expires: Duration | datetime | None = None,
                policy: Policy | None = None, key: str | None = None,
                after: Iterable[TaskFuture] | None = None) -> PolicyOverride:
        """``o.options(priority=5, delay=60, expires=600, key="k", after=[f]).run(fn, x)``: one
        task's options (docs/options.md); bad values raise ValueError here, naming the option."""
        return PolicyOverride(self, policy, timing_of(priority, delay, at, expires), key, after)

    def map(
        self, fn: Callable[..., Any], /, *iterables: Iterable[Any], chunksize: int | None = None,
        return_exceptions: bool = False,
    ) -> Iterator[Any]:
        """``fn(*items)`` for each set of items of ``iterables``, results in order.

        The bulk API: items travel in chunks (``chunksize`` items per task; by default sized
        from the measured time per item), so a large batch costs few messages. The input is
        read lazily and at most ``2 * worker_count`` chunks are in flight, so memory stays
        flat however long the input; when the backlog is full, ``map`` waits for room.
        The policy applies to each chunk: an item that raises fails (and retries) its chunk,
        and the exception is raised here when iteration reaches that chunk, unless
        ``return_exceptions`` is set: then each item's exception is yielded as its result
        and nothing is retried. Closing the iterator early cancels the chunks not started.
        """
        from taskorch._parent.map import map_in_chunks

        return map_in_chunks(self.intake, self.worker_count, fn, iterables, chunksize,
                             return_exceptions)

    @property
    def intake(self) -> Intake:
        """Where callers that prepare calls themselves submit them (``map()``, the CLI, the
        server), which starts the workers; see ``Intake``. Not part of the public API."""
        self.start()
        return self._intake

    def _run(
        self, policy: Policy, policy_bytes: bytes | None, fn: Callable[..., Any],
        args: tuple[Any, ...], kwargs: dict[str, Any],
    ) -> TaskFuture | None:
        if self._launched != _fork_generation:  # (start(), inlined: run()'s hot path)
            self._launch()
        item = self._intake.prepare_call(fn, args, kwargs, policy, policy_bytes)
        return self._intake.offer(item, fn)  # (fn names the task if it is dropped)

    async def _run_async(
        self, policy: Policy, policy_bytes: bytes | None, fn: Callable[..., Any],
        args: tuple[Any, ...], kwargs: dict[str, Any],
    ) -> TaskFuture:
        self.start()
        item = self._intake.prepare_call(fn, args, kwargs, policy, policy_bytes)
        return await self._intake.offer_async(item)

    def schedule(
        self, fn: Callable[..., Any], /, *, cron: str | None = None,
        every: float | str | None = None, name: str | None = None, args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None, timezone: str | None = None, jitter: float = 0.0,
        overlap: str = "skip", misfire: str = "coalesce", catch_up_limit: int = 10,
        policy: Policy | None = None,
    ) -> ScheduledTask:
        """Run ``fn(*args, **kwargs)`` periodically: on a ``cron`` expression (five fields, in
        ``timezone``, default UTC) or ``every`` so long (seconds, or "30s", "10m", "1h").
        ``overlap`` ("skip", "queue", "allow") says what a tick does while the last run still
        goes; ``misfire`` ("coalesce", "skip", "catch_up") what ticks missed do; ``jitter``
        delays each run by up to that many seconds. Returns a handle (``cancel()``,
        ``trigger()``, ``status()``). The schedules end with ``stop()``. See
        docs/schedules.md."""
        from taskorch._parent.schedule import schedule_of
        from taskorch._parent.scheduler import ScheduledTask, Scheduler

        spec = schedule_of(fn, name=name, cron=cron, every=every, timezone=timezone,
                           jitter=jitter, overlap=overlap, misfire=misfire,
                           catch_up_limit=catch_up_limit)
        self.start()
        with self._schedule_lock:
            if self._scheduler is None:
                if self._backlog.closed or self._schedules_closed:
                    raise OrchestratorClosedError(
                        "the orchestrator was stopped and takes no new schedules")
                self._scheduler = Scheduler(self._intake, store=self._schedule_store,
                                            clock=self._backlog.clock.time)
            scheduler = self._scheduler
        scheduler.add(spec, fn, args, kwargs, policy)
        return ScheduledTask(scheduler, spec.name)

    def keep_schedule_state(self, store: StateStore) -> None:
        """Where the schedules keep their last fire and outcome (``taskorch serve``: its
        journal); before the first ``schedule()``. By default, in memory."""
        self._here()
        with self._schedule_lock:
            if self._scheduler is not None:
                raise RuntimeError("keep_schedule_state() must come before the first schedule()")
            self._schedule_store = store

    def trigger(self, name: str) -> TaskFuture | None:
        """Run the schedule ``name`` now, outside its ticks (KeyError: no such schedule)."""
        self._here()
        scheduler = self._scheduler
        if scheduler is None:
            raise KeyError(f"no schedule named {name!r}; there are: none")
        return scheduler.trigger(name)

    def schedules(self) -> list[ScheduleStatus]:  # next and last run, last outcome (schedule())
        self._here()
        scheduler = self._scheduler
        return scheduler.status() if scheduler is not None else []

    # -- observing -------------------------------------------------------------------------

    def stats(self) -> Stats:  # a consistent snapshot of the counts (see ``Stats``)
        self._here()
        return self._backlog.stats()

    def worker_pids(self) -> list[int]:  # the pids of the worker processes alive now
        self._here()
        return list(self._dispatcher.pids)

    def status_details(self) -> dict[str, Any]:
        """For ``taskorch status`` (the server's answer to a stats request): ``workers`` (pid,
        RSS, tasks run, what each runs now) and ``oldest_queued_seconds``."""
        return self._dispatcher.status_details()

    @property
    def dispatcher(self) -> Dispatcher:  # its workers (``observe``); ``terminate`` (serve)
        return self._dispatcher

    @property
    def backlog(self) -> Backlog:
        """Its backlog, whose lock readers of the counts and figures take (``observe``)."""
        return self._backlog

    # -- stopping --------------------------------------------------------------------------

    def stop(self, timeout: float = 30.0) -> StopReport:
        """Close intake, drain every queued and running task, stop the workers.

        If ``timeout`` seconds pass first, queued tasks are cancelled and running ones are
        terminated (their futures fail with ``TaskAbandonedError``); stop still returns within
        about ``timeout``. Every future is resolved when it returns, and no worker process is
        left. Idempotent and safe from any thread; a later call with a shorter timeout
        shortens the deadline. Called from a future's callback (the dispatcher thread), it
        starts the stop and returns without waiting.
        """
        check_number("timeout", timeout, allow_zero=True)
        if self._generation != _fork_generation:  # a forked child, not used here yet
            self._start_in_this_process(idle=True)
        started = time.monotonic()
        if self._launched != _fork_generation:  # never started: nothing to stop
            self._launch(nothing=True)
        with self._schedule_lock:
            scheduler = self._scheduler
            self._schedules_closed = True  # a schedule() racing this one is refused
        if scheduler is not None:
            scheduler.stop()  # first: no tick may fire into a closing backlog
        self._backlog.close(started + timeout)
        self._dispatcher.wake()
        if threading.current_thread() is not self._dispatcher.thread:
            self._dispatcher.finished.wait(timeout + _STOP_SLACK)
        _running.pop(self._dispatcher, None)
        return self._report(time.monotonic() - started)

    async def stop_async(self, timeout: float = 30.0) -> StopReport:
        """``stop()`` without blocking the event loop."""
        import asyncio

        return await asyncio.to_thread(self.stop, timeout)

    def _report(self, seconds: float) -> StopReport:
        s = self._backlog.stats()
        return StopReport(
            drained=bool(self._dispatcher.drained), succeeded=s.succeeded, failed=s.failed,
            cancelled=s.cancelled, abandoned=s.abandoned, seconds=seconds,
        )

    def __enter__(self) -> TaskOrchestrator:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> TaskOrchestrator:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop_async()

    def __repr__(self) -> str:
        if self._generation != _fork_generation:
            return f"<TaskOrchestrator of process {self._pid}, not used in this forked child>"
        s = self.stats()
        state = "stopped" if self._dispatcher.finished.is_set() else (
            "stopping" if self._backlog.closed else "running"
            if self._launched == _fork_generation else "not started")
        return (f"<TaskOrchestrator {state} workers={s.workers}/{self.worker_count} "
                f"queued={s.queued}/{self._max_backlog} running={s.running}>")


# Dispatchers of orchestrators not yet stopped: the exit hook stops them.
_running: dict[Dispatcher, Backlog] = {}
_exit_hook_lock = threading.Lock()


def _close_intake(backlog: Backlog, dispatcher: Dispatcher, timeout: float) -> None:
    backlog.close(time.monotonic() + timeout)
    dispatcher.wake()


# -- fork ------------------------------------------------------------------------------------
# A forked child has a copy of every orchestrator, but none of the threads that ran them, and
# the parent's worker channels. `_fork_generation` goes up in each child, at the fork; an
# orchestrator made in an older generation starts afresh on first use (TaskOrchestrator._here).

_fork_generation = 0
# Orchestrators alive in this process, to be left behind in a forked child at the fork.
_live: weakref.WeakSet[TaskOrchestrator] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _fork_generation, _exit_hook_lock
    _fork_generation += 1
    _exit_hook_lock = threading.Lock()  # (may have been copied held)
    _running.clear()  # the parent's dispatchers: not this process's to stop at exit
    for orchestrator in list(_live):
        try:
            orchestrator._left_behind_in_child()
        except BaseException:  # noqa: BLE001 - never let a fork hook fail the child's start
            log.exception("taskorch: could not leave an orchestrator behind in a forked child")


os.register_at_fork(after_in_child=_after_fork_in_child)


@atexit.register
def _stop_all_at_exit() -> None:
    with _exit_hook_lock:
        dispatchers = list(_running.items())
        _running.clear()
    for dispatcher, backlog in dispatchers:
        if not dispatcher.finished.is_set():
            log.info("stopping an orchestrator that was not stopped (interpreter exit)")
            _close_intake(backlog, dispatcher, EXIT_TIMEOUT)
    for dispatcher, _ in dispatchers:
        dispatcher.finished.wait(EXIT_TIMEOUT + _STOP_SLACK)
