"""A client's credits: backlog slots the server holds for its session, spent by ``run()`` and
``with_wait().run()`` without a round trip (application's process; the server's side, and the
rules of grants and recalls, are ``_service/server/credits``).

Threads: the callers' (``take``; ``spend_locked``: run()'s common case, in the session's own
hold of the lock), the session's reader (``grant``, ``return_all``, ``clear``), ``accepted()``
waiting for an answer (``wait``). Everything here is guarded by the session's
lock, which ``Credits`` shares (its condition is built on it), and never held across I/O.
"""

from __future__ import annotations

import threading
from typing import Callable


class Credits:
    def __init__(self, lock: threading.Lock) -> None:
        self.held = 0  # backlog slots the server holds for us
        self.inflight = 0  # credit submissions sent, not answered yet
        self.change = threading.Condition(lock)  # more credits, an answer, or the link's end

    def take(self, wait: float | None, usable: Callable[[], bool],
             stopped: Callable[[], bool]) -> bool | None:
        """Spend a credit (True); False: none held nor coming (a round trip then); None: still
        none after ``wait`` s. Out of credits while credit submissions are unanswered, their
        answers (or S_CREDIT) bring more unless the backlog is full: wait for them rather than
        pay a group commit. ``usable()``: the link is up; ``stopped()``: the session ends
        (both read under the lock)."""
        with self.change:
            if self.held > 0 and usable():  # (the common case: no wait, no predicate to build)
                return self.spend_locked()
            if not self.change.wait_for(
                    lambda: self.held > 0 or self.inflight == 0 or not usable() or stopped(),
                    wait):
                return None
            credit = self.held > 0 and usable()
            self.held -= credit
            self.inflight += credit
        return credit

    def spend_locked(self) -> bool:
        """Spend a credit if one is held (the session's lock held: run()'s common case, in
        the same hold as its request's registration); False: none held."""
        if self.held > 0:
            self.held -= 1
            self.inflight += 1
            return True
        return False

    def grant(self, n: int, answered: int = 0) -> None:
        """``n`` more credits; ``answered`` credit submissions answered (reader thread, or a
        caller giving back the credit of a call that did not pickle)."""
        with self.change:
            self.held += n
            self.inflight = max(0, self.inflight - answered)
            self.change.notify_all()

    def return_all(self) -> int:
        """S_RECALL: every credit held, given back (the count to send in C_RETURN)."""
        with self.change:
            n, self.held = self.held, 0
        return n

    def clear_locked(self) -> None:
        """The link is lost: the server frees what it granted (the session's lock held)."""
        self.held = self.inflight = 0
        self.change.notify_all()
