"""Parent process, the dispatcher thread: crash retries waiting out their backoff.

A task whose attempt was lost with its worker (``dispatch.DispatcherCore._lost_locked``) and
that has attempts left waits here for the policy's backoff; then the core puts it back at the
front of the backlog. These are started tasks: outside the backlog's bound.
"""

from __future__ import annotations

import heapq
import itertools
import time
from typing import Any

from taskorch._parent.task import WorkItem


class BackoffQueue:
    """Crash retries waiting out their backoff, soonest first; the dispatcher thread moves the
    due ones to the front of the backlog. They are started tasks, outside the bound."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, WorkItem]] = []
        self._seq = itertools.count()  # ties keep their order; WorkItems do not compare

    def __bool__(self) -> bool:
        return bool(self._heap)

    def push(self, item: WorkItem, delay: float) -> None:
        heapq.heappush(self._heap, (self._clock() + delay, next(self._seq), item))

    def next_due(self) -> float | None:
        """When the soonest retry is due (a ``time.monotonic()`` value), or None."""
        return self._heap[0][0] if self._heap else None

    def take_due(self, now: float) -> list[WorkItem]:
        """The retries due by ``now``, in due order."""
        due = []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap)[2])
        return due

    def take_all(self) -> list[WorkItem]:
        """Empty it (stopping or failing everything); the items in due order."""
        items = [entry[2] for entry in sorted(self._heap)]
        self._heap.clear()
        return items
