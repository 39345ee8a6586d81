"""Schedules: the firing rule on an injected clock (cron and interval ticks, a timezone across a
DST change, jitter bounds, overlap, misfire, a full backlog), and real runs on a real
orchestrator."""

from __future__ import annotations

import datetime
import logging
import threading
import zoneinfo
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import _tasks as t
import pytest
from _tasks import scaled

from taskorch import OrchestratorClosedError, Policy, QueueFullError, TaskOrchestrator
from taskorch._parent.schedule import Misfire, Overlap, Schedule, parse_every
from taskorch._parent.scheduler import MemoryStore, Scheduler

R = scaled(30)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0,
        second: float = 0.0) -> float:
    return datetime.datetime(year, month, day, hour, minute, tzinfo=datetime.timezone.utc
                             ).timestamp() + second


class FakeFuture(Future[Any]):
    seconds = 0.01


class FakeIntake:
    """Records what the scheduler offers; a test finishes the runs or fills the backlog."""

    def __init__(self) -> None:
        self.offered: list[tuple[Any, tuple[Any, ...]]] = []
        self.futures: list[FakeFuture] = []
        self.full = False

    def prepare_call(self, fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     policy: Any = None) -> tuple[Any, tuple[Any, ...]]:
        return (fn, args)

    def offer(self, item: Any, what: object = "") -> FakeFuture:
        if self.full:
            raise QueueFullError(1)
        self.offered.append(item)
        future = FakeFuture()
        self.futures.append(future)
        return future

    def finish_all(self) -> None:
        for f in self.futures:
            if not f.done():
                f.set_result(None)


def make(schedule: Schedule, now: float, store: Any = None, rand: float = 0.0,
         ) -> tuple[Scheduler, FakeIntake]:
    intake = FakeIntake()
    clock = [now]
    scheduler = Scheduler(intake, store=store, clock=lambda: clock[0],  # type: ignore[arg-type]
                          rand=lambda: rand, thread=False)
    scheduler.add(schedule, print, ("x",))
    return scheduler, intake


def test_interval_ticks_fall_on_multiples_of_the_period() -> None:
    s, intake = make(Schedule(name="purge", every=parse_every("10m")), utc(2026, 1, 1, 10, 3))
    assert s.run_due(utc(2026, 1, 1, 10, 9, 59)) == utc(2026, 1, 1, 10, 10)
    assert intake.offered == []
    assert s.run_due(utc(2026, 1, 1, 10, 10)) == utc(2026, 1, 1, 10, 20)
    assert len(intake.offered) == 1
    intake.finish_all()
    s.run_due(utc(2026, 1, 1, 10, 20, 0.5))
    assert len(intake.offered) == 2
    assert s.status()[0].last_run == utc(2026, 1, 1, 10, 20)


def test_cron_in_a_timezone_across_the_spring_dst_change() -> None:
    # 02:30 every day in Berlin; on 2026-03-29 02:30 does not exist (clocks go 02:00 -> 03:00).
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    start = datetime.datetime(2026, 3, 27, 12, 0, tzinfo=berlin).timestamp()
    schedule = Schedule(name="nightly", cron="30 2 * * *", timezone="Europe/Berlin")
    s, intake = make(schedule, start)
    fired = []
    now = start
    for _ in range(3):
        now = s.run_due(now) or 0.0
        s.run_due(now)
        intake.finish_all()
        fired.append(datetime.datetime.fromtimestamp(now, berlin))
    assert [(f.day, f.hour, f.minute) for f in fired] == [(28, 2, 30), (29, 3, 0), (30, 2, 30)]
    assert len(intake.offered) == 3


def test_jitter_delays_each_run_within_its_bound() -> None:
    schedule = Schedule(name="j", every=60, jitter=10)
    s, intake = make(schedule, utc(2026, 1, 1, 0, 0, 5), rand=0.75)
    due = s.run_due(utc(2026, 1, 1, 0, 0, 6))
    assert due == utc(2026, 1, 1, 0, 1, 7.5)  # the tick, plus 0.75 of the 10 s jitter
    assert s.run_due(utc(2026, 1, 1, 0, 1, 7)) == due and not intake.offered
    s.run_due(due)
    assert len(intake.offered) == 1


