"""Parent process: the order in which the backlog's tasks leave it, and when.

``TaskOrder`` belongs to the ``Backlog`` and is guarded by its lock: every method here is
called with that lock held (by producers accepting a task, by the dispatcher thread taking
them), except ``next_due``, documented there. Nothing here waits, logs or resolves a future.

Two parts:

- **Ready** tasks, highest ``WorkItem.priority`` first, first in first out among equals: one
  deque per priority present, and ``_top``, the highest non-empty one. With one priority (all
  tasks today) accepting and taking cost a deque append and popleft, as a single deque would;
  a new priority, or a level that empties, costs a pass over the priorities present (few).
  A call handed over and never started goes back to the front of its priority (``push_front``):
  it keeps its place ahead of later arrivals, and no attempt is charged.
- **Not yet due**: a heap keyed ``(due, seq)``: new tasks whose ``not_before`` has not come,
  and crash retries waiting out their backoff (started tasks: the backlog counts them as
  running, outside the bound). ``release_due`` moves the due ones to the ready part: a crash
  retry to the front of its priority (it was taken before everything waiting), a new task to
  the back (it arrives when it is due).

- **Expiring**: a heap keyed ``(expires_at, seq)`` of every task accepted with an expiry,
  including those that wait outside the order (``waits``: for dependencies, or set aside by a
  limit). ``release_due`` takes out those still waiting whose time has come, here or there
  (and a crash retry due after its expiry): the backlog ends them expired. One found expired
  as it is taken (``take``: accepted while the dispatcher was past its timers) is set aside
  for the same.

Prefetch (a call handed to a worker that is busy, or behind the first call of a batch) must
not defeat the order or the expiry: ``take`` puts in such a position neither a task with an
expiry (it could wait there past its time, out of reach) nor any task while tasks of a
priority other than 0 are ready (``mixed``: one arriving later must not wait behind it); the
dispatcher then recalls what busy workers hold unstarted (``dispatch``).

Times are the backlog clock's ``monotonic()`` values (``clock``).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

from taskorch._parent.task import TaskState, WorkItem

if TYPE_CHECKING:
    from taskorch._parent.limits import Limits


class Gate(Protocol):
    """What lets a task leave now (``breaker.Admission``: the circuit breaker's quota)."""

    def allows(self, item: WorkItem) -> bool: ...

    def count(self, item: WorkItem) -> None: ...


class TaskOrder:
    """Ready tasks by (priority, arrival), and tasks not due yet by (due time, arrival)."""

    __slots__ = ("_levels", "_priorities", "_top", "_top_priority", "_later", "_seq",
                 "_expiring", "_expired", "delayed", "_compact_at")

    def __init__(self) -> None:
        # Ready tasks per priority, each in the order they leave; level 0 is always there.
        self._levels: dict[int, deque[WorkItem]] = {0: deque()}
        self._priorities: list[int] = [0]  # the keys of _levels, highest first
        # The highest non-empty level (level 0's deque while none is non-empty), and its key.
        self._top: deque[WorkItem] = self._levels[0]
        self._top_priority = 0
        # Tasks not due yet: (due, seq, item); seq keeps arrivals in order (items never compare).
        self._later: list[tuple[float, int, WorkItem]] = []
        self._seq = itertools.count()
        # Tasks accepted with an expiry: (expires_at, seq, item); entries of tasks no longer
        # here are skipped when they come up.
        self._expiring: list[tuple[float, int, WorkItem]] = []
        self._expired: list[WorkItem] = []  # found expired by ``take``: out of the order
        # Entries of tasks that ended keep their items (and futures) until their expiry time:
        # past this many entries, those are dropped (``_compact``; amortized O(1) a push).
        self._compact_at = 4096
        self.delayed = 0  # new tasks in ``_later`` (not due yet; crash retries not counted)

    # -- putting in ----------------------------------------------------------------------

    def push(self, item: WorkItem, now: float, tracked: bool = False) -> bool:
        """Accept ``item``: ready, or not before ``item.not_before``. True if it is now the
        first task due (whoever waits for the next due time must look again). ``tracked``:
        its expiry is in the heap already (``track_expiry``: it waited for dependencies)."""
        first = item.expires_at is not None and not tracked and self.track_expiry(item)
        not_before = item.not_before
        if not_before is not None and not_before > now:
            self.delayed += 1
            return self.later(item, not_before) or first
        if item.priority == self._top_priority:
            self._top.append(item)
        else:
            self._level(item.priority).append(item)
        return first

    def track_expiry(self, item: WorkItem) -> bool:
        """Watch ``item``'s expiry (if any), wherever it waits; True if it is now the first
        time due."""
        expires_at = item.expires_at
        if expires_at is None:
            return False
        heapq.heappush(self._expiring, (expires_at, next(self._seq), item))
        if len(self._expiring) >= self._compact_at:
            self._compact()
        return self._expiring[0][2] is item

    def _compact(self) -> None:
        """Drop the expiry entries of tasks that ended, and rebuild the heap."""
        live = (TaskState.QUEUED, TaskState.RUNNING)
        self._expiring = [entry for entry in self._expiring if entry[2].state in live]
        heapq.heapify(self._expiring)
        self._compact_at = max(4096, 2 * len(self._expiring))

    def push_front(self, items: list[WorkItem],
                   clock: Callable[[], float] | None = None) -> None:
        """Calls handed over and never started: back to the front of their priority, in
        order; with a ``clock``, one past its expiry is set aside (``release_due``)."""
        if clock is not None and any(item.expires_at is not None for item in items):
            now = clock()
            self._expired += [i for i in items if i.expires_at is not None and i.expires_at <= now]
            items = [i for i in items if i.expires_at is None or i.expires_at > now]
        for item in reversed(items):
            if item.priority == self._top_priority:
                self._top.appendleft(item)
            else:
                self._level(item.priority).appendleft(item)

    def later(self, item: WorkItem, due: float) -> bool:
        """``item`` waits until ``due``; True if it is now the first task due."""
        heapq.heappush(self._later, (due, next(self._seq), item))
        return self._later[0][2] is item

    def _level(self, priority: int) -> deque[WorkItem]:
        """The ready deque of ``priority`` (made if new); ``_top`` follows a higher one."""
        level = self._levels.get(priority)
        if level is None:
            level = self._levels[priority] = deque()
            self._priorities.append(priority)
            self._priorities.sort(reverse=True)
        if priority > self._top_priority or not self._top:
            self._top, self._top_priority = level, priority
        return level

    def _retop(self) -> None:
        """The top level emptied (or levels changed): find the highest non-empty one, and
        drop the empty levels but level 0."""
        if len(self._priorities) == 1:
            return  # level 0 alone: it stays the top, empty or not
        self._priorities = [p for p in self._priorities if p == 0 or self._levels[p]]
        for priority in list(self._levels):
            if priority not in self._priorities:
                del self._levels[priority]
        self._top_priority = next((p for p in self._priorities if self._levels[p]), 0)
        self._top = self._levels[self._top_priority]

    # -- taking out ----------------------------------------------------------------------

    def take(self, limit: int, gate: Gate | None, budget: int | None,
             first_may_exceed: bool, now: float | None = None,
             plain_after: int | None = None, limits: Limits | None = None) -> list[WorkItem]:
        """Up to ``limit`` ready tasks in order, as ``gate`` allows (None: all); with a
        ``budget`` (payload bytes), a task that would cross it stays unless it is the first and
        ``first_may_exceed``. ``plain_after``: the calls from that position on are prefetched
        (see the module docstring). ``now``: set aside a task expired by then. ``limits``: a
        task over its name's limit is set aside there (``limits``), the others go on.
        The dispatcher's hand-over: this loop runs per task."""
        taken: list[WorkItem] = []
        size = 0
        top = self._top
        if plain_after is not None and (self._top_priority != 0 or len(self._priorities) > 1):
            limit = min(limit, plain_after)  # mixed: no prefetch at all
        while top and len(taken) < limit:
            item = top[0]
            if budget is not None and size + len(item.payload) > budget and (
                    taken or not first_may_exceed):
                break
            if item.expires_at is not None:
                if plain_after is not None and len(taken) >= plain_after:
                    break  # a prefetch position: not for a task with an expiry
                if now is not None and item.expires_at <= now:
                    top.popleft()
                    self._expired.append(item)
                    if not top:
                        self._retop()
                        top = self._top
                    continue
            if gate is not None and not gate.allows(item):
                break  # held back by the circuit breaker (HOLD mode)
            if limits is not None and item.name in limits.by_name:
                if plain_after is not None and len(taken) >= plain_after:
                    break  # a prefetch position: its slot would be held by a waiting call
                if not limits.admit(item):
                    top.popleft()  # (set aside there)
                    if not top:
                        self._retop()
                        top = self._top
                    continue
            if gate is not None:
                gate.count(item)
            top.popleft()
            size += len(item.payload)
            taken.append(item)
            if not top:
                self._retop()
                top = self._top
        return taken

    def release_due(self, now: float, outside: Callable[[dict[int, WorkItem]], list[WorkItem]]
                    ) -> list[WorkItem]:
        """Move the tasks due by ``now`` to the ready part (see the module docstring), and
        take out those that expired by then: returned, for the backlog to end them.
        ``outside`` takes out, of the expired ones not here, those waiting elsewhere
        (``waits.Waits.remove``); the others were handed over."""
        expired, self._expired = self._expired, []
        later = self._later
        retries: list[WorkItem] = []
        while later and later[0][0] <= now:
            item = heapq.heappop(later)[2]
            if item.expires_at is not None and item.expires_at <= now:
                self.delayed -= item.state is TaskState.QUEUED
                expired.append(item)
            elif item.state is TaskState.QUEUED:
                self.delayed -= 1
                self._level(item.priority).append(item)
            else:
                retries.append(item)
                if item.expires_at is not None:  # (its entry may be gone: it ran meanwhile)
                    heapq.heappush(self._expiring, (item.expires_at, next(self._seq), item))
        self.push_front(retries)  # the first due first
        expiring = self._expiring
        if expiring and expiring[0][0] <= now:
            due: dict[int, WorkItem] = {}
            while expiring and expiring[0][0] <= now:
                item = heapq.heappop(expiring)[2]
                if item.state is TaskState.QUEUED or item.state is TaskState.RUNNING:
                    due[id(item)] = item  # (``remove`` finds those still here)
            if due:
                found = self.remove(due)
                if len(found) < len(due):
                    for item in found:
                        del due[id(item)]
                    found += outside(due)
                expired += found
        return expired

    def next_due(self) -> float | None:
        """When the first task not yet due, or the first expiry, will be (None: none).
        Read by the dispatcher without the lock: list indexes, atomic under the GIL; a
        producer that pushes an earlier one wakes the dispatcher after, so a stale answer is
        corrected."""
        if self._expired:
            return 0.0
        later, expiring = self._later, self._expiring
        if not expiring:
            return later[0][0] if later else None
        if not later:
            return expiring[0][0]
        return min(later[0][0], expiring[0][0])

    def next_delayed(self) -> float | None:
        """When the first new task waiting for its time is due (None: none); a scan."""
        return min((due for due, _, item in self._later if item.state is TaskState.QUEUED),
                   default=None)

    def has_expiring(self) -> bool:
        return bool(self._expiring)

    def mixed(self) -> bool:
        """Are tasks of a priority other than 0 ready (prefetch must not be relied on)?"""
        return self._top_priority != 0 or len(self._priorities) > 1

    def take_new_beyond(self, admit: int) -> list[WorkItem]:
        """Remove the new (queued) ready tasks beyond the first ``admit`` in order; started
        ones (crash retries) stay. For the circuit breaker's FAIL mode."""
        removed: list[WorkItem] = []
        for priority in self._priorities:
            kept: deque[WorkItem] = deque()
            for item in self._levels[priority]:
                if item.state is TaskState.QUEUED and admit <= 0:
                    removed.append(item)
                else:
                    admit -= item.state is TaskState.QUEUED
                    kept.append(item)
            if len(kept) != len(self._levels[priority]):
                self._replace(priority, kept)
        self._retop()
        return removed

    def remove(self, items: dict[int, WorkItem]) -> list[WorkItem]:
        """Remove those of ``items`` (by ``id()``) that wait here, ready or not due yet;
        return them in order. The others were handed over."""
        removed: list[WorkItem] = []
        if len(items) == 1:  # future.cancel(): no need to rebuild anything
            (item,) = items.values()
            try:
                self._levels[item.priority].remove(item)
                removed.append(item)
            except (KeyError, ValueError):  # handed over, or not due yet
                pass
        else:
            for priority in self._priorities:
                kept: deque[WorkItem] = deque()
                for item in self._levels[priority]:
                    (removed if id(item) in items else kept).append(item)
                if len(kept) != len(self._levels[priority]):
                    self._replace(priority, kept)
        if len(removed) < len(items) and self._later:
            later = [entry for entry in self._later if id(entry[2]) not in items]
            if len(later) != len(self._later):
                gone = [e[2] for e in sorted(self._later) if id(e[2]) in items]
                self.delayed -= sum(item.state is TaskState.QUEUED for item in gone)
                removed += gone
                heapq.heapify(later)
                self._later = later
        self._retop()
        return removed

    def _replace(self, priority: int, level: deque[WorkItem]) -> None:
        old = self._levels[priority]
        old.clear()
        old.extend(level)  # (the same deque: `_top` may be it)

    def take_all(self) -> list[WorkItem]:
        """Empty it: the ready tasks in order, then those not due yet, soonest first."""
        items = list(self)
        items += [entry[2] for entry in sorted(self._later)]
        items += self._expired  # (not ended yet: whoever empties it ends them)
        for level in self._levels.values():
            level.clear()
        self._later.clear()
        self._expiring.clear()
        self._expired = []
        self.delayed = 0
        self._retop()
        return items

    # -- looking -------------------------------------------------------------------------

    def __iter__(self) -> Iterator[WorkItem]:
        """The ready tasks, in the order they would leave."""
        for priority in self._priorities:
            yield from self._levels[priority]

    def ready_count(self) -> int:
        if len(self._priorities) == 1:
            return len(self._top)
        return sum(len(level) for level in self._levels.values())

    def holds_any(self) -> bool:
        """Does any task wait here, ready or not due yet?"""
        return bool(self._top) or bool(self._later)

    def oldest_accepted(self) -> float | None:
        """The earliest ``accepted_at`` among the first ready task of each priority (each
        level's first is its oldest), None if none is ready."""
        heads = [level[0].accepted_at for level in self._levels.values() if level]
        return min(heads) if heads else None
