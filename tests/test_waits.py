"""``options(key=)``, ``options(after=)`` and ``TaskOrchestrator(limits=)`` with real workers
(gates order the events, never sleeps), and a rate measured on the backlog's injected clock."""

from __future__ import annotations

from concurrent.futures import wait
from pathlib import Path
from typing import Any, Callable

import pytest

from taskorch import (
    DependencyFailedError,
    Limit,
    Policy,
    TaskExpiredError,
    TaskOrchestrator,
)
from taskorch._parent.backlog import Backlog
from taskorch._parent.breaker import Admission
from taskorch._parent.clock import Clock
from taskorch._parent.intake import Intake
from taskorch._parent.task import TaskFuture, TaskState, WorkItem
from tests._tasks import (
    DEADLOCK_TIMEOUT,
    Gate,
    blocker,
    exclusive,
    identity,
    raise_value_error,
    scaled,
    square,
    wait_until,
)
from tests.test_backlog import FakeClock

Make = Callable[..., TaskOrchestrator]
R = DEADLOCK_TIMEOUT  # deadline for any one result: only catches deadlocks


def test_a_key_dedups_while_unfinished(make_orchestrator: Make, tmp_path: Path) -> None:
    o = make_orchestrator(2)
    gate = Gate(tmp_path, "k")
    first = o.options(key="tenant-42:cleanup").run(blocker, str(gate.started),
                                                   str(gate.release_fifo))
    gate.wait_started()
    again = o.options(key="tenant-42:cleanup").run(identity, "never")
    other = o.options(key="tenant-43:cleanup").run(identity, 43)
    assert first is not None and again is first
    assert other is not None and other.result(R) == 43
    assert o.stats().submitted == 2
    gate.release("done")
    assert again.result(R) == "done"
    later = o.options(key="tenant-42:cleanup").run(identity, "next")  # finished: free again
    assert later is not None and later is not first and later.result(R) == "next"


def test_a_chain_of_three_where_the_middle_fails(make_orchestrator: Make) -> None:
    o = make_orchestrator(2)
    a = o.run(identity, 1)
    assert a is not None
    b = o.options(after=[a]).run(raise_value_error, "middle")
    assert b is not None
    c = o.options(after=[b]).run(identity, 3)
    assert c is not None
    assert a.result(R) == 1
    with pytest.raises(ValueError, match="middle"):
        b.result(R)
    with pytest.raises(DependencyFailedError) as info:
        c.result(R)
    assert isinstance(info.value.__cause__, ValueError)
    assert info.value.dependency == b.task_id
    s = o.stats()
    assert (s.succeeded, s.failed, s.queued) == (1, 2, 0)


def test_a_fan_in_of_50_shards(make_orchestrator: Make, tmp_path: Path) -> None:
    o = make_orchestrator(2, max_backlog=60)
    gate = Gate(tmp_path, "first")
    shards: list[Any] = [o.run(blocker, str(gate.started), str(gate.release_fifo))]
    shards += [o.run(square, i) for i in range(1, 50)]
    report = o.options(after=shards).run(identity, "report")
    assert report is not None
    gate.wait_started()
    wait([s for s in shards[1:]], timeout=R)  # the others ran past the report, waiting
    assert not report.done()
    assert o.stats().queued == 1
    gate.release("0")
    assert report.result(R) == "report"
    assert all(s.done() and s.exception() is None for s in shards)


def test_a_dependency_that_expires_fails_its_dependant(make_orchestrator: Make,
                                                       tmp_path: Path) -> None:
    o = make_orchestrator(1)
    gate = Gate(tmp_path, "busy")
    busy = o.run(blocker, str(gate.started), str(gate.release_fifo))
    gate.wait_started()
    doomed = o.options(expires=0.05).run(identity, "late")
    assert doomed is not None
    after = o.options(after=[doomed]).run(identity, "never")
    assert after is not None
    wait_until(after.done, what="the dependant to fail")
    with pytest.raises(DependencyFailedError) as info:
        after.result(0)
    assert isinstance(info.value.__cause__, TaskExpiredError)
    gate.release()
    assert busy is not None and busy.result(R) == "go"