def test_overlap_skip_does_not_fire_while_the_last_run_goes(caplog: Any) -> None:
    s, intake = make(Schedule(name="slow", every=60), utc(2026, 1, 1, 0, 0, 30))
    s.run_due(utc(2026, 1, 1, 0, 1))
    with caplog.at_level(logging.INFO, logger="taskorch"):
        s.run_due(utc(2026, 1, 1, 0, 2))  # the first run is still going
    assert len(intake.offered) == 1
    assert s.status()[0].last_outcome.startswith("skipped")
    assert "skipped" in caplog.text
    intake.finish_all()
    s.run_due(utc(2026, 1, 1, 0, 3))
    assert len(intake.offered) == 2


def test_overlap_queue_keeps_one_run_waiting_for_the_last() -> None:
    s, intake = make(Schedule(name="q", every=60, overlap=Overlap.QUEUE), utc(2026, 1, 1))
    s.run_due(utc(2026, 1, 1, 0, 1))
    s.run_due(utc(2026, 1, 1, 0, 2))
    s.run_due(utc(2026, 1, 1, 0, 3))  # still one waiting, not two
    assert len(intake.offered) == 1
    intake.finish_all()
    s.run_due(utc(2026, 1, 1, 0, 3, 10))
    assert len(intake.offered) == 2


def test_overlap_allow_runs_beside() -> None:
    s, intake = make(Schedule(name="a", every=60, overlap="allow"), utc(2026, 1, 1))
    s.run_due(utc(2026, 1, 1, 0, 1))
    s.run_due(utc(2026, 1, 1, 0, 2))
    assert len(intake.offered) == 2


@pytest.mark.parametrize(("misfire", "runs"), [
    (Misfire.COALESCE, 1), (Misfire.SKIP, 0), (Misfire.CATCH_UP, 3),
])
def test_misfire_after_downtime_from_the_stored_last_fire(misfire: Misfire, runs: int) -> None:
    store = MemoryStore()
    store.record_fire("m", utc(2026, 1, 1, 0, 0))
    # Down from 00:00 to 00:05:30: ticks 00:01 .. 00:05 passed (catch_up_limit 3 keeps 3).
    schedule = Schedule(name="m", every=60, misfire=misfire, catch_up_limit=3,
                        overlap=Overlap.ALLOW)
    s, intake = make(schedule, utc(2026, 1, 1, 0, 5, 30), store=store)
    s.run_due(utc(2026, 1, 1, 0, 5, 30))
    assert len(intake.offered) == runs
    assert s.status()[0].next_run == utc(2026, 1, 1, 0, 6)


def test_a_restart_does_not_run_a_tick_twice() -> None:
    store = MemoryStore()
    s1, intake1 = make(Schedule(name="once", every=60), utc(2026, 1, 1, 0, 0, 30), store=store)
    s1.run_due(utc(2026, 1, 1, 0, 1, 0.2))
    assert len(intake1.offered) == 1
    # A new process at 00:01:40 (same store): the 00:01 tick ran; the next is 00:02.
    s2, intake2 = make(Schedule(name="once", every=60), utc(2026, 1, 1, 0, 1, 40), store=store)
    assert s2.run_due(utc(2026, 1, 1, 0, 1, 40)) == utc(2026, 1, 1, 0, 2)
    assert intake2.offered == []


def test_a_full_backlog_at_tick_time_waits_for_room(caplog: Any) -> None:
    s, intake = make(Schedule(name="full", every=60), utc(2026, 1, 1))
    intake.full = True
    with caplog.at_level(logging.WARNING, logger="taskorch"):
        s.run_due(utc(2026, 1, 1, 0, 1))
    assert "backlog is full" in caplog.text and intake.offered == []
    s.run_due(utc(2026, 1, 1, 0, 1, 0.5))  # before FULL_RETRY: not yet
    intake.full = False
    s.run_due(utc(2026, 1, 1, 0, 1, 2))
    assert len(intake.offered) == 1
    assert s.status()[0].last_run == utc(2026, 1, 1, 0, 1)  # the tick it waited for


