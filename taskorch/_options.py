"""Any process that submits (the application, a ``connect()`` client): one task's place in
order and time, as given to ``options(priority=, delay=, at=, expires=)``.

``Timing`` checks what it is given at the ``options(...)`` call (a ``ValueError`` naming the
option; nothing is enqueued) and resolves it per task, at each ``run()``: a ``delay`` or a
relative ``expires`` counts from that call. Resolved times are wall-clock epoch seconds
(``resolve``): what travels to ``taskorch serve`` and what its journal keeps, so that a restart
neither runs a delayed task early nor an expired one late. The backlog converts them to its
clock's ``monotonic()`` at acceptance (``parent.backlog``).
"""

from __future__ import annotations

import datetime
import math
import time
from typing import NamedTuple, Union

#: What ``delay`` and a relative ``expires`` take: seconds, or a ``timedelta``.
Duration = Union[float, int, datetime.timedelta]
#: What ``at`` takes (and ``expires``, absolute): an aware ``datetime``, or epoch seconds.
Moment = Union[float, int, datetime.datetime]


class Resolved(NamedTuple):
    """One task's timing, resolved at its submission (epoch seconds; None: none)."""

    priority: int
    not_before: float | None
    expires: float | None


class Timing:
    """What ``options(priority=, delay=, at=, expires=)`` said, checked (immutable)."""

    __slots__ = ("priority", "_delay", "_at", "_expires_in", "_expires_at")

    def __init__(self, priority: int | None = None, delay: Duration | None = None,
                 at: Moment | None = None,
                 expires: Duration | datetime.datetime | None = None) -> None:
        if priority is None:
            priority = 0
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an int, got {priority!r}")
        if delay is not None and at is not None:
            raise ValueError("give delay or at, not both")
        self.priority = priority
        self._delay = None if delay is None else _seconds("delay", delay)
        self._at = None if at is None else _epoch("at", at)
        self._expires_in: float | None = None
        self._expires_at: float | None = None
        if isinstance(expires, datetime.datetime):
            self._expires_at = _epoch("expires", expires)
        elif expires is not None:
            self._expires_in = _seconds("expires", expires)
        self.resolve(time.time())  # ``expires`` before ``at``: ValueError now

    @property
    def plain(self) -> bool:
        """Nothing beyond the defaults: the task's place is by arrival alone."""
        return (self.priority == 0 and self._delay is None and self._at is None
                and self._expires_in is None and self._expires_at is None)

    def resolve(self, now: float) -> Resolved:
        """The task's times if submitted at ``now`` (epoch seconds)."""
        not_before = (now + self._delay if self._delay is not None
                      else self._at)
        expires = (now + self._expires_in if self._expires_in is not None
                   else self._expires_at)
        if expires is not None and not_before is not None and expires <= not_before:
            raise ValueError(
                f"expires must be after the task's start time (delay/at): it would expire "
                f"{not_before - expires:.3f} s before it may start")
        return Resolved(self.priority, not_before, expires)


def _seconds(option: str, value: object) -> float:
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value) or value < 0:
        raise ValueError(f"{option} must be a finite number of seconds >= 0 or a timedelta, "
                         f"got {value!r}")
    return float(value)


def _epoch(option: str, value: object) -> float:
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"{option} must be an aware datetime (with a tzinfo), got the "
                             f"naive {value!r}")
        return value.timestamp()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value) or value < 0:
        raise ValueError(f"{option} must be an aware datetime or epoch seconds, got {value!r}")
    return float(value)


def check_resolved(priority: object, not_before: object, expires: object) -> Resolved:
    """A submission's timing as it came over the wire (``taskorch serve``): ValueError if bad."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValueError(f"priority must be an int, got {priority!r}")
    for option, value in (("not_before", not_before), ("expires", expires)):
        if value is not None and (isinstance(value, bool) or not isinstance(
                value, (int, float)) or not math.isfinite(value)):
            raise ValueError(f"{option} must be epoch seconds or None, got {value!r}")
    return Resolved(priority, None if not_before is None else float(not_before),  # type: ignore[arg-type]
                    None if expires is None else float(expires))  # type: ignore[arg-type]
