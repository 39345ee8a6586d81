"""The circuit breaker's state machine on an injected clock (no wall-clock windows), and the
state it publishes: in stats() before the futures that changed it resolve."""

from __future__ import annotations

import _tasks as t
import pytest

from taskorch import CircuitBreaker, Policy, TaskOrchestrator
from taskorch._parent.breaker import Breaker
from taskorch._parent.task import TaskFuture, TaskState, WorkItem


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(config: CircuitBreaker) -> tuple[Breaker, Clock, list[str]]:
    clock = Clock()
    published: list[str] = []
    return Breaker(config, publish=published.append, clock=clock), clock, published


def test_consecutive_failures_open_then_half_open_after_the_break_then_close() -> None:
    breaker, clock, published = make(CircuitBreaker(failure_threshold=3, break_duration=10))
    for task_id in (1, 2):
        breaker.record(task_id, True)
    assert breaker.admit().left is None and published == []
    breaker.record(3, True)
    assert published == ["open"] and breaker.admit().left == 0
    assert breaker.next_change() == 1010.0
    clock.now = 1009.9
    assert breaker.admit().left == 0  # not yet
    clock.now = 1010.0
    admission = breaker.admit()
    assert published == ["open", "half_open"] and admission.left == 1
    breaker.admitted([4])
    assert breaker.admit().left == 0  # the one probe is out
    breaker.record(4, False)
    assert published == ["open", "half_open", "closed"] and breaker.admit().left is None


def test_a_failed_probe_reopens_and_an_unstarted_probe_frees_its_slot() -> None:
    breaker, clock, published = make(
        CircuitBreaker(failure_threshold=1, break_duration=5, half_open_probes=1))
    breaker.record(1, True)
    clock.now += 5
    assert breaker.admit().left == 1
    breaker.admitted([2])
    breaker.release(2)  # came back unstarted (recalled, or its worker died first)
    assert breaker.admit().left == 1
    breaker.admitted([3])
    breaker.record(3, True)
    assert published == ["open", "half_open", "open"]
    assert breaker.next_change() == clock.now + 5


def test_failure_ratio_counts_only_the_window() -> None:
    breaker, clock, published = make(CircuitBreaker(
        failure_threshold=100, failure_ratio=0.5, minimum_throughput=4, sampling_window=10))
    breaker.record(1, True)
    breaker.record(2, True)
    clock.now += 11  # those two fall out of the window
    breaker.record(3, True)
    breaker.record(4, False)
    breaker.record(5, False)
    assert published == []  # 1 of 3 in the window, below minimum_throughput anyway
    breaker.record(6, True)
    assert published == ["open"]  # 2 of 4 in the window


def test_fail_mode_rejects_new_tasks_beyond_the_probes_but_keeps_crash_retries() -> None:
    from taskorch._parent.backlog import Backlog
    from taskorch._parent.breaker import Admission

    breaker, clock, _ = make(CircuitBreaker(failure_threshold=1, break_duration=30))
    breaker.record(1, True)
    backlog = Backlog(max_backlog=10)
    backlog.connect(lambda: None, recalls_for_cancel=False)
    new = [WorkItem(0, TaskFuture(), b"", Policy(), None) for _ in range(2)]
    retry = WorkItem(0, TaskFuture(), b"", Policy(), None)
    for item in (new[0], retry, new[1]):
        backlog.offer(item, drop_when_full=False)
    with backlog.locked():
        # `retry`: a started task waiting to be retried after a crash, between two new ones.
        assert backlog.take_locked(Admission(None), 3) == [new[0], retry, new[1]]
        backlog.start_locked(retry)
        backlog.put_back_locked([new[0], retry, new[1]])
    assert retry.state is TaskState.RUNNING
    with backlog.locked():
        rejected = breaker.reject_beyond_locked(backlog, breaker.admit().left or 0)
    assert [item.task_id for item, _, _ in rejected] == [new[0].task_id, new[1].task_id]
    assert "again in 30 s" in str(rejected[0][2])
    with backlog.locked():
        assert backlog.take_all_locked() == [retry]


def test_stats_show_the_open_circuit_by_the_time_the_failure_that_opened_it_is_seen() -> None:
    # Published under the backlog lock before the futures resolve: code that sees the failure
    # (a done-callback, or a caller woken by result()) reads "open", never a stale "closed".
    seen: list[str] = []
    with TaskOrchestrator(worker_count=1, policy=Policy(retries=0, timeout=None),
                          circuit_breaker=CircuitBreaker(failure_threshold=1,
                                                         break_duration=60)) as o:
        future = o.run(t.raise_value_error, "boom")
        assert future is not None
        future.add_done_callback(lambda f: seen.append(o.stats().breaker_state))
        with pytest.raises(ValueError):
            future.result(30)
        assert o.stats().breaker_state == "open"
        t.wait_until(lambda: seen, what="the done-callback")
    assert seen == ["open"]
