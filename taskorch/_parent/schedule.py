"""Parent process, any thread: what a schedule is, and the rules that decide when it fires
(pure functions of times; the "taskorch-scheduler" thread that applies them is ``scheduler``).

A ``Schedule`` says when (``cron``, five fields read by croniter, in a ``timezone``; or
``every`` so many seconds, on multiples of that period since the epoch, so that ticks fall on
the same instants whenever the process started) and what to do with ticks that cannot run
normally:

- **overlap** (the last run is still queued or running at a tick): ``skip`` it (the default:
  a cleanup job never piles up behind itself), ``queue`` one run to start when the last one
  ends (never more than one waiting), or ``allow`` it to run beside.
- **misfire** (ticks that passed while nothing could fire them: the process was down, or the
  scheduler stalled, found from the last fire time that the state store kept): ``coalesce``
  them into one run (the default), ``skip`` them, or ``catch_up`` with one run each, at most
  ``catch_up_limit``. A tick is on time while it is less than ``MISFIRE_GRACE`` seconds late.
- **jitter**: each run starts up to ``jitter`` seconds after its tick (a random delay, so
  that many processes with one schedule do not all fire at once).

How schedules run, on which thread, and what they remember: ``scheduler``.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import math
import re
from typing import Any, Callable, TypeVar

#: A tick later than this (seconds) when it can first fire counts as missed (see misfire).
MISFIRE_GRACE = 1.0

_E = TypeVar("_E", bound=enum.Enum)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


class Overlap(enum.Enum):
    SKIP = "skip"
    QUEUE = "queue"
    ALLOW = "allow"


class Misfire(enum.Enum):
    COALESCE = "coalesce"
    SKIP = "skip"
    CATCH_UP = "catch_up"


def parse_choice(kind: type[_E], value: object, what: str) -> _E:
    """``value`` as a member of the enum ``kind`` (a member, or its string value)."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in kind)
        raise ValueError(f"{what} must be one of {choices}, got {value!r}") from None


def parse_every(value: float | str) -> float:
    """``every``: seconds, or a string such as ``"30s"``, ``"10m"``, ``"1.5h"``, ``"1d"``."""
    if isinstance(value, bool):
        raise ValueError(f"every must be seconds or a duration such as '10m', got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError(
                f"every must be seconds or a duration such as '30s', '10m', '1h', '1d', "
                f"got {value!r}")
        seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if not seconds > 0 or math.isinf(seconds):
        raise ValueError(f"every must be a positive duration, got {value!r}")
    return seconds


