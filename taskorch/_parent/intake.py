"""Parent process, the submitting threads: an orchestrator's ``Intake``, the one way tasks
enter its backlog (``run()``, ``map()``, the Executor, the CLI, the server, the scheduler),
and how a queued task is cancelled.

Everything here runs in the caller's thread (or event loop) and touches only the backlog,
under its lock; nothing blocks but ``offer_blocking`` (waiting for room, by design) and a
cancel that waits for a worker to hand a call back (``RECALL_WAIT``).
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Iterable, Iterator, Protocol

from taskorch._options import Resolved, Timing, check_after, check_key
from taskorch._parent.backlog import Backlog
from taskorch._parent.callbacks import InlineCallback, callback_runner
from taskorch._parent.clock import Clock
from taskorch._parent.figures import name_of, name_of_payload
from taskorch._parent.task import TaskFuture, WorkItem
from taskorch._parent.waits import DEPENDENCY, dependency_failed
from taskorch._policy import Policy
from taskorch._wire import encode_call, encode_policy

log = logging.getLogger("taskorch")


#: How long ``future.cancel()`` of a queued task already handed to a worker waits for the
#: worker to hand it back (its reader thread answers at once, unless a task holds the GIL in C
#: code). Past it, cancel() returns False and the task runs: a bound on how long cancel() can
#: block its caller (an event loop, say), traded against cancelling such a task at all.
RECALL_WAIT = 2.0


def _cancel(backlog: Backlog, item: WorkItem, future: TaskFuture) -> bool:
    return bool(cancel_items(backlog, [item]))


def cancel_items(backlog: Backlog, items: list[WorkItem]) -> int:
    """Cancel those of ``items`` still queued (recalling them from workers that have not
    started them) and their futures; how many were cancelled."""
    return len(backlog.cancels.cancel_queued(items, RECALL_WAIT))


class Intake:
    """An orchestrator's intake: make a task from a call (``prepare_call``) or from bytes
    pickled elsewhere (``prepare``: ``map()``'s chunks, the CLI's bulk path, the server, which
    forwards calls it must never unpickle), then offer it with one of three semantics. Runs in
    the submitting thread; everything it touches is the backlog's, under its lock."""

    def __init__(self, backlog: Backlog, default_policy: Policy, drop_when_full: bool) -> None:
        self._backlog = backlog
        self._default_policy = default_policy
        self._drop_when_full = drop_when_full

    def cancel(self, items: list[WorkItem]) -> int:
        """Cancel those of ``items`` (tasks offered here) that have not started: see
        ``cancel_items``. How many were cancelled."""
        return cancel_items(self._backlog, items)

    def close(self, timeout: float) -> None:
        """No new tasks; what was accepted runs, within ``timeout`` seconds (stop() without
        waiting)."""
        self._backlog.close(time.monotonic() + timeout)
        self._backlog.wake_dispatcher()

    def prepare(
        self, payload: bytes, policy: Policy | None = None, policy_bytes: bytes | None = None,
        *, raw: bool = False, name: str | None = None,
    ) -> WorkItem:
        """A task from ``_wire.encode_call`` bytes. ``policy_bytes`` None: the workers'
        default policy (``policy`` must then be the orchestrator's, or None). ``raw``: its
        future gets the worker's outcome still pickled (``task.RawOutcome``). ``name``: the
        task's label for metrics and limits (None: read from ``payload`` if a name is needed;
        "": none is; see ``figures``)."""
        future = TaskFuture()
        item = WorkItem(0, future, payload, policy or self._default_policy, policy_bytes, raw)
        future.set_canceller(functools.partial(_cancel, self._backlog, item))
        future.owner = self._backlog
        if name is None:
            name = name_of_payload(payload) if self._names_tasks() else ""
        item.name = name
        return item

    def _names_tasks(self) -> bool:
        """Does a task need its name (metrics are on, or some name has a limit)?"""
        return bool(self._backlog.listeners) or self._backlog.limited

    def prepare_call(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
        policy: Policy | None = None, policy_bytes: bytes | None = None,
    ) -> WorkItem:
        """A task that calls ``fn(*args, **kwargs)``; SerializationError if it does not
        pickle (nothing is enqueued)."""
        if not callable(fn):
            raise TypeError(f"the task must be callable, got {type(fn).__qualname__}")
        return self.prepare(encode_call(fn, args, kwargs), policy, policy_bytes,
                            name=name_of(fn) if self._names_tasks() else "")

    def time(self, item: WorkItem, timing: Resolved) -> None:
        """Give ``item`` (not offered yet) its priority, not-before time and expiry."""
        apply_timing(item, timing, self._backlog.clock)

    def offer(self, item: WorkItem, what: object = "") -> TaskFuture | None:
        """run()'s semantics: accept, raise QueueFullError, or drop (None, logged) when the
        orchestrator has ``Features.ALLOW_SYNC_TASK_DROP``."""
        if self._backlog.offer(item, self._drop_when_full):
            if item.after is not None:
                self.await_dependencies(item)
            return item.future
        self._log_drop(what)
        return None

    def await_dependencies(self, item: WorkItem) -> None:
        """``item`` was accepted with ``after``: if it waits for them, each dependency tells
        the backlog when it ends (``waits``; at once, here, for one already done), in the
        thread that resolves it for a success (``_dependency_done``). Nothing for a submission
        that joined the unfinished task with its key (``waits.Waits.join``): it is that task,
        no dependant (nor for one cancelled or expired since: it waits no more)."""
        if item.waiting_for != DEPENDENCY:
            return
        ended = functools.partial(self._backlog.dependency_ended, item)
        callback = InlineCallback(functools.partial(_dependency_done, ended))
        for dependency in item.after or ():
            dependency.add_done_callback(callback)

    def check_after(self, after: object) -> tuple[TaskFuture, ...]:
        """``options(after=...)``: futures of tasks of this orchestrator (ValueError: the
        rule is ``_options.check_after``'s)."""
        return check_after(after, self._backlog)

    def _log_drop(self, what: object) -> None:
        """A task dropped for a full backlog (``ALLOW_SYNC_TASK_DROP``); ``what``: its function,
        or who sent it."""
        log.warning("backlog full (%d tasks queued): dropped task %s (ALLOW_SYNC_TASK_DROP)",
                    self._backlog.max_backlog,
                    getattr(what, "__qualname__", what) or "sent by a client")

    def offer_blocking(self, item: WorkItem, deadline: float | None = None) -> TaskFuture | None:
        """Accept ``item``, waiting for room until ``deadline`` (a ``time.monotonic()`` value;
        None: no limit). None: the deadline passed first, nothing was enqueued."""
        return item.future if self._backlog.offer_blocking(item, deadline) else None

    async def offer_async(self, item: WorkItem) -> TaskFuture:
        """run_async()'s semantics: wait for room without blocking the loop; cancelling the
        wait enqueues nothing."""
        import asyncio  # here, not at the top: importing it costs ~14 ms a sync caller never needs

        loop = asyncio.get_running_loop()
        while True:
            waiter = self._backlog.offer_or_wait(item, loop)
            if waiter is None:
                if item.after is not None:
                    self.await_dependencies(item)
                return item.future
            try:
                await waiter
            except asyncio.CancelledError:
                self._backlog.forget_waiter(waiter)
                raise


    # -- taskorch serve's journal: a slot held while the record commits; recovery ------------

    def reserve(self, what: object = "") -> bool:
        """Hold a backlog slot for a task being journaled: True, or False (dropped, logged)
        when full with ``ALLOW_SYNC_TASK_DROP``; else QueueFullError / closed errors."""
        if self._backlog.reserve(self._drop_when_full):
            return True
        self._log_drop(what)
        return False

    async def reserve_async(self) -> None:
        """Hold a backlog slot, waiting for room without blocking the loop; cancelling the
        wait holds nothing."""
        import asyncio

        loop = asyncio.get_running_loop()
        while True:
            waiter = self._backlog.reserve_or_wait(loop)
            if waiter is None:
                return
            try:
                await waiter
            except asyncio.CancelledError:
                self._backlog.forget_waiter(waiter)
                raise

    def reserve_share(self, limit: int, share: int) -> int:
        """Hold up to ``limit`` slots, at most 1/``share`` of the room left (never raises)."""
        return self._backlog.reserve_share(limit, share)

    def unreserve(self, n: int = 1) -> None:
        self._backlog.unreserve(n)

    def admit_reserved(self, item: WorkItem) -> TaskFuture:
        """Enqueue ``item`` in the slot ``reserve`` held (given back if this raises)."""
        self._backlog.admit_reserved(item)
        if item.after is not None:
            self.await_dependencies(item)
        return item.future

    def recover(self, item: WorkItem, attempts: int, crashed: bool) -> TaskFuture:
        """Enqueue a task recovered from a journal with ``attempts`` already charged (they
        travel to the worker as ``attempts_done``), past the bound if need be.

        ``crashed``: it was running when its server died. The rule is the dispatcher's
        ``rules.TaskRules.lost_locked`` for a lost worker: that attempt is spent, and the task
        runs again while its budget lasts, else fails with ``WorkerCrashedError`` (returned
        resolved).
        Unlike a crash seen live, no backoff delays its retry: the restart took longer.
        """
        from taskorch._errors import WorkerCrashedError

        item.attempts = item.future.attempts = attempts
        fail = crashed and attempts >= item.policy.max_attempts
        self._backlog.recover(item, crashed, fail)
        if item.after is not None and not fail:
            self.await_dependencies(item)
        if fail:
            item.future.set_exception(WorkerCrashedError(
                None, None, attempts, "taskorch serve died while it ran; its journal said so "
                "at the restart"))
            item.release()
        return item.future