def test_concurrency_1_is_never_exceeded_while_other_tasks_pass(make_orchestrator: Make,
                                                                tmp_path: Path) -> None:
    lock = str(tmp_path / "held")
    name = f"{exclusive.__module__}.{exclusive.__qualname__}"
    o = make_orchestrator(4, max_backlog=200, limits={name: Limit(concurrency=1)})
    gate = Gate(tmp_path, "first")
    limited = [o.run(exclusive, lock, str(gate.started), str(gate.release_fifo))]
    gate.wait_started()
    limited += [o.run(exclusive, lock) for _ in range(99)]
    others = [o.run(square, i) for i in range(40)]
    assert [f.result(R) for f in others if f is not None] == [i * i for i in range(40)]
    assert o.stats().queued == 99  # the limited ones wait, in the bound
    gate.release()
    assert all(f is not None and f.result(scaled(60)) == lock for f in limited)


def test_a_rate_of_10_per_second_over_5_simulated_seconds() -> None:
    fake = FakeClock()
    backlog = Backlog(1000, Clock(monotonic=fake.monotonic),
                      limits={"jobs.purge": Limit(rate="10/s")})
    backlog.connect(lambda: None, recalls_for_cancel=False)
    items = []
    for i in range(100):
        for name in ("jobs.purge", "jobs.other"):
            item = WorkItem(0, TaskFuture(), f"{name}{i}".encode(), Policy(), None)
            item.name = name
            backlog.offer(item, False)
            items.append(item)
    starts: list[float] = []
    others = 0
    end = fake.now + 5.0
    while fake.now < end:
        backlog.release_due(fake.now)
        with backlog.locked():
            for item in backlog.take_locked(Admission(None), 10):
                if item.name == "jobs.purge":
                    starts.append(fake.now)
                else:
                    others += 1
                backlog.start_locked(item)
                backlog.finish_locked(item, TaskState.SUCCEEDED)
        due = backlog.next_due()
        fake.now = min(fake.now + 0.01, due) if due is not None and due > fake.now else (
            fake.now + 0.01)
    assert len(starts) == 50
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert min(gaps) >= 0.1 - 1e-9 and max(gaps) <= 0.1 + 0.011
    assert others == 100  # never held behind the limited name
    with backlog.locked():
        waiting = {backlog.waiting_for_locked(item) for item in items
                   if item.state is TaskState.QUEUED}
    assert waiting == {"limit"}  # (those not taken yet are set aside at their first take)


def _limited(limits: dict[str, Limit]) -> tuple[Backlog, FakeClock]:
    fake = FakeClock()
    backlog = Backlog(1000, Clock(monotonic=fake.monotonic), limits=limits)
    backlog.connect(lambda: None, recalls_for_cancel=False)
    return backlog, fake


def _take_and_start(backlog: Backlog) -> list[WorkItem]:
    """What the dispatcher takes now; each starts and runs on (never ends here)."""
    with backlog.locked():
        taken = backlog.take_locked(Admission(None), 10)
        for item in taken:
            backlog.start_locked(item)
    return taken


def test_a_rate_holds_while_the_tasks_of_its_name_run_on() -> None:
    # The tasks never end: each start must come from a token, not from a task ending
    # (reviewed: 5 such tasks at 10/s gave 2 starts in 2 s).
    backlog, fake = _limited({"jobs.purge": Limit(rate="10/s")})
    for i in range(100):
        backlog.offer(_task("jobs.purge"), False)
    starts: list[float] = []
    end = fake.now + 5.0
    while fake.now < end:
        backlog.release_due(fake.now)
        starts += [fake.now for _ in _take_and_start(backlog)]
        due = backlog.next_due()
        assert due is not None  # tasks are set aside: a token is always coming
        fake.now = max(due, fake.now + 0.001)  # (the dispatcher's wait: to the next due time)
    assert len(starts) == 50
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert min(gaps) >= 0.1 - 1e-9 and max(gaps) <= 0.1 + 1e-9


