"""The backlog alone: the order tasks leave it in (priority, then arrival), not-before times and
crash retries on an injected clock, putting calls back, cancelling, and the exact bound. No
worker, no dispatcher thread: the test plays the dispatcher under the backlog's lock."""

from __future__ import annotations

import pytest

from taskorch import Policy, QueueFullError
from taskorch._parent.backlog import Backlog
from taskorch._parent.breaker import Admission
from taskorch._parent.clock import Clock
from taskorch._parent.task import TaskFuture, TaskState, WorkItem


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def make(max_backlog: int = 100) -> tuple[Backlog, FakeClock, list[int]]:
    fake = FakeClock()
    backlog = Backlog(max_backlog, Clock(monotonic=fake.monotonic))
    wakes: list[int] = []
    backlog.connect(lambda: wakes.append(1), recalls_for_cancel=False)
    return backlog, fake, wakes


def task(label: str, priority: int = 0, not_before: float | None = None) -> WorkItem:
    item = WorkItem(0, TaskFuture(), label.encode(), Policy(), None)
    item.priority = priority
    item.not_before = not_before
    return item


def labels(items: list[WorkItem]) -> list[str]:
    return [item.payload.decode() for item in items]


def take(backlog: Backlog, limit: int = 100) -> list[str]:
    with backlog.locked():
        return labels(backlog.take_locked(Admission(None), limit))


def offer(backlog: Backlog, *items: WorkItem) -> None:
    for item in items:
        assert backlog.offer(item, drop_when_full=False)


def test_first_in_first_out_among_equal_priorities() -> None:
    backlog, _, _ = make()
    offer(backlog, *(task(f"t{i}") for i in range(5)))
    assert take(backlog, 2) == ["t0", "t1"]
    offer(backlog, task("t5"))
    assert take(backlog) == ["t2", "t3", "t4", "t5"]
    assert take(backlog) == []


def test_higher_priority_first_then_arrival_order() -> None:
    backlog, _, _ = make()
    offer(backlog, task("low1", -1), task("a"), task("high1", 5), task("b"), task("high2", 5),
          task("mid", 2), task("low2", -1))
    assert take(backlog, 3) == ["high1", "high2", "mid"]
    offer(backlog, task("top", 9), task("c"))
    assert take(backlog) == ["top", "a", "b", "c", "low1", "low2"]
    offer(backlog, task("d"))  # the emptied levels are gone; level 0 still works
    assert take(backlog) == ["d"]


def test_a_call_put_back_goes_to_the_front_of_its_priority_in_order_uncharged() -> None:
    backlog, _, _ = make()
    offer(backlog, task("h", 1), task("a"), task("b"), task("c"), task("d"))
    with backlog.locked():
        handed = backlog.take_locked(Admission(None), 3)  # h, a, b
        backlog.put_back_locked(handed[1:])
        backlog.put_back_locked(handed[:1])
    assert take(backlog) == ["h", "a", "b", "c", "d"]
    assert all(item.attempts == 0 for item in handed)
    stats = backlog.stats()
    assert (stats.queued, stats.running, stats.retried) == (5, 0, 0)


def test_a_task_waits_for_its_not_before_time_on_the_backlogs_clock() -> None:
    backlog, clock, wakes = make()
    offer(backlog, task("later", not_before=1010.0), task("now"))
    assert backlog.next_due() == 1010.0
    assert take(backlog) == ["now"]
    backlog.release_due(clock.now)
    assert take(backlog) == []
    with backlog.locked():
        assert backlog.holds_tasks_locked() and backlog.ready_count_locked() == 0
    clock.now = 1010.0
    backlog.release_due(clock.now)
    assert backlog.next_due() is None
    assert take(backlog) == ["later"]
    assert backlog.stats().queued == 2  # both count in the bound until they start


def test_a_due_task_joins_the_back_of_its_priority() -> None:
    backlog, clock, _ = make()
    offer(backlog, task("late", not_before=1005.0), task("a"), task("hi", 1))
    clock.now = 1006.0
    offer(backlog, task("b"))
    backlog.release_due(clock.now)
    assert take(backlog) == ["hi", "a", "b", "late"]


def test_an_earlier_not_before_wakes_the_dispatcher_to_look_at_its_timeout() -> None:
    backlog, _, wakes = make()
    offer(backlog, task("a"))
    assert len(wakes) == 1
    offer(backlog, task("b"))
    assert len(wakes) == 1  # the dispatcher is due to look already
    offer(backlog, task("x", not_before=1020.0))
    offer(backlog, task("y", not_before=1030.0))  # not the first due: no wakeup
    offer(backlog, task("z", not_before=1010.0))
    assert len(wakes) == 3