def _dependency_done(ended: Callable[[TaskFuture], None], dependency: TaskFuture) -> None:
    """A dependency's future resolved, in the thread that resolved it (a dispatcher's,
    mostly): a success releases its dependant at once (``Backlog.dependency_ended``: the
    backlog's lock, no user code); a failure goes to the "taskorch-callbacks" thread, since
    failing the dependant unpickles the dependency's exception (user code)."""
    if dependency_failed(dependency):
        callback_runner.submit(dependency, [ended])  # type: ignore[list-item]
    else:
        ended(dependency)


class _HasIntake(Protocol):  # a TaskOrchestrator, as seen from here
    @property
    def intake(self) -> Intake: ...

    @property
    def policy(self) -> Policy: ...

    @property
    def worker_count(self) -> int: ...


def apply_timing(item: WorkItem, timing: Resolved, clock: Clock) -> None:
    """Give ``item`` its place in order and time (``_options``; epoch seconds to ``clock``'s
    monotonic time, read now)."""
    item.priority = timing.priority
    if timing.not_before is None and timing.expires is None:
        return
    offset = clock.monotonic() - clock.time()
    if timing.not_before is not None:
        item.not_before = timing.not_before + offset
    if timing.expires is not None:
        item.expires_at = timing.expires + offset


class PolicyOverride:
    """``run``/``run_async`` of an orchestrator with one task's options (``options()``:
    a policy, a priority, a delay or start time, an expiry, a key, dependencies)."""

    def __init__(self, orchestrator: _HasIntake, policy: Policy | None,
                 timing: Timing | None = None, key: object = None, after: object = None,
                 ) -> None:
        if policy is not None and not isinstance(policy, Policy):
            raise ValueError(f"policy must be a taskorch.Policy, got {policy!r}")
        self._orchestrator = orchestrator
        self._policy = policy
        self._policy_bytes = None if policy is None else encode_policy(policy)
        self._timing = None if timing is None or timing.plain else timing
        self._key = check_key(key)
        # (an empty list: no dependency, not a wait for none to end, which never comes)
        self._after = None if after is None else orchestrator.intake.check_after(after) or None

    def _prepare(self, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> tuple[Intake, WorkItem]:
        intake = self._orchestrator.intake  # (a forked child's starts afresh here)
        timing = None if self._timing is None else self._timing.resolve(time.time())
        item = intake.prepare_call(fn, args, kwargs, self._policy, self._policy_bytes)
        if timing is not None:
            intake.time(item, timing)
        item.key, item.after = self._key, self._after
        return intake, item

    def map(self, fn: Callable[..., Any], /, *iterables: Iterable[Any],
            chunksize: int | None = None, return_exceptions: bool = False) -> Iterator[Any]:
        """``map()`` with these options: only a policy applies to its chunks (a key, which
        makes one task, or a place in order, time or dependencies is a ValueError)."""
        if self._key is not None:
            raise ValueError("options(key=...) makes one task, map() many: a key cannot apply "
                             "to map(); submit each keyed task with run()")
        if self._timing is not None or self._after is not None:
            raise ValueError("map() takes no priority, delay, at, expires or after option: "
                             "submit such tasks with run()")
        from taskorch._parent.map import map_in_chunks

        return map_in_chunks(self._orchestrator.intake, self._orchestrator.worker_count, fn,
                             iterables, chunksize, return_exceptions, self._policy,
                             self._policy_bytes)

    def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture | None:
        intake, item = self._prepare(fn, args, kwargs)
        return intake.offer(item, fn)  # (fn names the task if it is dropped)

    async def run_async(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        intake, item = self._prepare(fn, args, kwargs)
        return await intake.offer_async(item)
