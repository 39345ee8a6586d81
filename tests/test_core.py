"""The core: results, errors, the exact backlog bound, run_async, retries, timeouts, stop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from pathlib import Path
from typing import Callable

import _tasks as t
import pytest
from _tasks import Gate, scaled, wait_until

from taskorch import (
    Features,
    OrchestratorClosedError,
    Policy,
    QueueFullError,
    RemoteTaskError,
    RemoteTraceback,
    SerializationError,
    Stats,
    TaskAbandonedError,
    TaskOrchestrator,
    TaskTimeoutError,
)

Make = Callable[..., TaskOrchestrator]
R = scaled(30)  # seconds: result() deadlines only catch deadlocks


def invariant_holds(s: Stats) -> bool:
    return s.submitted == (s.queued + s.running + s.succeeded + s.failed + s.cancelled
                           + s.abandoned)


def block_all_workers(
    o: TaskOrchestrator, gates: Callable[[str], Gate]
) -> list[tuple[Gate, concurrent.futures.Future]]:
    """Occupy every worker with a blocker and wait until each has started."""
    blocked = []
    for i in range(o.worker_count):
        g = gates(f"blocker{i}")
        fut = o.run(t.blocker, str(g.started), str(g.release_fifo))
        blocked.append((g, fut))
    for g, _ in blocked:
        g.wait_started()
    wait_until(lambda: o.stats().running == o.worker_count, what="blockers running")
    return blocked


def release_all(blocked: list[tuple[Gate, concurrent.futures.Future]]) -> None:
    for g, fut in blocked:
        g.release()
        assert fut.result(R) == "go"


# -- results and errors ---------------------------------------------------------------------


def test_results_of_functions_lambdas_closures_and_coroutines(make_orchestrator: Make) -> None:
    o = make_orchestrator()
    offset = 10
    futures = {
        "module function": (o.run(t.square, 7), 49),
        "kwargs": (o.run(t.add, 1, b=2), (3, "")),
        "lambda": (o.run(lambda x: x + 1, 1), 2),
        "closure": (o.run(lambda: offset * 3), 30),
        "coroutine function": (o.run(t.async_add, 2, 3), 5),
        "builtin": (o.run(sum, [1, 2, 3]), 6),
    }
    for name, (fut, expected) in futures.items():
        assert fut is not None
        assert fut.result(R) == expected, name
        assert fut.attempts == 1
    s = o.stats()
    assert s.succeeded == 6 and s.submitted == 6 and invariant_holds(s)


def test_large_arguments_and_results_arrive_whole_among_small_ones(make_orchestrator: Make) -> None:
    # Results far larger than one read of a channel (256 KiB) come back in pieces and are
    # reassembled; the small results around them are neither lost nor reordered.
    o = make_orchestrator()
    blobs = [bytes([i]) * (3 * 1024 * 1024 + i) for i in range(4)]
    futures = []
    for i, blob in enumerate(blobs):
        futures.append((o.run(t.identity, blob), blob))
        futures += [(o.run(t.square, i * 10 + k), (i * 10 + k) ** 2) for k in range(10)]
    for fut, expected in futures:
        assert fut.result(R) == expected
    assert o.stats().succeeded == len(futures)


def test_task_exception_keeps_its_type_and_remote_traceback(make_orchestrator: Make) -> None:
    o = make_orchestrator()
    fut = o.run(t.raise_value_error, "bad input 42")
    with pytest.raises(ValueError, match="bad input 42") as info:
        fut.result(R)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "raise_value_error" in cause.tb and "ValueError: bad input 42" in cause.tb
    assert o.stats().failed == 1


@pytest.mark.parametrize(
    "fn, type_name",
    [
        (t.raise_unpicklable, "NeedsTwoArgs"),
        (lambda: t.call_sys_exit(3), "SystemExit"),
        (t.raise_keyboard_interrupt, "KeyboardInterrupt"),
    ],
    ids=["exception-that-does-not-unpickle", "sys.exit", "KeyboardInterrupt"],
)
def test_exceptions_that_cannot_be_rebuilt_become_remote_task_error(
    make_orchestrator: Make, fn: Callable[[], None], type_name: str
) -> None:
    o = make_orchestrator(worker_count=1)
    pid_before = o.worker_pids()
    with pytest.raises(RemoteTaskError) as info:
        o.run(fn).result(R)
    assert type_name in info.value.type_name
    assert type_name in info.value.traceback_text
    # The worker lived on: same process, still works.
    assert o.run(t.square, 3).result(R) == 9
    assert o.worker_pids() == pid_before


def test_unpicklable_result_fails_the_task_not_the_worker(make_orchestrator: Make) -> None:
    o = make_orchestrator(worker_count=1)
    pids = o.worker_pids()
    with pytest.raises(SerializationError, match="lock"):
        o.run(t.return_unpicklable).result(R)
    assert o.run(t.square, 4).result(R) == 16
    assert o.worker_pids() == pids


def test_unpicklable_argument_raises_in_run_and_enqueues_nothing(make_orchestrator: Make) -> None:
    o = make_orchestrator()
    with pytest.raises(SerializationError) as info:
        o.run(t.takes, threading.Lock())
    assert isinstance(info.value, TypeError)
    assert "takes" in str(info.value)
    s = o.stats()
    assert s.submitted == 0 and s.queued == 0
    with pytest.raises(TypeError, match="callable"):
        o.run(42)  # type: ignore[arg-type]


def test_policy_override_does_not_take_fn_keyword_arguments(
    make_orchestrator: Make, tmp_path: Path
) -> None:
    o = make_orchestrator()
    assert o.run(t.add, 1, 2, policy="mine").result(R) == (3, "mine")
    retrying = o.with_policy(Policy(retries=2, backoff_initial=0.001, jitter=False))
    fut = retrying.run(t.fail_until, str(tmp_path / "n"), 3)
    assert fut.result(R) == 3 and fut.attempts == 3
    # The orchestrator's own policy (no retries) is unchanged.
    with pytest.raises(ConnectionError):
        o.run(t.fail_until, str(tmp_path / "m"), 3).result(R)


# -- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"worker_count": 0}, "worker_count"),
        ({"max_backlog": -1}, "max_backlog"),
        ({"max_backlog": 0}, "max_backlog"),
        ({"worker_count": 2.5}, "worker_count"),
        ({"kill_grace": 0}, "kill_grace"),
        ({"max_tasks_per_worker": 0}, "max_tasks_per_worker"),
        ({"features": 1}, "features"),
    ],
)
def test_bad_orchestrator_arguments_name_the_parameter(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        TaskOrchestrator(**kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"retries": -1}, "retries"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": -2.0}, "timeout"),
        ({"timeout": 1e12}, "timeout"),  # past what the worker's interval timer takes
        ({"backoff_initial": -1}, "backoff_initial"),
        ({"backoff_initial": 5, "backoff_max": 1}, "backoff_max"),
        ({"retry_on": (int,)}, "retry_on"),
    ],
)
def test_bad_policy_values_name_the_parameter(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Policy(**kwargs)


# -- the backlog bound ---------------------------------------------------------------------


def test_backlog_bound_is_exact_with_blocked_workers(make_orchestrator: Make, gates) -> None:
    o = make_orchestrator(worker_count=2, max_backlog=3)
    blocked = block_all_workers(o, gates)
    queued = [o.run(t.square, i) for i in range(3)]
    with pytest.raises(QueueFullError):
        o.run(t.square, 99)
    s = o.stats()
    assert (s.queued, s.running, s.rejected, s.submitted) == (3, 2, 1, 5)
    release_all(blocked)
    assert [f.result(R) for f in queued] == [0, 1, 4]
    s = o.stats()
    assert s.succeeded == 5 and s.rejected == 1 and invariant_holds(s)


def test_drop_flag_drops_logs_and_counts(make_orchestrator: Make, gates, caplog) -> None:
    o = make_orchestrator(worker_count=1, max_backlog=2, features=Features.ALLOW_SYNC_TASK_DROP)
    blocked = block_all_workers(o, gates)
    kept = [o.run(t.square, 2), o.run(t.square, 3)]
    with caplog.at_level(logging.WARNING, logger="taskorch"):
        assert o.run(t.square, 4) is None
    assert any("dropped" in r.getMessage() for r in caplog.records)
    s = o.stats()
    assert s.dropped == 1 and s.rejected == 0 and s.submitted == 3
    release_all(blocked)
    assert [f.result(R) for f in kept] == [4, 9]


def test_producer_threads_never_push_the_backlog_past_its_bound(
    make_orchestrator: Make, gates
) -> None:
    o = make_orchestrator(worker_count=2, max_backlog=5)
    blocked = block_all_workers(o, gates)
    accepted: list[concurrent.futures.Future] = []
    rejected = []
    start = threading.Barrier(8)
    lock = threading.Lock()

    def produce() -> None:
        start.wait()
        for i in range(50):
            try:
                fut = o.run(t.square, i)
            except QueueFullError:
                with lock:
                    rejected.append(i)
            else:
                with lock:
                    accepted.append(fut)

    threads = [threading.Thread(target=produce) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(accepted) == 5 and len(rejected) == 8 * 50 - 5
    s = o.stats()
    assert s.queued == 5 and s.rejected == 395
    release_all(blocked)
    for fut in accepted:
        fut.result(R)
    assert invariant_holds(o.stats())


def test_run_async_waits_for_room_and_cancelling_the_wait_enqueues_nothing(
    make_orchestrator: Make, gates
) -> None:
    o = make_orchestrator(worker_count=1, max_backlog=1)
    blocked = block_all_workers(o, gates)
    first = o.run(t.square, 5)

    async def scenario() -> None:
        waiting = asyncio.create_task(o.run_async(t.square, 6))
        given_up = asyncio.create_task(o.run_async(t.square, 7))
        await asyncio.to_thread(wait_until, lambda: len(o._backlog._room_waiters) == 2)
        assert not waiting.done() and not given_up.done()
        given_up.cancel()
        with pytest.raises(asyncio.CancelledError):
            await given_up
        assert o.stats().submitted == 2  # blocker + first
        await asyncio.to_thread(release_all, blocked)
        fut = await asyncio.wait_for(waiting, R)
        assert await asyncio.wrap_future(fut) == 36

    asyncio.run(scenario())
    assert first.result(R) == 25
    s = o.stats()
    assert s.submitted == 3 and s.succeeded == 3


def test_cancel_a_queued_future_frees_its_slot(make_orchestrator: Make, gates) -> None:
    o = make_orchestrator(worker_count=1, max_backlog=2)
    blocked = block_all_workers(o, gates)
    a = o.run(t.square, 2)
    b = o.run(t.square, 3)
    assert b.cancel() and b.cancelled()
    c = o.run(t.square, 4)  # the slot b held is free again
    s = o.stats()
    assert s.cancelled == 1 and s.queued == 2
    release_all(blocked)
    assert a.result(R) == 4 and c.result(R) == 16
    assert not blocked[0][1].cancel()  # finished: nothing to cancel
    assert invariant_holds(o.stats())


def test_stats_invariant_holds_at_every_snapshot(make_orchestrator: Make, tmp_path: Path) -> None:
    o = make_orchestrator(worker_count=2, max_backlog=1000)
    retrying = o.with_policy(Policy(retries=1, backoff_initial=0.0, jitter=False))
    futures = []
    for i in range(300):
        if i % 10 == 0:
            futures.append(retrying.run(t.fail_until, str(tmp_path / f"c{i}"), 2))
        elif i % 7 == 0:
            futures.append(o.run(t.raise_value_error, "x"))
        else:
            futures.append(o.run(t.square, i))
    snapshots = 0
    while not all(f.done() for f in futures):
        assert invariant_holds(o.stats())
        snapshots += 1
    concurrent.futures.wait(futures, R)
    s = o.stats()
    assert invariant_holds(s) and s.submitted == 300
    assert s.retried == 30 and s.failed == len([i for i in range(300) if i % 10 and i % 7 == 0])
    assert snapshots > 0


# -- policy: retries, backoff, timeouts --------------------------------------------------------


def test_retries_with_backoff_succeed_on_the_third_attempt(
    make_orchestrator: Make, tmp_path: Path, caplog
) -> None:
    o = make_orchestrator(policy=Policy(retries=3, backoff_initial=0.01, backoff_max=0.05))
    with caplog.at_level(logging.INFO, logger="taskorch"):
        fut = o.run(t.fail_until, str(tmp_path / "count"), 3)
        assert fut.result(R) == 3
    assert fut.attempts == 3
    assert o.stats().retried == 2
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 2


def test_a_first_attempt_that_succeeds_never_goes_through_tenacity(
    make_orchestrator: Make, tmp_path: Path
) -> None:
    # tenacity costs tens of microseconds a task: only a retryable failure brings it in, and
    # then it counts, backs off and reports as if it had driven the first attempt too.
    o = make_orchestrator(worker_count=1, policy=Policy(retries=2, backoff_initial=0.001))
    assert [o.run(t.has_module, "tenacity").result(R) for _ in range(3)] == [False] * 3
    fut = o.run(t.fail_until, str(tmp_path / "count"), 2)
    assert fut.result(R) == 2 and fut.attempts == 2 and o.stats().retried == 1
    assert o.run(t.has_module, "tenacity").result(R) is True


def test_retry_budget_exhausted_raises_the_last_error(
    make_orchestrator: Make, tmp_path: Path
) -> None:
    o = make_orchestrator(policy=Policy(retries=1, backoff_initial=0.0))
    fut = o.run(t.fail_until, str(tmp_path / "count"), 5)
    with pytest.raises(ConnectionError, match="attempt 2 failed"):
        fut.result(R)
    assert fut.attempts == 2


def test_errors_outside_retry_on_are_not_retried(make_orchestrator: Make) -> None:
    o = make_orchestrator(
        policy=Policy(retries=3, backoff_initial=0.0, retry_on=(ConnectionError,))
    )
    fut = o.run(t.raise_value_error, "no retry")
    with pytest.raises(ValueError):
        fut.result(R)
    assert fut.attempts == 1 and o.stats().retried == 0


def test_timeout_interrupts_a_hanging_attempt_and_is_retried(
    make_orchestrator: Make, gates, fifo
) -> None:
    o = make_orchestrator(worker_count=1,
                          policy=Policy(retries=1, timeout=0.3, backoff_initial=0.0))
    g = gates("hang")
    never = fifo("never")
    pid = o.worker_pids()
    fut = o.run(t.hang, str(g.started), never)
    with pytest.raises(TaskTimeoutError, match="timeout"):
        fut.result(R)
    assert isinstance(fut.exception(), TimeoutError)
    assert fut.attempts == 2
    s = o.stats()
    assert s.timeouts == 2 and s.retried == 1 and s.crashes == 0
    assert o.worker_pids() == pid  # interrupted in-process: the worker lives on


def test_unpickling_the_call_runs_on_the_first_attempts_clock(make_orchestrator: Make) -> None:
    # 0.2 s to unpickle the argument, then 0.2 s of run: together past the 0.3 s timeout
    # (each alone is not), so the attempt is interrupted in-process; the worker runs on.
    o = make_orchestrator(worker_count=1, policy=Policy(timeout=0.3))
    pid = o.run(t.getpid).result(R)
    fut = o.run(t.busy_identity, t.SlowToUnpickle(0.2), 0.2)
    with pytest.raises(TaskTimeoutError, match="0.3 s timeout"):
        fut.result(R)
    assert fut.attempts == 1
    assert o.run(t.getpid).result(R) == pid and o.stats().crashes == 0


def test_a_clock_that_failed_to_start_is_not_taken_as_running() -> None:
    # The next attempt's start() must arm the timer, not believe it armed already.
    import signal

    from taskorch._worker.attempts import AttemptTimer

    before = signal.getsignal(signal.SIGALRM)
    timer = AttemptTimer()
    try:
        with pytest.raises((OverflowError, ValueError, OSError)):
            timer.start(1e12)
        timer.start(0.05)
        with pytest.raises(TaskTimeoutError):
            t.busy_identity(None, 30.0)  # interrupted by the clock long before
        timer.stop()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def test_no_hard_kill_while_a_result_is_still_arriving() -> None:
    # A large outcome takes several reads; the hard deadline waits while its bytes keep coming.
    from types import SimpleNamespace

    from taskorch._parent.local_workers import hard_deadline

    worker = SimpleNamespace(inflight=[], last_read=0.0, mid_frame=lambda: False)
    item = SimpleNamespace(policy=Policy(timeout=10.0), started_on=worker, attempt_started=100.0)
    worker.inflight.append(item)
    assert hard_deadline(worker, 1.0) == 111.0  # type: ignore[arg-type]
    worker.mid_frame, worker.last_read = (lambda: True), 115.0
    assert hard_deadline(worker, 1.0) == 116.0  # type: ignore[arg-type]
    worker.last_read = 105.0  # stalled mid-frame since before the deadline: no reprieve
    assert hard_deadline(worker, 1.0) == 111.0  # type: ignore[arg-type]


def test_timeout_interrupts_a_coroutine(make_orchestrator: Make, gates, fifo) -> None:
    o = make_orchestrator(worker_count=1, policy=Policy(timeout=0.3))
    g = gates("ahang")
    with pytest.raises(TaskTimeoutError):
        o.run(t.async_hang, str(g.started), fifo("never")).result(R)
    assert o.run(t.async_add, 1, 1).result(R) == 2


def test_backoff_intervals_follow_the_policy_without_wall_time(tmp_path: Path) -> None:
    import pickle
    import signal

    from taskorch._wire import encode_call
    from taskorch._worker.attempts import AttemptRunner

    slept: list[float] = []
    events: list[tuple] = []
    before = signal.getsignal(signal.SIGALRM)
    runner = AttemptRunner(events.append, lambda: None, sleep=slept.append)  # takes SIGALRM

    def flaky(counter: str) -> bytes:  # fails three times, then succeeds (counted in a file)
        return encode_call(t.fail_until, (str(tmp_path / counter), 4), {})

    def calls(counter: str) -> int:
        return int((tmp_path / counter).read_text())

    try:
        policy = Policy(retries=5, backoff_initial=0.1, backoff_max=0.25, jitter=False)
        runner.announce_first_attempt(task_id=7, attempts_done=0)
        assert pickle.loads(runner.run_call(flaky("a"), policy)) == 4
        assert slept == pytest.approx([0.1, 0.2, 0.25])
        assert runner.attempt == 4
        assert [e[0] for e in events] == [1, 2, 1, 2, 1, 2, 1]  # STARTED/RETRYING alternate

        slept.clear()
        jittered = Policy(retries=5, backoff_initial=0.1, backoff_max=10.0, jitter=True)
        runner.announce_first_attempt(task_id=8, attempts_done=0)
        runner.run_call(flaky("b"), jittered)
        for base, got in zip([0.1, 0.2, 0.4], slept):
            assert base <= got <= base + 0.1
        # A budget partly spent by earlier crashes leaves fewer attempts.
        slept.clear()
        runner.announce_first_attempt(task_id=9, attempts_done=4)
        with pytest.raises(ConnectionError):
            runner.run_call(flaky("c"), policy)
        assert calls("c") == 2 and runner.attempt == 6
    finally:
        signal.signal(signal.SIGALRM, before)


def test_an_alarm_in_the_first_attempts_failure_is_that_attempts_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The clock may fire while a failed first attempt stops it (the handler raises before
    # stop() clears it): that TaskTimeoutError is the attempt's failure, retried as any other
    # is, not an escape past the retries (the first attempt runs inline, without tenacity).
    import pickle
    import signal

    from taskorch._wire import Retrying, decode_event, encode_call
    from taskorch._worker.attempts import AttemptRunner, AttemptTimer

    stop, fired = AttemptTimer.stop, []

    def stop_as_the_alarm_fires(timer: AttemptTimer) -> None:
        stop(timer)
        if not fired:
            fired.append(True)
            raise TaskTimeoutError("the attempt ran longer than its 30 s timeout")

    monkeypatch.setattr(AttemptTimer, "stop", stop_as_the_alarm_fires)
    events: list[tuple] = []
    before = signal.getsignal(signal.SIGALRM)
    runner = AttemptRunner(events.append, lambda: None, sleep=lambda s: None)
    try:
        runner.announce_first_attempt(task_id=3, attempts_done=0)
        payload = encode_call(t.fail_until, (str(tmp_path / "n"), 2), {})  # fails once
        policy = Policy(retries=2, timeout=30.0, backoff_initial=0.0, jitter=False)
        assert pickle.loads(runner.run_call(payload, policy)) == 2
        assert fired and runner.attempt == 2
        retried = [e for e in map(decode_event, events) if isinstance(e, Retrying)]
        assert len(retried) == 1 and retried[0].timed_out is True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, before)


def test_default_policy_retries_with_backoff_and_a_timeout() -> None:
    p = Policy.default()
    assert p.retries >= 1 and p.timeout is not None and p.jitter
    assert p.backoff_before(2) >= p.backoff_initial
    with TaskOrchestrator(worker_count=1) as o:
        assert o.policy == Policy.default()
        assert o.run(t.square, 3).result(R) == 9


def test_default_policy_retries_what_is_transient_only() -> None:
    p = Policy.default()
    for transient in (ConnectionResetError(), TimeoutError(), TaskTimeoutError("t"),
                      BrokenPipeError(), OSError(5, "EIO"), BlockingIOError()):
        assert p.retries_error(transient), transient
    for permanent in (FileNotFoundError(), PermissionError(), NotADirectoryError(),
                      ValueError(), TypeError(), KeyError(), ZeroDivisionError()):
        assert not p.retries_error(permanent), permanent
    # retry_on / retry_unless say otherwise; the constructor's defaults retry every Exception.
    assert Policy(retries=1).retries_error(ValueError())
    assert not Policy(retries=1).retries_error(KeyboardInterrupt())
    mine = dataclasses.replace(p, retry_on=(Exception,), retry_unless=(KeyError,))
    assert mine.retries_error(ValueError()) and not mine.retries_error(KeyError())
    assert Policy(retry_unless=ValueError).retry_unless == (ValueError,)
    with pytest.raises(ValueError, match="retry_unless"):
        Policy(retry_unless=("ValueError",))  # type: ignore[arg-type]


def test_default_policy_in_a_worker_fails_a_missing_file_at_once_retries_a_connection_error(
    make_orchestrator: Make, tmp_path: Path
) -> None:
    fast_default = dataclasses.replace(Policy.default(), backoff_initial=0.0, backoff_max=0.0)
    o = make_orchestrator(worker_count=1, policy=fast_default)
    missing = o.run(t.read_text, str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError):
        missing.result(R)
    assert missing.attempts == 1
    flaky = o.run(t.fail_until, str(tmp_path / "counter"), 3)  # ConnectionError twice
    assert flaky.result(R) == 3 and flaky.attempts == 3
    assert o.stats().retried == 2


# -- stop -----------------------------------------------------------------------------------


def test_stop_drains_500_queued_tasks(tmp_path: Path) -> None:
    o = TaskOrchestrator(worker_count=2, max_backlog=500, policy=Policy())
    futures = [o.run(t.square, i) for i in range(500)]
    report = o.stop(timeout=scaled(60))
    assert report.drained and report.succeeded == 500
    assert report.cancelled == report.abandoned == report.failed == 0
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == [i * i for i in range(500)]
    assert o.worker_pids() == []


def test_stop_timeout_cancels_queued_and_abandons_running(gates) -> None:
    o = TaskOrchestrator(worker_count=2, max_backlog=10, policy=Policy())
    blocked = block_all_workers(o, gates)
    queued = [o.run(t.square, i) for i in range(3)]
    started = time.monotonic()
    report = o.stop(timeout=0.5)
    elapsed = time.monotonic() - started
    assert not report.drained
    assert (report.abandoned, report.cancelled) == (2, 3)
    assert elapsed < 0.5 + 3.0  # "within about the timeout"; the bound only catches a hang
    for _, fut in blocked:
        assert isinstance(fut.exception(0), TaskAbandonedError)
    assert all(f.cancelled() for f in queued)
    s = o.stats()
    assert invariant_holds(s) and s.queued == s.running == 0 and s.workers == 0


def test_run_after_stop_raises_and_stop_is_idempotent(make_orchestrator: Make) -> None:
    o = make_orchestrator()
    assert o.run(t.square, 2).result(R) == 4
    first = o.stop()
    with pytest.raises(OrchestratorClosedError):
        o.run(t.square, 3)
    second = o.stop()
    assert first.drained and second.drained and second.succeeded == 1

    async def closed() -> None:
        with pytest.raises(OrchestratorClosedError):
            await o.run_async(t.square, 3)

    asyncio.run(closed())


def test_stop_from_several_threads_at_once(gates) -> None:
    o = TaskOrchestrator(worker_count=1, policy=Policy())
    blocked = block_all_workers(o, gates)
    reports = []
    threads = [threading.Thread(target=lambda: reports.append(o.stop(timeout=scaled(20))))
               for _ in range(4)]
    for th in threads:
        th.start()
    wait_until(lambda: o.stats().running == 1 and o._backlog.closed, what="closing")
    release_all(blocked)
    for th in threads:
        th.join(R)
    assert len(reports) == 4 and all(r.drained and r.succeeded == 1 for r in reports)


def test_context_managers_stop_on_exit() -> None:
    with TaskOrchestrator(worker_count=1, policy=Policy()) as o:
        fut = o.run(t.square, 6)
    assert fut.done() and fut.result() == 36
    assert o.worker_pids() == []

    async def main() -> None:
        async with TaskOrchestrator(worker_count=1, policy=Policy()) as o2:
            fut2 = await o2.run_async(t.square, 7)
        assert fut2.result(0) == 49
        assert o2.worker_pids() == []

    asyncio.run(main())


def test_stop_from_a_done_callback_does_not_deadlock() -> None:
    o = TaskOrchestrator(worker_count=1, policy=Policy())
    reports = []
    fut = o.run(t.square, 2)
    fut.add_done_callback(lambda f: reports.append(o.stop()))
    assert fut.result(R) == 4
    report = o.stop(timeout=scaled(10))
    # The callback runs on the "taskorch-callbacks" thread: its own stop() returns on its own.
    wait_until(lambda: reports, what="the callback's stop() to return")
    assert report.drained and len(reports) == 1 and reports[0].drained


def test_calls_prefetched_behind_a_long_task_move_to_an_idle_worker(
    make_orchestrator: Make, gates
) -> None:
    # Tiny tasks teach both workers to prefetch deeply; then a long task arrives with quick
    # ones in the same burst. Those handed to the long task's worker must not wait for it.
    o = make_orchestrator(worker_count=2, max_backlog=200)
    for f in [o.run(t.square, i) for i in range(200)]:
        f.result(R)
    g = gates("long")
    long = o.run(t.blocker, str(g.started), str(g.release_fifo))
    quick = [o.run(t.getpid) for _ in range(20)]
    long_pid = g.wait_started()
    pids = {f.result(R) for f in quick}  # would hang until release without recall
    assert long_pid not in pids and not long.done()
    g.release()
    assert long.result(R) == "go"
    assert all(f.attempts == 1 for f in quick) and o.stats().retried == 0


def test_wake_after_stop_never_writes_to_a_reused_descriptor() -> None:
    import os

    o = TaskOrchestrator(worker_count=1, policy=Policy())
    o.start()
    old_fd = o._dispatcher.pool._wake_w
    o.stop()
    pipes = []
    try:
        while True:  # reopen descriptors until one takes the wake pipe's old number
            r, w = os.pipe()
            pipes.append((r, w))
            if old_fd in (r, w) or len(pipes) > 100:
                break
        o._dispatcher.wake()  # what a late stop() or finalizer does
        o.stop()
        for r, w in pipes:
            os.set_blocking(r, False)
            with pytest.raises(BlockingIOError):
                os.read(r, 1)  # nothing was written into someone else's pipe
    finally:
        for r, w in pipes:
            os.close(r)
            os.close(w)


def test_backoff_queue_gives_due_retries_in_due_order() -> None:
    # Crash retries wait out their backoff in the backlog, on its clock.
    from taskorch._parent.backlog import Backlog
    from taskorch._parent.breaker import Admission
    from taskorch._parent.clock import Clock
    from taskorch._parent.task import TaskFuture, WorkItem

    items = [WorkItem(0, TaskFuture(), b"", Policy(), None) for i in range(3)]
    now = [1000.0]
    delays = Backlog(10, Clock(monotonic=lambda: now[0]))
    delays.connect(lambda: None, recalls_for_cancel=False)
    for item in items:
        delays.offer(item, drop_when_full=False)
    with delays.locked():
        assert delays.take_locked(Admission(None), 3) == items
        for item in items:
            delays.start_locked(item)
        delays.crashed_locked(items[0], False, retry_in=60.0)
        delays.crashed_locked(items[1], False, retry_in=10.0)
        delays.crashed_locked(items[2], False, retry_in=10.0)
    assert delays.next_due() == 1010.0
    delays.release_due(1009.0)
    with delays.locked():
        assert delays.take_locked(Admission(None), 3) == []  # nothing due yet
    delays.release_due(1015.0)
    with delays.locked():
        assert delays.take_locked(Admission(None), 3) == [items[1], items[2]]  # due, in order
        assert delays.holds_tasks_locked() and delays.take_all_locked() == [items[0]]
        assert not delays.holds_tasks_locked()
    assert delays.next_due() is None
