"""Parent process: callers waiting for room in the backlog, first come first served.

``RoomWaiters`` belongs to the ``Backlog`` and is guarded by its lock: every method is called
with it held. Two kinds of waiter: ``run_async()`` and ``reserve_or_wait`` (an asyncio future
and its loop), and blocking producers such as ``map()`` (a ``threading.Event``). A freed slot
wakes one waiter, which then tries again (it may lose the slot to a producer that came first:
the bound never waits for a waiter). A woken waiter that was cancelled meanwhile passes the
wakeup on (``pass_on``, which takes the backlog's lock), so no freed slot is lost.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import TYPE_CHECKING, Callable, Union

if TYPE_CHECKING:  # asyncio costs ~14 ms to import; only run_async() callers need it, and have it
    import asyncio

Waiter = Union["asyncio.Future[None]", threading.Event]


class RoomWaiters:
    __slots__ = ("_waiters", "_pass_on")

    def __init__(self, pass_on: Callable[[], None]) -> None:
        self._waiters: deque[tuple[asyncio.AbstractEventLoop | None, Waiter]] = deque()
        # Takes the backlog's lock and wakes the next waiter (from a waiter's event loop).
        self._pass_on = pass_on

    def __len__(self) -> int:
        return len(self._waiters)

    def event(self) -> threading.Event:
        """A blocking producer's waiter: set when there may be room."""
        event = threading.Event()
        self._waiters.append((None, event))
        return event

    def future(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future on ``loop`` that resolves when there may be room."""
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append((loop, waiter))
        return waiter

    def forget(self, waiter: Waiter) -> bool:
        """Drop ``waiter`` (its caller gave up); False if it was woken already."""
        for i, (_, w) in enumerate(self._waiters):
            if w is waiter:
                del self._waiters[i]
                return True
        return False

    def wake(self, n: int) -> None:
        """Wake the first ``n`` waiters (all of them: ``len(self)``)."""
        while n > 0 and self._waiters:
            loop, waiter = self._waiters.popleft()
            if isinstance(waiter, threading.Event):
                waiter.set()
            else:
                assert loop is not None
                try:
                    loop.call_soon_threadsafe(_deliver, waiter, self._pass_on)
                except RuntimeError:  # that loop is closed: its caller is gone
                    continue
            n -= 1

    def clear(self) -> None:
        self._waiters.clear()


def _deliver(waiter: asyncio.Future[None], pass_on: Callable[[], None]) -> None:
    """On the waiter's loop: wake it, or pass the wakeup on if it was cancelled meanwhile."""
    if waiter.done():
        pass_on()
    else:
        waiter.set_result(None)
