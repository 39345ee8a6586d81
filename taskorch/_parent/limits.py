"""Parent process: per-task-name limits (``TaskOrchestrator(limits={name: Limit(...)})``).

``Limits`` belongs to the ``Backlog`` and is guarded by its lock: every method is called with
it held, except ``next_due`` (a float read without it, as ``TaskOrder.next_due``). It is
consulted as the dispatcher takes ready tasks (``order.TaskOrder.take``): a task whose name is
over its limit is set aside here (``admit`` returns False), still queued and in the bound,
while the tasks behind it go on. It goes back to the front of the ready tasks when it may
start: one task per slot freed (``free``: a task of that name ended, came back unstarted, or
backs off before a crash retry) and one per token (``release_due``).

A task sent back so is *released*: it claims that slot or token until it is taken
(``admit``: it takes them, or, beaten to them by another task of its name, is set aside
again, first) or ends unstarted (``dropped``: a cancel, an expiry; the next one set aside
goes instead). While a released task of a name is out, no token releases another; else,
while tasks wait for their name's token, ``next_due`` holds the time it is back, set as a
token is used: the dispatcher comes back then, even while every task of that name runs on.

- **Concurrency**: a task holds its name's slot from the moment it is handed to a worker
  (``WorkItem.limit``) until it ends or comes back: a prefetched call counts, so the limit
  holds for what runs, never exceeded, at the cost of a slot held by a call waiting in a
  busy worker (``order.take`` keeps limited tasks out of prefetch positions).
- **Rate**: a token bucket that holds one token: a start may happen ``interval`` seconds after
  the previous one, never sooner, and time not used is not saved up (no burst). The times
  are the backlog clock's ``monotonic()`` (injectable: the tests measure a rate on it).
"""

from __future__ import annotations

from collections import deque
from typing import Callable

from taskorch._options import Limit
from taskorch._parent.task import WorkItem

#: ``WorkItem.waiting_for`` while a task waits here.
LIMIT = "limit"


class NameLimit:
    """One task name's limit and its state (the backlog's lock)."""

    __slots__ = ("concurrency", "interval", "running", "next_at", "held", "released")

    def __init__(self, limit: Limit) -> None:
        self.concurrency = limit.concurrency
        self.interval = limit.interval
        self.running = 0  # tasks of this name handed over or running (holding a slot)
        self.next_at = float("-inf")  # when the bucket's one token is back (monotonic)
        self.held: deque[WorkItem] = deque()  # set aside, in the order they were taken
        # Sent back to the ready tasks (see the module docstring), not taken nor ended yet.
        self.released: set[WorkItem] = set()


class Limits:
    """The limits of one backlog, by task name (``figures.name_of``: module.qualname)."""

    __slots__ = ("by_name", "_monotonic", "next_due")

    def __init__(self, limits: dict[str, Limit], monotonic: Callable[[], float]) -> None:
        self.by_name = {name: NameLimit(limit) for name, limit in limits.items()}
        self._monotonic = monotonic
        # The first time a token is back for a name with tasks set aside (None: none); read
        # without the lock by the dispatcher (``Backlog.next_due``).
        self.next_due: float | None = None

    def admit(self, item: WorkItem) -> bool:
        """May ``item`` be handed over now? If so it takes its name's slot and token; if not,
        it is set aside here (False): the caller drops it from the ready tasks."""
        limit = self.by_name.get(item.name)
        if limit is None or item.limit is not None:
            return True
        first = item in limit.released  # (a released task set aside again goes first)
        limit.released.discard(item)
        if limit.concurrency is not None and limit.running >= limit.concurrency:
            return self._hold(limit, item, first)
        if limit.interval is not None:
            now = self._monotonic()
            if now < limit.next_at:
                self._due(limit.next_at)
                return self._hold(limit, item, first)
            limit.next_at = max(now, limit.next_at) + limit.interval
            if limit.held:
                self._due(limit.next_at)  # the next token is for them
        limit.running += 1
        item.limit = limit
        return True

    @staticmethod
    def _hold(limit: NameLimit, item: WorkItem, first: bool) -> bool:
        item.waiting_for = LIMIT
        if first:
            limit.held.appendleft(item)
        else:
            limit.held.append(item)
        return False

    def _due(self, at: float) -> None:
        if self.next_due is None or at < self.next_due:
            self.next_due = at

    def free(self, item: WorkItem) -> list[WorkItem]:
        """``item`` gives its slot back: the first task set aside, to go back to the ready
        tasks (the caller puts it there) if it may start (its token may come later:
        ``release_due``)."""
        limit: NameLimit = item.limit
        item.limit = None
        limit.running -= 1
        return self._release_next(limit, self._monotonic())

    def dropped(self, item: WorkItem) -> list[WorkItem]:
        """``item`` ended unstarted (cancelled, expired): if it was released, the slot or
        token it claimed goes to the next task set aside (returned, for the ready tasks)."""
        limit = self.by_name.get(item.name)
        if limit is None or item not in limit.released:
            return []
        limit.released.remove(item)
        return self._release_next(limit, self._monotonic())

    def release_due(self, now: float) -> list[WorkItem]:
        """One task per name whose token is back by ``now`` (and that has a slot free)."""
        released: list[WorkItem] = []
        self.next_due = None
        for limit in self.by_name.values():
            if limit.held and limit.interval is not None:
                released += self._release_next(limit, now)
        return released

    def _release_next(self, limit: NameLimit, now: float) -> list[WorkItem]:
        """The first task set aside for ``limit`` if a slot is free and its token is back by
        ``now`` (released tasks claim theirs); if only the token is missing, note when it
        comes back (``next_due``)."""
        if not limit.held or (limit.concurrency is not None
                              and limit.running + len(limit.released) >= limit.concurrency):
            return []
        if limit.interval is not None:
            if limit.released:
                return []  # the token is claimed: that task's ``admit`` or end moves on
            if limit.next_at > now:
                self._due(limit.next_at)
                return []
        item = limit.held.popleft()
        item.waiting_for = None
        limit.released.add(item)
        return [item]

    @staticmethod
    def _release(item: WorkItem) -> WorkItem:
        item.waiting_for = None
        return item

    def remove(self, items: dict[int, WorkItem]) -> list[WorkItem]:
        """Take out those of ``items`` (by ``id()``) set aside here (a cancel, an expiry)."""
        removed: list[WorkItem] = []
        if not any(item.waiting_for == LIMIT for item in items.values()):
            return removed
        for limit in self.by_name.values():
            if limit.held and any(id(item) in items for item in limit.held):
                removed += [self._release(i) for i in limit.held if id(i) in items]
                limit.held = deque(i for i in limit.held if id(i) not in items)
        return removed

    def holds_any(self) -> bool:
        return any(limit.held for limit in self.by_name.values())

    def take_all(self) -> list[WorkItem]:
        """Empty it (stop): every task set aside."""
        items = [self._release(i) for limit in self.by_name.values() for i in limit.held]
        for limit in self.by_name.values():
            limit.held.clear()
            limit.released.clear()
        self.next_due = None
        return items
