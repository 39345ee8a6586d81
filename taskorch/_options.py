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
from concurrent.futures import Future
from typing import Any, Iterable, NamedTuple, Union

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


def timing_of(priority: int | None, delay: Duration | None, at: Moment | None,
              expires: Duration | datetime.datetime | None) -> Timing | None:
    """``options()``' timing, checked; None when none is given (``options(key=...)``, say:
    then nothing is checked at the call nor resolved per task)."""
    if priority is None and delay is None and at is None and expires is None:
        return None
    return Timing(priority, delay, at, expires)


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


_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}


class Limit:
    """``TaskOrchestrator(limits={"myapp.jobs.purge": Limit(concurrency=1, rate="10/s")})``:
    at most ``concurrency`` tasks of that name at once, and at most ``rate`` starts ("N/s",
    "N/m" or "N/h"), spread evenly: a token bucket that holds one token, so no burst (frozen).
    A task over its limit waits in the backlog (in its bound) while other tasks overtake it."""

    __slots__ = ("concurrency", "rate", "interval")

    concurrency: int | None
    rate: str | None
    interval: float | None  # seconds between two starts (None: no rate)

    def __init__(self, concurrency: int | None = None, rate: str | None = None) -> None:
        if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(
                concurrency, int) or concurrency < 1):
            raise ValueError(f"Limit concurrency must be an int >= 1 or None, got {concurrency!r}")
        interval = None if rate is None else parse_rate(rate)
        if concurrency is None and rate is None:
            raise ValueError("a Limit needs a concurrency, a rate, or both")
        object.__setattr__(self, "concurrency", concurrency)
        object.__setattr__(self, "rate", rate)
        object.__setattr__(self, "interval", interval)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("a Limit is frozen")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Limit) and other.concurrency == self.concurrency
                and other.interval == self.interval)

    def __hash__(self) -> int:
        return hash((self.concurrency, self.interval))

    def __repr__(self) -> str:
        return f"Limit(concurrency={self.concurrency!r}, rate={self.rate!r})"


def parse_rate(rate: object) -> float:
    """``"10/s"``, ``"30/m"``, ``"100/h"``: the seconds between two starts; ValueError."""
    count, _, per = rate.partition("/") if isinstance(rate, str) else ("", "", "")
    try:
        n = int(count.strip())
    except ValueError:
        n = 0
    if n < 1 or per.strip() not in _PER:
        raise ValueError(f"Limit rate must be 'N/s', 'N/m' or 'N/h' with N >= 1, got {rate!r}")
    return _PER[per.strip()] / n


def check_limits(limits: object) -> dict[str, Limit]:
    """``limits=`` of an orchestrator: task names (module.qualname) to ``Limit``s."""
    if limits is None:
        return {}
    if not isinstance(limits, dict):
        raise ValueError(f"limits must be a dict of task names to taskorch.Limit, got {limits!r}")
    for name, limit in limits.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"limits: a task name must be a non-empty str, got {name!r}")
        if not isinstance(limit, Limit):
            raise ValueError(f"limits[{name!r}] must be a taskorch.Limit, got {limit!r}")
    return dict(limits)


def check_key(key: object) -> str | None:
    """``options(key=...)``: a non-empty str (or None)."""
    if key is not None and (not isinstance(key, str) or not key or len(key) > 1024):
        raise ValueError(f"key must be a non-empty str of at most 1024 characters, got {key!r}")
    return key


def check_after(after: object, owner: object, *, ids: bool = False,
                most: int | None = None) -> tuple[Any, ...]:
    """``options(after=...)``, for an orchestrator and for a client alike: a list of futures
    of ``owner``'s tasks (``TaskFuture.owner``: an orchestrator's backlog, a client's
    session), and with ``ids`` (a client's) task ids too, ints >= 1; at most ``most``. Each
    once, in order. ValueError naming what is wrong (nothing is enqueued)."""
    what = "futures or task ids" if ids else "futures"
    if isinstance(after, (Future, str, bytes)) or not isinstance(after, Iterable):
        raise ValueError(f"after must be a list of {what}, got {after!r}")
    items: dict[object, Any] = {}
    for dependency in after:
        if ids and isinstance(dependency, int) and not isinstance(dependency, bool):
            if dependency < 1:
                raise ValueError(f"after: {dependency!r} is not a task id (ids are ints >= 1)")
            items[dependency] = dependency
            continue
        if not isinstance(dependency, Future) or getattr(dependency, "owner", None) is not owner:
            raise ValueError(
                f"after: {dependency!r} is not a future of this client's tasks nor a task id; "
                "a task can only run after tasks of the same server (futures this client's "
                "run() returned, or ids from future.task_id)" if ids else
                f"after: {dependency!r} is not a future of this orchestrator's tasks; a task "
                "can only run after tasks of the same orchestrator (or, on a client, of the "
                "same server)")
        items[id(dependency)] = dependency
    if most is not None and len(items) > most:
        raise ValueError(f"after: {len(items)} tasks, over the {most} one task may run after")
    return tuple(items.values())