@pytest.mark.parametrize("how", ["cancelled", "expired"])
def test_a_released_task_that_ends_unstarted_passes_its_token_on(how: str) -> None:
    backlog, fake = _limited({"jobs.purge": Limit(rate="10/s")})
    first, second, third = (_task("jobs.purge") for _ in range(3))
    second.expires_at = fake.now + 0.15
    for item in (first, second, third):
        backlog.offer(item, False)
    assert _take_and_start(backlog) == [first]  # it runs on; the others are set aside
    assert backlog.next_due() == fake.now + 0.1
    fake.now += 0.1
    assert backlog.release_due(fake.now) == []  # the token is back: ``second`` is released
    with backlog.locked():
        assert backlog.waiting_for_locked(second) is None
        assert backlog.waiting_for_locked(third) == "limit"
    if how == "cancelled":  # before the dispatcher takes it
        with backlog.locked():
            assert backlog.remove_queued_locked({id(second): second}) == [second]
    else:
        fake.now += 0.1  # (not taken by its expiry: no worker was free)
        assert backlog.release_due(fake.now) == [second]
    assert second.state is (TaskState.CANCELLED if how == "cancelled" else TaskState.EXPIRED)
    assert _take_and_start(backlog) == [third]  # the token ``second`` never took
    with backlog.locked():
        assert not backlog.holds_tasks_locked()


def test_a_released_task_that_is_cancelled_passes_its_slot_on() -> None:
    backlog, fake = _limited({"jobs.purge": Limit(concurrency=1)})
    first, second, third = (_task("jobs.purge") for _ in range(3))
    for item in (first, second, third):
        backlog.offer(item, False)
    assert _take_and_start(backlog) == [first]
    with backlog.locked():
        backlog.finish_locked(first, TaskState.SUCCEEDED)  # its slot frees: ``second`` goes
        assert backlog.remove_queued_locked({id(second): second}) == [second]
    assert _take_and_start(backlog) == [third]  # the slot ``second`` never took
    with backlog.locked():
        assert not backlog.holds_tasks_locked()


def test_bad_options_are_value_errors(make_orchestrator: Make) -> None:
    o = make_orchestrator(1)
    other = make_orchestrator(1)
    foreign = other.run(identity, 1)
    assert foreign is not None
    with pytest.raises(ValueError, match="not a future of this orchestrator"):
        o.options(after=[foreign])
    with pytest.raises(ValueError, match="after must be a list"):
        o.options(after=foreign)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a future"):
        o.options(after=[3])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="key must be"):
        o.options(key="")
    with pytest.raises(ValueError, match="key cannot apply to map"):
        list(o.options(key="k").map(identity, [1, 2]))
    with pytest.raises(ValueError, match="rate"):
        Limit(rate="10/d")
    with pytest.raises(ValueError, match="concurrency"):
        Limit(concurrency=0)
    with pytest.raises(ValueError, match="limits"):
        TaskOrchestrator(limits={"x": 1})  # type: ignore[dict-item]
    assert o.stats().submitted == 0
    assert list(o.options(policy=Policy(retries=0)).map(identity, [1, 2])) == [1, 2]
    none = o.options(after=[]).run(identity, "no dependency")  # (runs: nothing to wait for)
    assert none is not None and none.result(R) == "no dependency"


def _task(name: str, expires_at: float | None = None,
          after: tuple[TaskFuture, ...] | None = None) -> WorkItem:
    item = WorkItem(0, TaskFuture(), name.encode(), Policy(), None)
    item.name, item.expires_at, item.after = name, expires_at, after
    return item