def test_trigger_runs_now_and_unknown_names_are_refused() -> None:
    s, intake = make(Schedule(name="t", every=3600), utc(2026, 1, 1))
    assert s.trigger("t") is not None and len(intake.offered) == 1
    with pytest.raises(KeyError, match="no schedule named 'nope'.*there are: t"):
        s.trigger("nope")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "exactly one of cron and every"),
    ({"cron": "* * *"}, "not a cron expression"),
    ({"cron": "61 * * * *"}, "the minute field .61. is out of range"),
    ({"every": "ten minutes"}, "duration such as"),
    ({"every": 0}, "positive duration"),
    ({"cron": "0 * * * *", "timezone": "Mars/Olympus"}, "unknown timezone"),
    ({"every": 60, "timezone": "UTC"}, "timezone applies to cron only"),
    ({"every": 60, "overlap": "sometimes"}, "overlap must be one of"),
    ({"every": 60, "jitter": -1}, "jitter must be"),
])
def test_bad_schedules_are_refused_clearly(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Schedule(name="bad", **kwargs)


def test_a_real_orchestrator_runs_an_every_schedule_until_stopped(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    o = TaskOrchestrator(worker_count=1, policy=Policy(retries=0, timeout=None))
    try:
        job = o.schedule(t.write_file, every=0.2, args=(str(out), "x"), name="tick")
        with pytest.raises(ValueError, match="exists already"):
            o.schedule(t.identity, every=1, name="tick")
        t.wait_until(lambda: (o.schedules()[0].last_outcome == "succeeded"
                              and job.status().last_run is not None), timeout=R,
                     what="a scheduled run to succeed")
        first = job.status().last_run
        t.wait_until(lambda: job.status().last_run != first, what="a second run")
        assert job.trigger() is not None
    finally:
        o.stop(timeout=scaled(10))
    assert o.schedules() and out.exists()
    with pytest.raises(Exception, match="stopped"):
        o.schedule(t.identity, every=1)


def test_a_schedule_racing_stop_is_refused_and_makes_no_scheduler(
    make_orchestrator: Callable[..., TaskOrchestrator], monkeypatch: pytest.MonkeyPatch,
) -> None:
    # stop() has found no scheduler to stop and has not closed the backlog yet: a schedule()
    # from another thread in that gap must be refused, not make a scheduler nobody stops (a
    # "taskorch-scheduler" thread firing into a stopped orchestrator). The gap is held open by
    # a hook on the backlog's close(), the first thing stop() does after that check.
    o = make_orchestrator(worker_count=1)
    backlog = o._backlog
    close = backlog.close
    in_the_gap, raced = threading.Event(), threading.Event()

    def close_once_raced(deadline: float) -> None:
        in_the_gap.set()
        assert raced.wait(R), "the test never ran its schedule()"
        close(deadline)

    monkeypatch.setattr(backlog, "close", close_once_raced)
    stopper = threading.Thread(target=o.stop, kwargs={"timeout": R}, name="test-stop")
    stopper.start()
    try:
        assert in_the_gap.wait(R)
        with pytest.raises(OrchestratorClosedError, match="takes no new schedules"):
            o.schedule(t.identity, every=3600, args=(1,), name="late")
    finally:
        raced.set()
        stopper.join(R)
    assert not stopper.is_alive()
    assert o._scheduler is None and o.schedules() == []


def test_a_cron_field_out_of_range_is_named() -> None:
    from taskorch._parent.schedule import Schedule

    with pytest.raises(ValueError, match=r"the minute field '61' is out of range .*0-59"):
        Schedule(name="x", cron="61 * * * *")
    with pytest.raises(ValueError, match=r"the weekday field '9' is out of range"):
        Schedule(name="x", cron="0 0 * * 9")
    with pytest.raises(ValueError, match="five fields"):
        Schedule(name="x", cron="* * *")


def test_schedule_status_shows_readable_times() -> None:
    from taskorch._parent.scheduler import ScheduleStatus

    status = ScheduleStatus(name="x", next_run=0.0, last_run=None, last_outcome=None,
                            last_seconds=None, running=False)
    assert "next_run='1970-01-01 00:00:00 UTC'" in repr(status)
    assert "last_run=None" in repr(status) and "0.0" not in repr(status)
