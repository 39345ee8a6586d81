"""Parent process: periodic tasks on a running orchestrator: one "taskorch-scheduler" thread per
orchestrator that has schedules applies the rules of ``schedule`` (when a schedule fires, what
overlap and misfire do) and submits each run through the orchestrator's ``Intake``.

A tick that finds the backlog full is not dropped: it waits, logged once, and is offered again
every ``FULL_RETRY`` seconds (its overlap rule still applies). Each fire and each outcome is
given to the ``StateStore`` (in memory by default; ``taskorch serve`` keeps it in its journal),
so a restart neither runs a schedule twice nor forgets one whose tick fell in the downtime.

Threads and locks: the scheduler thread wakes at the next due time (a ``Condition`` wait, with
wakeups from ``add``/``trigger``/``stop``) and fires through the orchestrator's ``Intake``
(never blocking: ``offer``). Outcomes arrive in the futures' done-callbacks (the
"taskorch-callbacks" thread). ``_lock`` guards the jobs' state; it is never held while a task
is offered or a store is written. ``run_due(now)`` is the whole firing rule as one step, which
tests drive with a clock of their own instead of the thread.

Time: ``clock`` gives wall-clock seconds (ticks are calendar instants); an orchestrator passes
its backlog's ``Clock.time``, the one clock that also keeps the backlog's due times.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Protocol

from taskorch._errors import OrchestratorBrokenError, OrchestratorClosedError, QueueFullError
from taskorch._parent.schedule import (
    MISFIRE_GRACE,
    Misfire,
    Overlap,
    Schedule,
    count_ticks,
    describe_time,
)
from taskorch._policy import Policy

if TYPE_CHECKING:
    from taskorch._parent.intake import Intake
    from taskorch._parent.task import TaskFuture

log = logging.getLogger("taskorch")

#: A tick that found the backlog full is offered again after this many seconds.
FULL_RETRY = 1.0

_when = describe_time


class StateStore(Protocol):
    """Where a scheduler keeps each schedule's last fire (``taskorch serve``: its journal)."""

    def last_fire(self, name: str) -> float | None: ...

    def record_fire(self, name: str, tick: float) -> None: ...

    def record_outcome(self, name: str, outcome: str, seconds: float | None) -> None: ...


class MemoryStore:
    """The default store: forgotten with the process."""

    def __init__(self) -> None:
        self._fires: dict[str, float] = {}

    def last_fire(self, name: str) -> float | None:
        return self._fires.get(name)

    def record_fire(self, name: str, tick: float) -> None:
        self._fires[name] = tick

    def record_outcome(self, name: str, outcome: str, seconds: float | None) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class ScheduleStatus:
    """One schedule's state, as ``status()`` reports it (Unix times)."""

    name: str
    next_run: float | None
    last_run: float | None  # the tick of the last fire
    last_outcome: str | None  # "succeeded", "failed: <type>: <message>", "skipped: ..."
    last_seconds: float | None
    running: bool
    last_success: float | None = None  # when a run last succeeded (its outcome arrived)

    def __repr__(self) -> str:  # the times readable, not epoch seconds
        def when(t: float | None) -> str:
            return "None" if t is None else f"'{describe_time(t)}'"

        return (f"ScheduleStatus(name={self.name!r}, next_run={when(self.next_run)}, "
                f"last_run={when(self.last_run)}, last_outcome={self.last_outcome!r}, "
                f"last_seconds={self.last_seconds!r}, running={self.running!r}, "
                f"last_success={when(self.last_success)})")


class ScheduledTask:
    """The handle ``TaskOrchestrator.schedule()`` returns."""

    def __init__(self, scheduler: Scheduler, name: str) -> None:
        self._scheduler = scheduler
        self.name = name

    def status(self) -> ScheduleStatus:
        for status in self._scheduler.status():
            if status.name == self.name:
                return status
        raise KeyError(f"schedule {self.name!r} was cancelled")

    def trigger(self) -> TaskFuture | None:
        """Run it now, outside its ticks."""
        return self._scheduler.trigger(self.name)

    def cancel(self) -> None:
        """No more runs (one already submitted goes on)."""
        self._scheduler.remove(self.name)

    def __repr__(self) -> str:
        return f"<ScheduledTask {self.name!r}>"


class _Job:
    """A schedule with its call and state (guarded by the scheduler's lock)."""

    def __init__(self, schedule: Schedule, fn: Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any], policy: Policy | None, next_due: float) -> None:
        self.schedule = schedule
        self.fn, self.args, self.kwargs, self.policy = fn, args, kwargs, policy
        self.next_tick = next_due  # the tick the next run belongs to
        self.next_due = next_due  # when it fires: the tick plus its jitter
        self.future: TaskFuture | None = None  # the last run's
        self.queued_tick: float | None = None  # overlap QUEUE: one run waits for the last one
        self.waiting_tick: float | None = None  # a run that found the backlog full...
        self.waiting_since = 0.0  # ... when it last tried
        self.last_run: float | None = None
        self.last_outcome: str | None = None
        self.last_seconds: float | None = None
        self.last_success: float | None = None

    def busy(self) -> bool:
        return self.future is not None and not self.future.done()


