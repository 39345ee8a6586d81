"""Credits: backlog slots reserved for one connection, which its client spends without a round
trip (server process; the frames are in ``protocol``).

A credit is a slot held in the orchestrator's backlog (``Intake.reserve_share``): it counts
against ``max_backlog`` from the moment it is granted, so that however many clients spend
credits at once, queued tasks plus held slots never exceed the bound. The client spends one
per ``run()`` (C_SUBMIT with ``credit`` set) and does not wait: the server journals the task
in that slot. Grants: when the client authenticates (S_CREDIT), when half its credits are
spent (S_CREDIT, as soon as the server reads the submission: a client streams on while the
journal commits), and with an S_ACCEPTED when half are spent, it is topped up to CREDIT_MAX, but
each grant takes at most 1/CREDIT_SHARE of the room left, so that credits thin out as the
backlog fills and the last slots go to round trips, where ``QueueFullError`` is decided by
the server. A client out of credits whose credit submissions are still unanswered waits for
their answers (which carry grants) rather than paying a round trip; with none unanswered, it
submits with a round trip, as before credits.

Credits that sit unused in one connection could starve the others; so when a round-trip
submission finds the backlog full while slots are held, the server recalls credits
(S_RECALL to each connection holding some, once until it answers); the client answers with
C_RETURN of the credits it has not spent (its count goes to 0), and the server frees them.
Frames are ordered on each connection, so every credit submission the client sent before its
C_RETURN has been counted already: the server's count after a return is exactly the grants
still in flight to the client. A connection that ends frees what it still holds.

Threads: the connection's reader (spend, give back), the journal's writer (top up after
admitting), another connection's reader (recall), the reader at its end (close). ``_lock``
guards the counts; it is held across ``reserve_share`` and ``unreserve``, which take the
backlog's lock (order: credits, then backlog; the backlog never calls back here), never
across I/O.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskorch._parent.intake import Intake

#: Most credits one connection holds: enough that a client streaming run() calls (~15 us each)
#: does not run dry while its top-up travels back. The top-up is sent when half are spent, by
#: the server's reader at once, but the client's reader thread may wait for the GIL up to the
#: switch interval (5 ms: ~330 run() calls) behind the submitting thread: 256 ran dry (the
#: submitting loop waited for credits half its time, measured), 1,024 does not. Held slots are
#: slots other clients cannot use: CREDIT_SHARE keeps a grant to a quarter of the room left,
#: and a recall frees them when a round trip finds the backlog full.
CREDIT_MAX = 1024
#: A grant takes at most this fraction (1/N) of the backlog's room left.
CREDIT_SHARE = 4


class ConnectionCredits:
    def __init__(self, intake: Intake) -> None:
        self._intake = intake
        self._lock = threading.Lock()
        self.held = 0  # granted to this connection's client, not yet spent or returned
        self._recalled = False  # an S_RECALL is out, not answered yet
        self._closed = False

    def top_up(self) -> int:
        """Grant what the rules allow now; returns how many (0 once closed or recalled)."""
        with self._lock:
            want = CREDIT_MAX - self.held
            if self._closed or self._recalled or want <= 0:
                return 0
            n = self._intake.reserve_share(want, CREDIT_SHARE)
            self.held += n
            return n

    def top_up_when_low(self) -> int:
        """Top up once half are spent: one grant per CREDIT_MAX / 2 tasks at most."""
        if self.held > CREDIT_MAX // 2:  # (read without the lock: top_up() decides under it)
            return 0
        return self.top_up()

    def spend(self) -> bool:
        """A credit submission arrived: its slot is the caller's now. False: none held."""
        with self._lock:
            if self.held <= 0:
                return False
            self.held -= 1
            return True

    def give_back(self, n: int) -> None:
        """C_RETURN: the client's unspent credits."""
        with self._lock:
            n = max(0, min(n, self.held))
            self.held -= n
            self._recalled = False
            self._intake.unreserve(n)

    def recall(self) -> bool:
        """True if an S_RECALL should go to this client now."""
        with self._lock:
            if self.held == 0 or self._recalled or self._closed:
                return False
            self._recalled = True
            return True

    def close(self) -> None:
        """The connection ended: free every slot it held."""
        with self._lock:
            self._closed = True
            n, self.held = self.held, 0
            self._intake.unreserve(n)
