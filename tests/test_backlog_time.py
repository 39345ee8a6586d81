"""The backlog's expiry, delayed counts and prefetch rules on an injected clock: no worker, no
dispatcher thread (the test plays the dispatcher under the backlog's lock)."""

from __future__ import annotations

from taskorch import Policy
from taskorch._parent.breaker import Admission
from taskorch._parent.task import TaskFuture, TaskState, WorkItem
from tests.test_backlog import labels, make, offer


def task(label: str, priority: int = 0, not_before: float | None = None,
         expires_at: float | None = None) -> WorkItem:
    item = WorkItem(0, TaskFuture(), label.encode(), Policy(), None)
    item.priority, item.not_before, item.expires_at = priority, not_before, expires_at
    return item


def take(backlog: object, limit: int = 100, plain_after: int | None = None) -> list[str]:
    with backlog.locked():  # type: ignore[attr-defined]
        return labels(backlog.take_locked(  # type: ignore[attr-defined]
            Admission(None), limit, None, True, plain_after))


def test_a_task_not_started_by_its_expiry_ends_expired() -> None:
    backlog, clock, _ = make()
    doomed = task("doomed", expires_at=clock.now + 5)
    offer(backlog, doomed, task("plain"))
    assert backlog.next_due() == clock.now + 5
    clock.now += 4.9
    assert backlog.release_due(clock.now) == []
    clock.now += 0.2
    assert backlog.release_due(clock.now) == [doomed]
    assert doomed.state is TaskState.EXPIRED
    assert take(backlog) == ["plain"]
    stats = backlog.stats()
    assert (stats.expired, stats.queued, stats.submitted) == (1, 1, 2)


def test_an_expired_task_is_set_aside_when_taken_and_when_handed_back() -> None:
    backlog, clock, _ = make()
    a, b = task("a", expires_at=clock.now + 1), task("b", expires_at=clock.now + 1)
    offer(backlog, a)
    clock.now += 2  # past it, before the dispatcher's timers ran
    assert take(backlog) == []
    assert backlog.next_due() is not None and backlog.next_due() <= clock.now
    assert backlog.release_due(clock.now) == [a]
    clock.now -= 2
    offer(backlog, b)
    with backlog.locked():
        handed = backlog.take_locked(Admission(None), 1)
    assert handed == [b]
    clock.now += 2
    assert backlog.release_due(clock.now) == []  # handed over: not the backlog's any more
    with backlog.locked():
        backlog.put_back_locked(handed)  # it comes back unstarted, after its time
    assert take(backlog) == []
    assert backlog.release_due(clock.now) == [b]
    assert backlog.stats().expired == 2


def test_a_delayed_task_counts_in_the_bound_and_the_delayed_gauge() -> None:
    backlog, clock, _ = make(max_backlog=2)
    offer(backlog, task("later", not_before=clock.now + 60), task("now"))
    assert backlog.offer(task("x"), drop_when_full=True) is False  # full: the delayed counts
    with backlog.locked():
        assert backlog.delayed_locked()[0] == 1
    assert backlog.stats().delayed == 1
    assert take(backlog) == ["now"]
    clock.now += 60
    backlog.release_due(clock.now)
    assert backlog.stats().delayed == 0
    assert take(backlog) == ["later"]


def test_a_delayed_task_expiring_before_its_time_never_becomes_ready() -> None:
    backlog, clock, _ = make()
    item = task("t", not_before=clock.now + 10, expires_at=clock.now + 5)
    offer(backlog, item)
    clock.now += 6
    assert backlog.release_due(clock.now) == [item]
    assert backlog.stats().delayed == 0
    assert item.state is TaskState.EXPIRED


def test_prefetch_positions_stay_plain() -> None:
    backlog, clock, _ = make()
    offer(backlog, task("a"), task("b"), task("c", expires_at=clock.now + 60), task("d"))
    assert take(backlog, 10, plain_after=0) == ["a", "b"]  # a busy worker: stops at c
    assert take(backlog, 10, plain_after=1) == ["c", "d"]  # an idle one starts c at once
    offer(backlog, task("e"), task("hi", priority=5))
    assert take(backlog, 10, plain_after=0) == []  # priorities mix: no prefetch
    assert take(backlog, 10, plain_after=1) == ["hi"]
    assert take(backlog, 10, plain_after=0) == ["e"]  # plain again


def test_a_crash_retry_past_its_expiry_is_not_run_again() -> None:
    backlog, clock, _ = make()
    item = task("t", expires_at=clock.now + 1)
    offer(backlog, item)
    with backlog.locked():
        assert backlog.take_locked(Admission(None), 1) == [item]
        backlog.start_locked(item)
        backlog.crashed_locked(item, False, retry_in=5)
    clock.now += 5
    assert backlog.release_due(clock.now) == [item]
    assert item.state is TaskState.EXPIRED
    stats = backlog.stats()
    assert (stats.running, stats.expired, stats.crashes) == (0, 1, 1)


def test_expiry_entries_of_ended_tasks_do_not_pile_up() -> None:
    """A task that ended long before its expiry time is not kept alive (nor its future, its
    outcome) by the expiry heap, past a bounded number of them."""
    import gc
    import weakref

    backlog, clock, _ = make(max_backlog=20_000)
    refs = []
    for i in range(10_000):
        item = task(f"t{i}", expires_at=clock.now + 3600)
        refs.append(weakref.ref(item))
        offer(backlog, item)
        with backlog.locked():
            (taken,) = backlog.take_locked(Admission(None), 1)
            backlog.start_locked(taken)
            backlog.finish_locked(taken, TaskState.SUCCEEDED)
        del item, taken
    gc.collect()
    assert sum(ref() is not None for ref in refs) < 4096