class Scheduler:
    """The schedules of one orchestrator (see the module docstring)."""

    def __init__(
        self, intake: Intake, *, store: StateStore | None = None,
        clock: Callable[[], float] = time.time, rand: Callable[[], float] = random.random,
        thread: bool = True,
    ) -> None:
        self._intake = intake
        self._store: StateStore = store if store is not None else MemoryStore()
        self._clock = clock
        self._rand = rand
        self._lock = threading.Condition(threading.Lock())
        self._jobs: dict[str, _Job] = {}
        self._stopped = False
        self._thread: threading.Thread | None = None
        if thread:
            self._thread = threading.Thread(target=self._run_guarded, name="taskorch-scheduler",
                                            daemon=True)
            self._thread.start()

    # -- steering (any thread) ------------------------------------------------------------

    def add(self, schedule: Schedule, fn: Callable[..., Any], args: tuple[Any, ...] = (),
            kwargs: dict[str, Any] | None = None, policy: Policy | None = None) -> None:
        """Add a schedule; its call is checked now (it must pickle). The first tick is the
        first after the last fire the store remembers (a misfire if that passed), else the
        first after now."""
        if not callable(fn):
            raise TypeError(f"schedule {schedule.name!r}: the task must be callable")
        if policy is not None and not isinstance(policy, Policy):
            raise ValueError(f"schedule {schedule.name!r}: policy must be a taskorch.Policy")
        self._intake.prepare_call(fn, args, kwargs or {}, policy)  # SerializationError now
        last = self._store.last_fire(schedule.name)
        now = self._clock()
        first = schedule.next_tick(last if last is not None else now)
        with self._lock:
            if self._stopped:
                raise OrchestratorClosedError("the scheduler was stopped")
            if schedule.name in self._jobs:
                raise ValueError(f"a schedule named {schedule.name!r} exists already")
            job = _Job(schedule, fn, args, dict(kwargs or {}), policy, first)
            job.next_due = first + self._rand() * schedule.jitter
            job.last_run = last
            self._jobs[schedule.name] = job
            self._lock.notify_all()

    def remove(self, name: str) -> None:
        with self._lock:
            if self._jobs.pop(name, None) is None:
                raise KeyError(f"no schedule named {name!r}")

    def trigger(self, name: str) -> TaskFuture | None:
        """Run a schedule now, outside its ticks (its overlap rule does not apply: asked for).
        Returns the future, None if the backlog was full and the run dropped (logged)."""
        with self._lock:
            job = self._jobs.get(name)
            if job is None:
                raise KeyError(f"no schedule named {name!r}; there are: "
                               f"{', '.join(sorted(self._jobs)) or 'none'}")
        return self._offer(job, self._clock(), "triggered")

    def status(self) -> list[ScheduleStatus]:
        with self._lock:
            return [ScheduleStatus(j.schedule.name, j.next_due, j.last_run, j.last_outcome,
                                   j.last_seconds, j.busy(), j.last_success)
                    for j in self._jobs.values()]

    def stop(self) -> None:
        """No more fires (runs already offered go on). Idempotent."""
        with self._lock:
            self._stopped = True
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    # -- the rule, one step -----------------------------------------------------------------

    def run_due(self, now: float) -> float | None:
        """Fire what is due at ``now``; returns when the next fire is due (None: no schedule)."""
        fires: list[tuple[_Job, float, str]] = []
        with self._lock:
            if self._stopped:
                return None
            for job in self._jobs.values():
                fires += self._due_locked(job, now)
        for job, tick, why in fires:
            self._offer(job, tick, why)
        with self._lock:
            return min((j.next_due for j in self._jobs.values()), default=None)

    def _due_locked(self, job: _Job, now: float) -> list[tuple[_Job, float, str]]:
        """The runs ``job`` owes at ``now`` (the overlap, misfire and full-backlog rules)."""
        schedule = job.schedule
        owed: list[tuple[_Job, float, str]] = []
        if job.queued_tick is not None and not job.busy():
            owed.append((job, job.queued_tick, "queued behind the last run"))
            job.queued_tick = None
        if job.waiting_tick is not None:  # a run that found the backlog full
            if now - job.waiting_since >= FULL_RETRY:
                owed.append((job, job.waiting_tick, "offered again: the backlog was full"))
                job.waiting_tick = None
            elif now >= job.next_due:  # its ticks pass while it waits: it stands for them
                self._advance_locked(job, now)
            return owed
        if now < job.next_due:
            return owed
        first, latest = job.next_tick, schedule.latest_tick(now)
        late = now - job.next_due >= MISFIRE_GRACE
        recent = [latest]  # the last ticks owed, at most catch_up_limit
        while len(recent) < schedule.catch_up_limit:
            before = schedule.prev_tick(recent[0])
            if before < first:
                break
            recent.insert(0, before)
        owed_ticks = count_ticks(schedule, first, latest)
        self._advance_locked(job, now)
        if owed_ticks == 1 and not late:
            runs = [latest]
        elif schedule.misfire is Misfire.SKIP:
            runs = [latest] if now - latest < MISFIRE_GRACE else []
            log.warning("schedule %r: %d tick(s) missed since %s: skipped (misfire=skip)",
                        schedule.name, owed_ticks - len(runs), _when(first))
        elif schedule.misfire is Misfire.CATCH_UP:
            runs = recent
            log.warning("schedule %r: %d tick(s) missed since %s: catching up with %d run(s)",
                        schedule.name, owed_ticks, _when(first), len(runs))
        else:
            runs = [latest]
            log.warning("schedule %r: %d tick(s) missed since %s: one run for them "
                        "(misfire=coalesce)", schedule.name, owed_ticks, _when(first))
        if not runs:
            return owed
        if (job.busy() or owed) and schedule.overlap is not Overlap.ALLOW:
            if schedule.overlap is Overlap.QUEUE:
                if job.queued_tick is None:
                    log.info("schedule %r: the last run is still going; one run waits for it",
                             schedule.name)
                job.queued_tick = runs[-1]
            else:
                job.last_outcome = "skipped: the last run was still going (overlap=skip)"
                log.info("schedule %r: tick %s skipped: the last run is still going",
                         schedule.name, _when(runs[-1]))
            return owed
        return owed + [(job, tick, "tick") for tick in runs]

    def _advance_locked(self, job: _Job, now: float) -> None:
        job.next_tick = job.schedule.next_tick(now)
        job.next_due = job.next_tick + self._rand() * job.schedule.jitter

    def _offer(self, job: _Job, tick: float, why: str) -> TaskFuture | None:
        """Offer one run (never blocking). A full backlog: the run waits for room (logged)."""
        name = job.schedule.name
        try:
            item = self._intake.prepare_call(job.fn, job.args, job.kwargs, job.policy)
            future = self._intake.offer(item, f"schedule {name!r}")
        except QueueFullError:
            with self._lock:
                if job.waiting_tick is None:
                    log.warning("schedule %r: the backlog is full at tick %s; the run waits for "
                                "room", name, _when(tick))
                job.waiting_tick, job.waiting_since = tick, self._clock()
            return None
        except (OrchestratorClosedError, OrchestratorBrokenError):
            return None
        except Exception as exc:  # noqa: BLE001 - a call that stopped pickling: this run only
            log.error("schedule %r: could not submit its run (%s: %s)", name,
                      type(exc).__name__, exc)
            with self._lock:
                job.last_outcome = f"failed: {type(exc).__name__}: {exc}"
            return None
        if future is None:  # dropped (ALLOW_SYNC_TASK_DROP): logged by the intake
            return None
        log.info("schedule %r: run for tick %s submitted (%s)", name, _when(tick), why)
        with self._lock:
            job.future = future
            job.last_run = tick
        self._store.record_fire(name, tick)
        future.add_done_callback(lambda f: self._finished(job, future))
        return future

    def _finished(self, job: _Job, future: TaskFuture) -> None:
        """A run ended (the callbacks thread): record its outcome; wake a queued run."""
        if future.cancelled():
            outcome = "cancelled"
        else:
            exc = future.exception()
            outcome = "succeeded" if exc is None else f"failed: {type(exc).__name__}: {exc}"
        with self._lock:
            job.last_outcome = outcome
            job.last_seconds = future.seconds
            if outcome == "succeeded":
                job.last_success = self._clock()
            self._lock.notify_all()
        self._store.record_outcome(job.schedule.name, outcome, future.seconds)

    # -- the thread ------------------------------------------------------------------------

    def _run_guarded(self) -> None:
        try:
            self._run()
        except BaseException:
            log.critical("taskorch scheduler thread failed; no schedule fires any more",
                         exc_info=True)

    def _run(self) -> None:
        while True:
            next_due = self.run_due(self._clock())
            with self._lock:
                if self._stopped:
                    return
                waits = [next_due] if next_due is not None else []
                waits += [j.waiting_since + FULL_RETRY for j in self._jobs.values()
                          if j.waiting_tick is not None]
                timeout = None if not waits else max(0.0, min(waits) - self._clock())
                # Wakeups: add/trigger/stop/an outcome (notify), or the next due time.
                self._lock.wait(timeout)