def test_a_task_waiting_for_a_dependency_or_a_limit_expires_at_its_time() -> None:
    fake = FakeClock()
    backlog = Backlog(100, Clock(monotonic=fake.monotonic),
                      limits={"jobs.purge": Limit(concurrency=1)})
    backlog.connect(lambda: None, recalls_for_cancel=False)
    intake = Intake(backlog, Policy(), drop_when_full=False)
    dependency, purging = _task("jobs.other"), _task("jobs.purge")
    for item in (dependency, purging):
        intake.offer(item)
    with backlog.locked():
        for item in backlog.take_locked(Admission(None), 10):
            backlog.start_locked(item)  # both run, and never end here
    waiting = _task("jobs.report", fake.now + 5, after=(dependency.future,))
    held = _task("jobs.purge", fake.now + 5)
    dependant = _task("jobs.mail", after=(waiting.future,))
    for item in (waiting, held, dependant):
        intake.offer(item)
    with backlog.locked():
        assert backlog.take_locked(Admission(None), 10) == []  # held: set aside for its limit
        assert [backlog.waiting_for_locked(i) for i in (waiting, held, dependant)] == [
            "dependency", "limit", "dependency"]
    assert backlog.next_due() == fake.now + 5
    fake.now += 4.9
    assert backlog.release_due(fake.now) == []
    fake.now += 0.2
    expired = backlog.release_due(fake.now)  # while the dependency and the slot's holder run
    assert sorted(i.name for i in expired) == ["jobs.purge", "jobs.report"]
    assert waiting.state is held.state is TaskState.EXPIRED
    for item in expired:  # what the dispatcher does with them (``rules.expired``)
        item.future.set_exception(TaskExpiredError(f"task {item.task_id} expired"))
    wait_until(dependant.future.done, what="the dependant of the expired task to fail")
    error = dependant.future.exception()
    assert isinstance(error, DependencyFailedError) and error.dependency == waiting.task_id
    assert isinstance(error.__cause__, TaskExpiredError)
    stats = backlog.stats()
    assert (stats.expired, stats.failed, stats.queued, stats.running) == (2, 1, 0, 2)
    with backlog.locked():
        backlog.finish_locked(purging, TaskState.SUCCEEDED)  # its slot frees: nothing held
        assert backlog.take_locked(Admission(None), 10) == []
        assert not backlog.holds_tasks_locked()


def test_a_submission_that_joins_a_task_by_key_does_not_wait_for_its_dependencies() -> None:
    fake = FakeClock()
    backlog = Backlog(100, Clock(monotonic=fake.monotonic))
    backlog.connect(lambda: None, recalls_for_cancel=False)
    intake = Intake(backlog, Policy(), drop_when_full=False)
    dependency = _task("jobs.other")
    intake.offer(dependency)
    waiting = _task("jobs.report", after=(dependency.future,))
    joining = _task("jobs.report", after=(dependency.future,))
    waiting.key = joining.key = "report"
    assert intake.offer(waiting) is waiting.future
    assert intake.offer(joining) is waiting.future  # it is that task now, no dependant
    # One done-callback on the dependency: the waiting task's (the joiner's used to be added).
    assert len(dependency.future._done_callbacks) == 1  # type: ignore[attr-defined]
    with backlog.locked():
        for item in backlog.take_locked(Admission(None), 10):
            backlog.start_locked(item)
            backlog.finish_locked(item, TaskState.SUCCEEDED)
    dependency.future.set_result(None)  # the dependant is released, once
    with backlog.locked():
        assert backlog.take_locked(Admission(None), 10) == [waiting]


def test_a_task_waiting_for_a_running_dependency_expires_without_it(make_orchestrator: Make,
                                                                     tmp_path: Path) -> None:
    o = make_orchestrator(2)
    gate = Gate(tmp_path, "dependency")
    dependency = o.run(blocker, str(gate.started), str(gate.release_fifo))
    assert dependency is not None
    gate.wait_started()
    waiting = o.options(after=[dependency], expires=0.2).run(identity, "never")
    dependant = o.options(after=[waiting]).run(identity, "never either")
    assert waiting is not None and dependant is not None
    wait_until(dependant.done, what="the waiting task to expire while its dependency runs")
    assert not dependency.done()
    with pytest.raises(TaskExpiredError):
        waiting.result(0)
    with pytest.raises(DependencyFailedError) as info:
        dependant.result(0)
    assert isinstance(info.value.__cause__, TaskExpiredError)
    gate.release()
    assert dependency.result(R) == "go"
    assert (o.stats().expired, o.stats().failed) == (1, 1)
