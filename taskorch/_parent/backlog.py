"""Parent process: the bounded backlog and the task ledger, shared by producers and dispatcher.

Producers (any application thread via ``run()``, event loops via ``run_async()``) add
``WorkItem``s; the dispatcher thread takes them for the workers and reports every transition
back here, so the counts, the bound, the order and the time keeping live in one place under
one lock. Nothing outside this module touches its state, only its methods.

The lock (``Backlog._lock``, a plain ``threading.Lock``; callers take it with ``locked()``):
- guards the order (``order.TaskOrder``), every counter, ``closed``/``stop_deadline``, the
  room waiters, and each item's ``state`` and ``worker`` fields;
- is taken by producers once per task and by the dispatcher once per batch of events (the
  ``*_locked`` methods need it held);
- is never held across IPC, a ``join``, a Future method that runs callbacks, or logging of
  user data: callers collect what to resolve and do it after releasing it.

The bound is exact: ``queued`` counts tasks accepted and not yet started (waiting here, due or
not, or prefetched by a worker), and ``offer`` checks and increments it under the lock, so no
number of concurrent producers can push it past ``max_backlog``. A slot frees when a worker
acknowledges the start of a task (or the task is cancelled), not when it is handed over.
A crash retry waiting out its backoff here is a started task: counted running, outside it.

Order and time (``order``): ready tasks leave by priority, first in first out among equals; a
task not due yet (its ``not_before``, a crash retry's backoff) waits, read against one
injectable ``clock.Clock``; ``next_due`` tells the dispatcher when to look again. A task not
started by its ``expires_at`` ends ``expired`` (``release_due``), never run. Keys,
dependencies and per-name limits are ``waits``'s. A task waiting for any of these is queued.
Reserved slots (``reserve``) count against the same bound; ``recover`` alone may go past it.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Callable

from taskorch._errors import OrchestratorBrokenError, OrchestratorClosedError, QueueFullError
from taskorch._options import Limit
from taskorch._parent.cancels import Cancels
from taskorch._parent.clock import SYSTEM_CLOCK, Clock
from taskorch._parent.counts import Counts
from taskorch._parent.order import Gate, TaskOrder
from taskorch._parent.room import RoomWaiters, Waiter
from taskorch._parent.task import TaskFuture, TaskListener, TaskState, WorkItem
from taskorch._parent.waits import Waits, dependency_failed, fail_dependant
from taskorch._stats import Stats

if TYPE_CHECKING:  # asyncio costs ~14 ms to import; only run_async() callers need it, and have it
    import asyncio


class Backlog:
    def __init__(self, max_backlog: int, clock: Clock = SYSTEM_CLOCK,
                 limits: dict[str, Limit] | None = None) -> None:
        self.max_backlog = max_backlog  # (read-only)
        self.clock = clock  # (read-only) what every time here is read from (``clock``)
        self._lock = threading.Lock()
        self._wake: Callable[[], None] = self._no_dispatcher_yet  # set once by ``connect``
        # Accepted tasks not handed to a worker, ready or not due yet, and crash retries
        # waiting out their backoff (see ``order``); and those waiting in ``waits``.
        self._order = TaskOrder()
        self._waits = Waits(self._order, limits or {}, clock.monotonic)  # keys, after, limits
        self.limited = bool(limits)  # (read-only) are there limits? Tasks are named then
        # True while the dispatcher is known to come back to the ready tasks without a wakeup
        # (it was woken already, or it left work behind for lack of worker capacity):
        # producers then skip the wakeup syscall. Set by the dispatcher (``note_waiting_locked``).
        self._dispatcher_will_look = False
        self._closed = False
        self._broken: str | None = None  # why no worker can be started, once that is so
        self._stop_deadline: float | None = None  # clock.monotonic() by which stop() must end
        # (read-only) future.cancel() of queued tasks, and the dispatcher's recalls for it.
        self.cancels = Cancels(self)
        # Every accepted task not finished, by id, wherever it is (waiting here, in transit to
        # a worker, held by one, backing off): what a forked child fails at the fork.
        self._unfinished: dict[int, WorkItem] = {}
        # Callers waiting for room, FIFO (``room``): run_async() and blocking producers (map()).
        self._room_waiters = RoomWaiters(self._pass_room_on)
        self._last_task_id = 0
        # Slots held for tasks not yet enqueued (``reserve``): in the bound, not in the stats.
        self._reserved = 0
        self._counts = Counts()  # what stats() shows
        # The orchestrator's listeners to every task's moments (``task.TaskListener``: the
        # metrics' figures, once enabled); swapped whole under the lock, called with it held.
        self._listeners: tuple[TaskListener, ...] = ()

    def connect(self, wake: Callable[[], None], recalls_for_cancel: bool) -> None:
        """Wire the dispatcher, once, before any task: ``wake`` makes it look here soon (any
        thread); ``recalls_for_cancel``: it can take back a call handed over, for a cancel."""
        self._wake = wake
        self.cancels.recalls = recalls_for_cancel

    def wake_dispatcher(self) -> None:  # (any thread, never under the lock)
        self._wake()

    def locked(self) -> AbstractContextManager[object]:
        """The lock, for a batch of ``*_locked`` calls (see the module docstring)."""
        return self._lock

    @property
    def closed(self) -> bool:
        """stop() was called: no new task (read without the lock: a flag set once)."""
        return self._closed

    @property
    def broken(self) -> str | None:
        """Why no task can run any more, once that is so (set once, read without the lock)."""
        return self._broken

    @property
    def stop_deadline(self) -> float | None:
        """The ``clock.monotonic()`` by which stop() must end, once it was called."""
        return self._stop_deadline

    @property
    def listeners(self) -> tuple[TaskListener, ...]:
        """The orchestrator's listeners (the dispatcher's rules announce to them). Read
        without the lock by producers: while there is one, tasks are named (``figures``)."""
        return self._listeners

    def set_listeners_locked(self, listeners: tuple[TaskListener, ...]) -> None:
        self._listeners = listeners

    # -- producers -----------------------------------------------------------------------

    def offer(self, item: WorkItem, drop_when_full: bool) -> bool:
        """Accept ``item`` (True), drop it (False), or raise QueueFullError / closed errors."""
        with self._lock:
            if item.key is not None and self._waits.join(item):
                return True  # (``item`` is now the unfinished task with its key)
            if not self._room_or_refuse_locked(drop_when_full):
                return False
            wake = self._accept(item)
        if wake:
            self._wake()
        return True

    def offer_or_wait(self, item: WorkItem,
                      loop: asyncio.AbstractEventLoop) -> asyncio.Future[None] | None:
        """Accept ``item`` (None), or return a future that resolves when there may be room."""
        with self._lock:
            self._check_open()
            if item.key is not None and self._waits.join(item):
                return None
            if not self._has_room_locked():
                return self._room_waiters.future(loop)
            wake = self._accept(item)
        if wake:
            self._wake()
        return None

    def offer_blocking(self, item: WorkItem, deadline: float | None) -> bool:
        """Accept ``item`` (True), waiting for room until ``deadline`` (False: timed out)."""
        while True:
            with self._lock:
                self._check_open()
                if self._has_room_locked():
                    wake = self._accept(item)
                    break
                event = self._room_waiters.event()
            remaining = None if deadline is None else deadline - self.clock.monotonic()
            if (remaining is not None and remaining <= 0) or not event.wait(remaining):
                self.forget_waiter(event)
                return False
        if wake:
            self._wake()
        return True

    def reserve(self, drop_when_full: bool) -> bool:
        """Hold one slot (True), or count a drop (False) or raise QueueFullError as offer()
        does. The holder then calls ``admit_reserved`` or ``unreserve``: ``taskorch serve``
        holds one for each submission while its journal record commits, so that a committed
        task always has its slot."""
        with self._lock:
            if not self._room_or_refuse_locked(drop_when_full):
                return False
            self._reserved += 1
        return True

    def reserve_or_wait(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None] | None:
        """Hold one slot (None), or return a future that resolves when there may be room."""
        with self._lock:
            self._check_open()
            if not self._has_room_locked():
                return self._room_waiters.future(loop)
            self._reserved += 1
        return None

    # -- the bound (the lock held) -------------------------------------------------------

    def _has_room_locked(self) -> bool:  # the bound: queued + reserved stay under max_backlog
        return self._counts.queued + self._reserved < self.max_backlog

    def _room_or_refuse_locked(self, drop_when_full: bool) -> bool:
        """run()'s rule: True if there is room; else count a drop (False) or a rejection
        (QueueFullError). Closed and broken errors first."""
        self._check_open()
        if self._has_room_locked():
            return True
        if drop_when_full:
            self._counts.dropped += 1
            return False
        self._counts.rejected += 1
        raise QueueFullError(self.max_backlog)

    def reserve_share(self, limit: int, share: int) -> int:
        """Hold up to ``limit`` slots, at most 1/``share`` of the room left; how many. Never
        raises, never counts a rejection (taskorch serve's credits)."""
        with self._lock:
            if self._closed or self._broken is not None:
                return 0
            room = self.max_backlog - self._counts.queued - self._reserved
            n = max(0, min(limit, room // share))
            self._reserved += n
        return n

    def unreserve(self, n: int = 1) -> None:
        if n <= 0:
            return
        with self._lock:
            self._reserved -= n
            self._room_waiters.wake(n)

    def admit_reserved(self, item: WorkItem) -> None:
        """Enqueue ``item`` in a slot held by ``reserve``; the slot is given back whatever
        happens. Raises OrchestratorClosedError / OrchestratorBrokenError as offer() does."""
        with self._lock:
            self._reserved -= 1
            try:
                self._check_open()
            except BaseException:
                self._room_waiters.wake(1)
                raise
            if item.key is not None and self._waits.join(item):
                self._room_waiters.wake(1)  # (the task of that key stands: slot passed on)
                return
            wake = self._accept(item)
        if wake:
            self._wake()

    def recover(self, item: WorkItem, crashed: bool, fail: bool) -> None:
        """Enqueue a task recovered from a journal, past the bound if need be. ``crashed``: it
        was running when its server died (a crash, and a retry unless ``fail``: its attempts
        are spent, it is counted failed at once, and the caller resolves its future)."""
        with self._lock:
            self._check_open()
            if crashed:
                self._counts.crashes += 1
            if not fail:
                self._counts.retried += crashed
                wake = self._accept(item)
            else:
                self._last_task_id += 1
                item.task_id = item.future.task_id = self._last_task_id
                self._counts.submitted += 1
                self._counts.failed += 1
                item.state = TaskState.FAILED
                wake = False
        if wake:
            self._wake()

    def forget_waiter(self, waiter: Waiter) -> None:
        """A waiting caller gave up: drop its waiter, and pass on a wakeup it received."""
        with self._lock:
            if not self._room_waiters.forget(waiter):
                self._room_waiters.wake(1)

    def _pass_room_on(self) -> None:  # (a waiter's loop: its caller gave up meanwhile)
        with self._lock:
            self._room_waiters.wake(1)

    def _check_open(self) -> None:
        if self._closed:
            raise OrchestratorClosedError(
                "the orchestrator was stopped and takes no new tasks; create a new one"
            )
        if self._broken is not None:
            raise OrchestratorBrokenError(self._broken)

    def _accept(self, item: WorkItem) -> bool:
        """Enqueue (lock held); True if the caller must wake the dispatcher after unlocking."""
        self._last_task_id += 1
        item.task_id = item.future.task_id = self._last_task_id
        counts = self._counts
        counts.submitted += 1
        counts.queued += 1
        item.accepted_at = now = self.clock.monotonic()
        if (item.key is None and item.after is None) or not self._waits.accepted(item):
            first_due = self._order.push(item, now)  # (one not due yet may change the timeout)
        else:  # it waits for its dependencies (``dependency_ended``); its expiry runs meanwhile
            first_due = self._order.track_expiry(item)
        self._unfinished[item.task_id] = item
        for listener in self._listeners:
            listener.accepted(item)
        wake = first_due or not self._dispatcher_will_look
        self._dispatcher_will_look = True
        return wake

    # -- state transitions (callers hold the lock) -------------------------------------------

    def start_locked(self, item: WorkItem, ending: bool = False) -> None:
        """``item``'s first attempt started: its slot frees (``ending``: it ended, too)."""
        if item.state is TaskState.QUEUED:
            item.state = TaskState.RUNNING
            self._counts.queued -= 1
            self._counts.running += 1
            if not ending:
                item.future.mark_running()
            self._room_waiters.wake(1)
            if item.cancel_request is not None:  # it started first: too late to cancel
                item.cancel_request.answer_locked(item, False)

    def finish_locked(self, item: WorkItem, state: TaskState) -> bool:
        """Move ``item`` to a terminal state; the caller resolves its future after unlocking,
        unless this returns True: it ended cancelled while a caller of ``cancel()`` waited,
        and that caller cancels the future itself (before its cancel() returns True)."""
        if item.state is TaskState.QUEUED:
            self._counts.queued -= 1
            self._room_waiters.wake(1)
        elif item.state is TaskState.RUNNING:
            self._counts.running -= 1
        else:
            raise AssertionError(f"{item!r} finished twice")
        item.state = state
        item.worker = None
        if (item.key is not None or self.limited) and self._waits.ended(item):
            self._dispatcher_will_look = True  # (the dispatcher's thread, or it is woken)
        self._unfinished.pop(item.task_id, None)
        self._counts.ended(state)
        if state is TaskState.CANCELLED:
            for listener in self._listeners:
                listener.cancelled(item)
            if item.listener is not None:
                item.listener.cancelled(item)
        request = item.cancel_request
        if request is None:
            return False
        granted = state is TaskState.CANCELLED
        request.answer_locked(item, granted)
        return granted

    # -- the dispatcher: order and time (lock held, but ``next_due`` / ``release_due``) ------

    def take_locked(self, gate: Gate | None, limit: int, budget: int | None = None,
                    first_may_exceed: bool = True, plain_after: int | None = None,
                    ) -> list[WorkItem]:
        """Up to ``limit`` ready tasks, in order, as ``gate`` allows; with a ``budget``
        (payload bytes), a task that would cross it stays unless it is the first and
        ``first_may_exceed`` (``process.PREFETCH_BYTES``); ``plain_after``: see ``order``."""
        now = self.clock.monotonic() if self._order.has_expiring() else None
        return self._order.take(limit, gate, budget, first_may_exceed, now, plain_after,
                                self._waits.limits)

    def put_back_locked(self, items: list[WorkItem]) -> None:
        """Calls handed over and never started go back to the front of their priority, in
        order, uncharged (they never ran); one past its expiry ends at ``release_due``."""
        for item in items:
            if item.limit is not None:
                self._waits.free(item)
        self._order.push_front(items, self.clock.monotonic)
        self._dispatcher_will_look = True

    def mixed_locked(self) -> bool:  # does a priority but 0 wait? (prefetch: ``order``)
        return self._order.mixed()

    def arrivals_locked(self) -> int:  # changes whenever a task is accepted
        return self._counts.submitted

    def note_waiting_locked(self) -> bool:
        """The dispatcher handed over what it could: True if ready tasks remain; it then comes
        back without a wakeup (capacity frees through the workers' events or the breaker's
        timer), so producers skip theirs until it finds none left."""
        waiting = self._dispatcher_will_look = self._order.ready_count() > 0
        return waiting

    def ready_count_locked(self) -> int:  # tasks due and not handed over
        return self._order.ready_count()

    def holds_tasks_locked(self) -> bool:  # any task here, due or not, or waiting (``waits``)
        return self._order.holds_any() or self._waits.holds_any()

    def next_due(self) -> float | None:
        """When the next task is due, or None (without the lock: ``TaskOrder.next_due``)."""
        due, token = self._order.next_due(), self._waits.next_due()
        return due if token is None else token if due is None else min(due, token)

    def release_due(self, now: float) -> list[WorkItem]:
        """Tasks due by ``now`` join the ready ones (and limits' tokens back); those not
        started by their expiry end ``expired`` (returned: the caller fails their futures)."""
        due = self.next_due()
        if due is None or due > now:
            return []
        with self._lock:
            self._waits.release_due(now)
            expired = self._order.release_due(now, self._waits.remove)
            for item in expired:
                self.finish_locked(item, TaskState.EXPIRED)
        return expired

    def delayed_locked(self) -> tuple[int, float | None]:
        """How many new tasks wait for their time, and the ``clock.time()`` the first is due."""
        first, clock = self._order.next_delayed() if self._order.delayed else None, self.clock
        return self._order.delayed, first and first - clock.monotonic() + clock.time()

    def take_all_locked(self) -> list[WorkItem]:
        """Empty it (stop, broken): ready tasks in order, the others soonest first, ``waits``'s."""
        return self._order.take_all() + self._waits.take_all()

    def take_new_beyond_locked(self, admit: int) -> list[WorkItem]:
        """The circuit breaker's FAIL mode: remove the new ready tasks beyond the first
        ``admit`` (the caller fails them); crash retries stay."""
        return self._order.take_new_beyond(admit)

    def oldest_waiting_since(self) -> float | None:
        """The ``accepted_at`` of the oldest ready task (None: none). Any thread."""
        with self._lock:
            return self._order.oldest_accepted()

    # -- the dispatcher: counts (lock held) -------------------------------------------------

    @property
    def counts(self) -> Counts:
        """The counters behind ``stats()`` (``counts.Counts``): read and change them with the
        lock held (the dispatcher's rules; the breaker publishes its state there)."""
        return self._counts

    def crashed_locked(self, item: WorkItem, timed_out: bool,
                       retry_in: float | None = None) -> None:
        """The started attempt of ``item`` was lost (``timed_out``: at its hard timeout). With
        ``retry_in`` (s) it waits here, running (outside the bound), then goes to the front."""
        self._counts.crash(timed_out)
        if item.limit is not None:
            self._waits.free(item)  # (its slot is taken again when it is)
        if retry_in is not None:
            self._counts.retried += 1
            self._order.later(item, self.clock.monotonic() + retry_in)

    # -- cancelling (``cancels``: what ``cancels`` needs here) ---------------------------------

    def remove_queued_locked(self, queued: dict[int, WorkItem]) -> list[WorkItem]:
        """End cancelled those of ``queued`` (by ``id()``) still here, wherever (``cancels``)."""
        cancelled = self._order.remove(queued)
        if len(cancelled) < len(queued):
            cancelled += self._waits.remove(queued)
        for item in cancelled:
            self.finish_locked(item, TaskState.CANCELLED)
        return cancelled

    def mark_broken(self, reason: str) -> None:
        """No task can run any more: producers and waiters get OrchestratorBrokenError."""
        with self._lock:
            if self._broken is None:
                self._broken = reason
            self._room_waiters.wake(len(self._room_waiters))  # they see `broken`

    def close(self, deadline: float) -> None:
        with self._lock:
            self._closed = True
            if self._stop_deadline is None or deadline < self._stop_deadline:
                self._stop_deadline = deadline
            self._room_waiters.wake(len(self._room_waiters))  # they see `closed`

    def forget_in_forked_child(self) -> list[WorkItem]:
        """In a forked child, at the fork (the lock may have been copied held; the waiters are
        the parent's): empty it all; return the unfinished tasks (the child fails them)."""
        self._lock = threading.Lock()
        self._room_waiters.clear()
        items = list(self._unfinished.values())
        self._unfinished.clear()
        self._order.take_all()
        self._waits.take_all()
        return items

    # -- keys, dependencies, limits (``waits``) -----------------------------------------------

    def dependency_ended(self, item: WorkItem, dependency: TaskFuture) -> None:
        """The done-callback of each of ``item``'s dependencies (``waits``)."""
        failed = dependency_failed(dependency)
        with self._lock:
            if not self._waits.dependency_ended(item, failed, self.clock.monotonic()):
                return
            if failed:
                self.finish_locked(item, TaskState.FAILED)
            wake = not failed and not self._dispatcher_will_look  # (``_accept``'s rule)
            self._dispatcher_will_look |= not failed
        if failed:
            fail_dependant(item, dependency)
        elif wake:
            self._wake()

    def waiting_for_locked(self, item: WorkItem) -> str | None:
        """Why ``item`` waits: "dependency", "limit", "time" or None (``waits``)."""
        return self._waits.waiting_for(item, self.clock.monotonic())

    def stats(self) -> Stats:
        with self._lock:
            return self._counts.stats(self._order.delayed)

    @staticmethod
    def _no_dispatcher_yet() -> None:
        raise AssertionError("Backlog.wake_dispatcher was not set")

