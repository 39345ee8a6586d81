"""``taskorch serve``: one connection's submissions between their slot and their acceptance
(server process; the connection's reader, the asyncio thread, the journal's writer).

A submission holds a backlog slot, then the registry journals it and enqueues it once the
record is committed (``registry._committed``, on the journal's writer). A withdraw (a client's
``run_async()`` cancelled) that arrives in that window used to find the request neither
waiting for room nor accepted, and was ignored: the task was enqueued and ran. Now the window
is tracked here: a withdraw in it marks the request, and at the commit the registry asks the
connection (``Sink.wanted``) and forgets the record instead of enqueuing it (or, for a
submission that joined another's task by its key, does not attach it). A withdraw after that
check and before the connection hears of the acceptance cancels the task if it is the
submission's own (see ``Connection.admitted``), and only stops watching one it joined.
"""

from __future__ import annotations

import threading
from typing import NamedTuple


class Inflight(NamedTuple):
    """A connection's accepted submission whose outcome it waits for: its task, and whether
    the task is its own (``owned``: a withdraw cancels it if it has not started) or another
    submission's that it joined by its key (a withdraw only stops watching it)."""

    task_id: int
    owned: bool


class Admitting:
    """Requests of one connection whose submission is being journaled: req -> withdrawn?

    Guarded by the connection's lock (``lock``), which also guards its accepted requests: a
    request leaves this table and enters that one under one hold, so a withdraw always finds
    it in one of them (``*_locked``: the caller holds ``lock``)."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._withdrawn: dict[int, bool] = {}

    def begin(self, req: int) -> None:
        """A slot is held and the record goes to the journal."""
        with self._lock:
            self._withdrawn[req] = False

    def abandon(self, req: int) -> None:
        """Refused before the journal (the slot was given back)."""
        with self._lock:
            self._withdrawn.pop(req, None)

    def withdraw_locked(self, req: int) -> bool:
        """Mark ``req`` withdrawn if it is being journaled (True), else False."""
        if req not in self._withdrawn:
            return False
        self._withdrawn[req] = True
        return True

    def wanted(self, req: int) -> bool:
        """At the commit: False (and forgotten here) if ``req`` was withdrawn."""
        # Without the lock first (one dict read is atomic): a withdraw that comes after this
        # read would come after the locked one too, and ``end_locked`` sees it either way.
        if not self._withdrawn.get(req, False):
            return True
        with self._lock:
            if not self._withdrawn.get(req, False):
                return True
            del self._withdrawn[req]
            return False

    def end_locked(self, req: int) -> bool:
        """Accepted or refused now: forget ``req``; was it withdrawn meanwhile?"""
        return self._withdrawn.pop(req, False)
