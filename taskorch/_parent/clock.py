"""Parent process, any thread: the one clock that the backlog's order and time keeping read.

The backlog (not-before times, crash retries waiting out their backoff, stop()'s deadline),
the dispatcher core's timers, the circuit breaker and the schedule thread read the
orchestrator's ``Clock``; tests of the backlog alone inject one they move by hand.

Not here: the backends' worker timers (hard timeouts, SIGKILL escalation, respawns) read
``time.monotonic`` directly, the same values as ``SYSTEM_CLOCK.monotonic``. Hazard: the core
hands its clock's ``now`` to the pool, and a pool compares an attempt's start (stamped by the
rules on this clock) with its own deadlines; both agree only because an orchestrator always
runs on ``SYSTEM_CLOCK``. An injected clock is for the backlog alone (its tests), until the
pools read this one too. Retries inside
a worker (tenacity's waits between attempts, in the worker process) keep the worker's own
time: they never come back to the parent, which is what makes them cheap.
"""

from __future__ import annotations

import time
from typing import Callable


class Clock:
    """``monotonic()``: seconds for intervals and deadlines (``time.monotonic`` by default);
    ``time()``: wall-clock seconds since the epoch, for calendars (``time.time``)."""

    __slots__ = ("monotonic", "time")

    def __init__(self, monotonic: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time) -> None:
        # Plain attributes, not methods: reading one costs what ``time.monotonic()`` costs.
        self.monotonic = monotonic
        self.time = wall


#: The system's clocks: what every orchestrator uses.
SYSTEM_CLOCK = Clock()