@dataclasses.dataclass(frozen=True, kw_only=True)
class Schedule:
    """When a periodic task fires (see the module docstring)."""

    name: str
    cron: str | None = None
    every: float | None = None  # seconds (``parse_every`` reads "10m" and such)
    timezone: str | None = None  # an IANA name, for cron (default: UTC)
    jitter: float = 0.0
    overlap: Overlap = Overlap.SKIP
    misfire: Misfire = Misfire.COALESCE
    catch_up_limit: int = 10

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"a schedule needs a name, got {self.name!r}")
        if (self.cron is None) == (self.every is None):
            raise ValueError(f"schedule {self.name!r}: give exactly one of cron and every")
        if self.cron is not None:
            from croniter import croniter

            if not isinstance(self.cron, str) or len(self.cron.split()) != 5:
                raise ValueError(f"schedule {self.name!r}: {self.cron!r} is not a cron "
                                 "expression of five fields (minute hour day month weekday)")
            if not croniter.is_valid(self.cron):
                raise ValueError(f"schedule {self.name!r}: cron {self.cron!r}: "
                                 f"{_wrong_cron_field(self.cron)}")
        if self.every is not None:
            object.__setattr__(self, "every", parse_every(self.every))
        if self.timezone is not None:
            if self.cron is None:
                raise ValueError(f"schedule {self.name!r}: timezone applies to cron only")
            _zone(self.timezone, self.name)
        if isinstance(self.jitter, bool) or not isinstance(self.jitter, (int, float)) or not (
                0 <= self.jitter < math.inf):
            raise ValueError(f"schedule {self.name!r}: jitter must be seconds >= 0, "
                             f"got {self.jitter!r}")
        what = f"schedule {self.name!r}:"
        object.__setattr__(self, "overlap", parse_choice(Overlap, self.overlap, f"{what} overlap"))
        object.__setattr__(self, "misfire", parse_choice(Misfire, self.misfire, f"{what} misfire"))
        if isinstance(self.catch_up_limit, bool) or not isinstance(self.catch_up_limit, int) or (
                self.catch_up_limit < 1):
            raise ValueError(f"schedule {self.name!r}: catch_up_limit must be an int >= 1")

    def next_tick(self, after: float) -> float:
        """The first tick strictly after ``after`` (Unix time)."""
        if self.every is not None:
            return (math.floor(after / self.every) + 1) * self.every
        return float(self._cron(after).get_next(float))

    def latest_tick(self, now: float) -> float:
        """The last tick at or before ``now``."""
        if self.every is not None:
            return math.floor(now / self.every) * self.every
        tick = float(self._cron(now).get_prev(float))
        following = self.next_tick(tick)
        return following if following <= now else tick

    def prev_tick(self, before: float) -> float:
        """The last tick strictly before ``before``."""
        if self.every is not None:
            return (math.ceil(before / self.every) - 1) * self.every
        return float(self._cron(before).get_prev(float))

    def _cron(self, at: float) -> Any:
        from croniter import croniter

        zone = _zone(self.timezone or "UTC", self.name)
        return croniter(self.cron, datetime.datetime.fromtimestamp(at, zone))


def _zone(name: str, schedule: str) -> datetime.tzinfo:
    import zoneinfo

    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"schedule {schedule!r}: unknown timezone {name!r}") from exc


def count_ticks(schedule: Schedule, first: float, latest: float, cap: int = 10_000) -> int:
    """How many ticks from ``first`` to ``latest`` (inclusive; counted up to ``cap``)."""
    if schedule.every is not None:
        return int(round((latest - first) / schedule.every)) + 1
    count, tick = 1, first
    while tick < latest and count < cap:
        tick = schedule.next_tick(tick)
        count += 1
    return count


CRON_FIELDS = (("minute", "0-59"), ("hour", "0-23"), ("day", "1-31"), ("month", "1-12"),
               ("weekday", "0-6, Sunday 0 or 7"))


def _wrong_cron_field(cron: str) -> str:
    """Which field of a five-field ``cron`` croniter refuses: each is tried alone."""
    from croniter import croniter

    fields = cron.split()
    for i, (name, valid) in enumerate(CRON_FIELDS):
        alone = " ".join(field if j == i else "*" for j, field in enumerate(fields))
        if not croniter.is_valid(alone):
            return f"the {name} field {fields[i]!r} is out of range or malformed ({valid})"
    return "croniter refuses it (the fields are each valid alone)"


def describe_time(t: float) -> str:
    """A Unix time as the logs and ``--check-config`` show it."""
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC")


def schedule_of(fn: Callable[..., Any], *, name: str | None, cron: str | None,
                every: float | str | None, timezone: str | None, jitter: float, overlap: str,
                misfire: str, catch_up_limit: int) -> Schedule:
    """``TaskOrchestrator.schedule()``'s arguments as a ``Schedule`` (ValueError naming a bad
    one); its name defaults to the function's qualified name."""
    return Schedule(
        name=name or getattr(fn, "__qualname__", None) or repr(fn), cron=cron,
        every=None if every is None else parse_every(every), timezone=timezone,
        jitter=jitter, overlap=parse_choice(Overlap, overlap, "overlap"),
        misfire=parse_choice(Misfire, misfire, "misfire"), catch_up_limit=catch_up_limit)