def test_a_not_before_in_the_past_is_ready_at_once() -> None:
    backlog, _, _ = make()
    offer(backlog, task("a", not_before=999.0))
    assert backlog.next_due() is None
    assert take(backlog) == ["a"]


def test_crash_retries_wait_out_their_backoff_outside_the_bound_then_go_first() -> None:
    backlog, clock, _ = make(max_backlog=2)
    first, second = task("first"), task("second")
    offer(backlog, first, second)
    with backlog.locked():
        assert backlog.take_locked(Admission(None), 1) == [first]
        backlog.start_locked(first)
        first.attempts = 1
        backlog.crashed_locked(first, timed_out=True, retry_in=5.0)
    offer(backlog, task("third"))  # the retry is a started task: it holds no slot
    stats = backlog.stats()
    assert (stats.queued, stats.running, stats.crashes, stats.timeouts, stats.retried) == (
        2, 1, 1, 1, 1)
    with pytest.raises(QueueFullError):
        backlog.offer(task("fourth"), drop_when_full=False)
    assert backlog.next_due() == 1005.0
    clock.now = 1005.0
    backlog.release_due(clock.now)
    assert take(backlog) == ["first", "second", "third"]


def test_cancel_removes_a_waiting_task_due_or_not() -> None:
    backlog, _, _ = make()
    a, b, c, d = task("a"), task("b", 3), task("c", not_before=1050.0), task("d")
    offer(backlog, a, b, c, d)
    assert backlog.cancels.cancel_queued([c], wait=0) == [c]
    assert backlog.next_due() is None
    assert backlog.cancels.cancel_queued([b, d], wait=0) == [b, d]
    assert [item.state for item in (a, b, c, d)] == [
        TaskState.QUEUED, TaskState.CANCELLED, TaskState.CANCELLED, TaskState.CANCELLED]
    assert c.future.cancelled()
    assert take(backlog) == ["a"]
    assert backlog.stats().cancelled == 3


def test_the_breaker_fails_new_tasks_beyond_its_quota_in_the_order_they_would_leave() -> None:
    backlog, _, _ = make()
    offer(backlog, task("a"), task("hi", 1), task("b"))
    with backlog.locked():
        removed = backlog.take_new_beyond_locked(1)
    assert labels(removed) == ["a", "b"]
    assert take(backlog) == ["hi"]


def test_stop_takes_everything_ready_first_then_by_due_time() -> None:
    backlog, _, _ = make()
    offer(backlog, task("late", not_before=1100.0), task("soon", not_before=1001.0), task("a"),
          task("hi", 2))
    with backlog.locked():
        assert labels(backlog.take_all_locked()) == ["hi", "a", "soon", "late"]
        assert not backlog.holds_tasks_locked()
    assert backlog.next_due() is None


def test_the_oldest_waiting_task_is_the_oldest_head_of_any_priority() -> None:
    backlog, clock, _ = make()
    assert backlog.oldest_waiting_since() is None
    offer(backlog, task("a"))
    clock.now += 5
    offer(backlog, task("hi", 1))
    assert backlog.oldest_waiting_since() == 1000.0


def test_an_outcome_without_its_start_announces_the_start_with_its_attempts() -> None:
    # On Dask an outcome may come without its Started event: the rules announce the start
    # then, with the attempts the outcome counts (taskorch serve journals them: a restart
    # charges what was spent), not the 0 of a task never seen starting.
    from taskorch._parent.pool import TaskFinished
    from taskorch._parent.rules import TaskRules
    from taskorch._parent.task import TaskListener
    from taskorch._wire import Succeeded

    seen: list[tuple[str, int]] = []

    class Journal(TaskListener):
        def started(self, item: WorkItem, now: float) -> None:
            seen.append(("started", item.attempts))

    backlog, _, _ = make()
    item = task("a")
    item.listener = Journal()
    backlog.offer(item, drop_when_full=False)
    with backlog.locked():
        assert backlog.take_locked(Admission(None), 1) == [item]
    rules = TaskRules(backlog, None)
    with backlog.locked():
        rules.finished_locked(TaskFinished(item, Succeeded(item.task_id, 3, 0.1, b"")), 1.0)
    assert seen == [("started", 3)]
    assert item.state is TaskState.SUCCEEDED and item.future.attempts == 3
