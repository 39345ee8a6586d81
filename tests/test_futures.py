"""Futures (``_parent.task``): no user code on the dispatcher thread, and nothing kept alive by
a finished future (issue #11, items 3 and 4).

User code in the parent: unpickling a result or a task's exception (``__reduce__`` /
``__setstate__``) and done-callbacks. Each blocks here on a handshake the test controls
(``Gate``), so "while it is blocked" is an ordering, not a duration.
"""

from __future__ import annotations

import concurrent.futures
import gc
import logging
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from concurrent.futures import FIRST_COMPLETED, FIRST_EXCEPTION, as_completed, wait
from pathlib import Path
from typing import Any, Callable

import _tasks as t
import pytest
from _tasks import Gate, scaled, wait_until

from taskorch import SerializationError, TaskOrchestrator

Make = Callable[..., TaskOrchestrator]
R = scaled(30)  # seconds: deadlines only catch deadlocks
# stop() gives up waiting for its dispatcher this long after its timeout (_STOP_SLACK): a stop
# that returns later than that returned without its dispatcher, futures unresolved.
STOP_FALLBACK = 5.0


@pytest.fixture(autouse=True)
def _clear_unpickled_in() -> None:
    t.UNPICKLED_IN.clear()


def _in_thread(fn: Callable[[], Any], name: str) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()), name=name)
    thread.start()
    return thread, out


def _stop_quickly_with_tasks_in_flight(
    o: TaskOrchestrator, held: list[concurrent.futures.Future[Any]]
) -> None:
    """Submit more work, stop(timeout=0.5): it returns, and every future is resolved."""
    unrelated = o.run(t.square, 3)
    assert unrelated is not None
    assert unrelated.result(R) == 9  # a task that has nothing to do with the blocked user code
    more = [o.run(t.square, i) for i in range(20)]
    started = time.monotonic()
    report = o.stop(timeout=0.5)
    assert time.monotonic() - started < 0.5 + STOP_FALLBACK  # did not give up on the dispatcher
    assert report.seconds < 0.5 + STOP_FALLBACK
    everything = held + [unrelated] + [f for f in more if f is not None]
    assert [f for f in everything if not f.done()] == []
    assert o.worker_pids() == []


# -- item 3: user code off the dispatcher thread -----------------------------------------------


@pytest.mark.parametrize("kind", ["result", "exception"])
def test_stop_returns_on_time_while_an_outcome_unpickles(
    make_orchestrator: Make, gates: Callable[[str], Gate], kind: str
) -> None:
    o = make_orchestrator(worker_count=2)
    g = gates("unpickle")
    if kind == "result":
        slow = o.run(t.return_blocks_on_unpickle, "value", str(g.started), str(g.release_fifo))
    else:
        slow = o.run(t.raise_blocks_on_unpickle, "value", str(g.started), str(g.release_fifo),
                     os.getpid())
    assert slow is not None
    concurrent.futures.wait([slow], timeout=R)  # done before anything is unpickled
    assert slow.done()
    reader, out = _in_thread(lambda: slow.exception(R), name="reader")
    try:
        g.wait_started()  # the unpickling runs, and blocks
        _stop_quickly_with_tasks_in_flight(o, [slow])
    finally:
        g.release()
        reader.join(R)
    assert t.UNPICKLED_IN == ["reader"]  # the thread that asked, not the dispatcher
    if kind == "result":
        assert out == [None] and slow.result(0) == "value"
    else:
        assert isinstance(out[0], ValueError) and str(out[0]) == "value"
        with pytest.raises(ValueError, match="value"):
            slow.result(0)


def test_a_blocking_done_callback_holds_no_task_and_not_stop(
    make_orchestrator: Make, tmp_path: Path
) -> None:
    o = make_orchestrator(worker_count=2)
    started, release = tmp_path / "callback.started", tmp_path / "callback.release"
    os.mkfifo(release)
    ran_in: list[str] = []

    def blocking_callback(_: object) -> None:
        ran_in.append(threading.current_thread().name)
        started.touch()
        with open(release) as f:
            f.read()

    fut = o.run(t.square, 2)
    assert fut is not None
    fut.add_done_callback(blocking_callback)  # before it is done, or it would run right here
    released = False
    try:
        if not fut.done() or ran_in:  # (it finished first: the callback already ran, here)
            wait_until(started.exists, what="the callback to start")
            _stop_quickly_with_tasks_in_flight(o, [fut])
            with open(release, "w") as f:
                f.write("go")
            released = True
    finally:
        if not released and started.exists():
            with open(release, "w") as f:
                f.write("go")
    assert ran_in in (["taskorch-callbacks"], [threading.current_thread().name])


def test_stop_from_a_done_callback_waits_for_the_drain(
    make_orchestrator: Make, gates: Callable[[str], Gate]
) -> None:
    o = make_orchestrator(worker_count=1)
    g = gates("first")
    blocked = o.run(t.blocker, str(g.started), str(g.release_fifo))
    g.wait_started()
    queued = o.run(t.square, 2)  # behind `blocked`: not done when its callback is added
    later = o.run(t.square, 3)
    assert blocked is not None and queued is not None and later is not None
    seen: list[tuple[str, bool, bool]] = []

    def stop_from_callback(_: object) -> None:
        report = o.stop(timeout=R)
        seen.append((threading.current_thread().name, report.drained, later.done()))

    queued.add_done_callback(stop_from_callback)
    g.release()
    wait_until(lambda: seen, what="the callback's stop() to return")
    # It waited for the drain: the task queued after it is done. Not a deadlock: the
    # dispatcher never waits for the callback thread.
    assert seen == [("taskorch-callbacks", True, True)]
    assert later.result(0) == 9 and o.worker_pids() == []


def test_callbacks_run_in_order_and_one_that_raises_is_logged(
    make_orchestrator: Make, gates: Callable[[str], Gate], caplog: pytest.LogCaptureFixture
) -> None:
    o = make_orchestrator(worker_count=1)
    g = gates("hold")
    blocked = o.run(t.blocker, str(g.started), str(g.release_fifo))
    g.wait_started()
    futures = [o.run(t.square, i) for i in range(5)]  # queued behind `blocked`
    calls: list[tuple[int, str, str]] = []

    def record(i: int, tag: str) -> Callable[[object], None]:
        return lambda _: calls.append((i, tag, threading.current_thread().name))

    def explode(_: object) -> None:
        raise RuntimeError("callback exploded")

    for i, fut in enumerate(futures):
        assert fut is not None
        fut.add_done_callback(record(i, "a"))
        fut.add_done_callback(explode)
        fut.add_done_callback(record(i, "b"))
    with caplog.at_level(logging.ERROR, logger="taskorch"):
        g.release()
        wait_until(lambda: len(calls) == 10, what="every callback to run")
    assert [(i, tag) for i, tag, _ in calls] == [(i, tag) for i in range(5) for tag in "ab"]
    assert {name for _, _, name in calls} == {"taskorch-callbacks"}
    logged = [r for r in caplog.records if "exception calling callback" in r.getMessage()]
    assert len(logged) == 5 and all(
        r.exc_info and "callback exploded" in str(r.exc_info[1]) for r in logged
    )
    assert blocked is not None and blocked.result(R) == "go"


def test_cancel_runs_the_callbacks_in_the_caller_before_it_returns(
    make_orchestrator: Make, gates: Callable[[str], Gate]
) -> None:
    o = make_orchestrator(worker_count=1)
    g = gates("hold")
    blocked = o.run(t.blocker, str(g.started), str(g.release_fifo))
    g.wait_started()
    # A worker prefetches: fill it, so that the last task surely waits in the backlog.
    queued = [o.run(t.square, i) for i in range(100)]
    last = queued[-1]
    assert last is not None
    ran_in: list[str] = []
    last.add_done_callback(lambda _: ran_in.append(threading.current_thread().name))
    assert last.cancel()
    assert ran_in == [threading.current_thread().name]  # as for any concurrent.futures.Future
    g.release()
    assert blocked is not None and blocked.result(R) == "go"


def test_an_outcome_is_unpickled_once_by_the_first_caller(
    make_orchestrator: Make, gates: Callable[[str], Gate]
) -> None:
    o = make_orchestrator(worker_count=1)
    g = gates("unpickle")
    fut = o.run(t.return_blocks_on_unpickle, ["shared"], str(g.started), str(g.release_fifo))
    assert fut is not None
    concurrent.futures.wait([fut], timeout=R)
    assert "not unpickled yet" in repr(fut)  # repr never unpickles
    first, out1 = _in_thread(lambda: fut.result(R), name="first")
    g.wait_started()
    others = [_in_thread(lambda: fut.result(R), name=f"other{i}") for i in range(3)]
    g.release()
    for thread, _ in [(first, out1)] + others:
        thread.join(R)
    results = out1 + [out[0] for _, out in others]
    assert results == [["shared"]] * 4 and all(r is results[0] for r in results)
    assert t.UNPICKLED_IN == ["first"]
    assert fut.exception(0) is None and "returned list" in repr(fut)


@pytest.mark.parametrize("action", ["raise", "exit"])
def test_a_result_that_does_not_unpickle_fails_result_and_exception(
    make_orchestrator: Make, action: str
) -> None:
    o = make_orchestrator(worker_count=1)
    fut = o.run(t.return_exploding_on_unpickle, action)
    assert fut is not None
    err = fut.exception(R)
    assert isinstance(err, SerializationError) and (
        "could not be unpickled in the parent" in str(err)
    )
    with pytest.raises(SerializationError) as info:
        fut.result(0)
    assert info.value is err  # decoded once
    assert o.run(t.square, 4).result(R) == 16  # type: ignore[union-attr]


def test_wait_first_exception_sees_a_task_exception_before_it_is_unpickled(
    make_orchestrator: Make, gates: Callable[[str], Gate]
) -> None:
    o = make_orchestrator(worker_count=2)
    g = gates("hold")
    blocked = o.run(t.blocker, str(g.started), str(g.release_fifo))
    failing = o.run(t.raise_value_error, "bad")
    assert blocked is not None and failing is not None
    try:
        done, not_done = concurrent.futures.wait(
            [blocked, failing], timeout=R, return_when=concurrent.futures.FIRST_EXCEPTION)
        assert done == {failing} and not_done == {blocked}
        assert isinstance(failing.exception(0), ValueError)
    finally:
        g.wait_started()
        g.release()
    assert blocked.result(R) == "go"


# -- item 4: a finished future keeps its outcome, nothing else ---------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_finished_futures_keep_no_worker_fds_open(make_orchestrator: Make) -> None:
    # One worker per task, so each task ran on a worker whose process handle (and its
    # sentinel fd) a future would keep, through its cancel hook and its WorkItem.
    gc.collect()
    baseline = _open_fds()
    o = make_orchestrator(worker_count=2, max_tasks_per_worker=1, max_backlog=100)
    futures = [o.run(t.square, i) for i in range(60)]
    assert [f.result(R) for f in futures if f is not None] == [i * i for i in range(60)]
    assert o.stop(timeout=R).drained
    gc.collect()
    assert _open_fds() < baseline + 20, f"{_open_fds() - baseline} more fds held by 60 futures"
    assert len(futures) == 60  # still held


def test_finished_futures_keep_no_arguments_alive(make_orchestrator: Make) -> None:
    o = make_orchestrator(worker_count=2)
    argument = b"x" * (4 << 20)
    gc.collect()
    tracemalloc.start()  # Python allocations only, deterministic: no RSS noise
    try:
        futures = [o.run(t.payload_size, argument) for _ in range(50)]  # 50 pickled copies
        assert [f.result(R) for f in futures if f is not None] == [4 << 20] * 50
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 40 << 20, f"50 finished futures hold {held / 2**20:.0f} MiB"


_HANDLER_TOUCHES_A_HELD_FUTURE = r"""
import os, signal
from taskorch._parent.task import TaskFuture

future, seen = TaskFuture(), []
signal.signal(signal.SIGUSR1, lambda *_: seen.append(future.done()))
with future._condition:  # as wait() and as_completed() hold it
    os.kill(os.getpid(), signal.SIGUSR1)
    for _ in range(1000):
        pass  # the handler runs here, between two bytecodes, in this thread
print(seen)
"""


def test_a_signal_handler_may_touch_a_future_whose_lock_its_thread_holds() -> None:
    # A future's condition is reentrant, as concurrent.futures makes it: a handler (or a
    # finalizer) that asks a future about itself must not deadlock its own thread.
    out = subprocess.run([sys.executable, "-c", _HANDLER_TOUCHES_A_HELD_FUTURE],
                         capture_output=True, text=True, timeout=R)
    assert out.stdout.strip() == "[False]", out.stderr


def test_a_finished_future_holds_one_object_for_the_garbage_collector(
        make_orchestrator: Make) -> None:
    # Programs hold many futures (``[pool.run(f) for ...]``, then the results): every object a
    # held future keeps that the cyclic collector tracks is walked again by each full
    # collection. Its condition is one object (its own lock); its done-callbacks list is made
    # only by the first callback, its waiters' list by the first wait() (see ``_parent/condition``).
    o = make_orchestrator(worker_count=1)
    future = o.run(t.add, 1, 2)
    assert future is not None and future.result(R)[0] == 3
    tracked = [type(v).__name__ for k, v in vars(future).items()
               if gc.is_tracked(v) and k not in ("owner", "_result")]  # (shared; the user's)
    assert tracked == ["FutureCondition"], tracked
    late: list[Any] = []
    future.add_done_callback(late.append)  # done: runs at once, in this thread
    assert late == [future]
    assert wait([future], timeout=R).done == {future}  # (a waiters' list of its own now)
    assert list(as_completed([future], timeout=R)) == [future]


def test_wait_and_as_completed_are_woken_by_futures_that_end_while_they_wait(
        make_orchestrator: Make, tmp_path: Path) -> None:
    # They add a waiter to each future (its ``_waiters`` list, made then) that the future's
    # resolution must find: a success, a task's exception (told from a result: a
    # FIRST_EXCEPTION wait returns on it alone), a cancel.
    o = make_orchestrator(worker_count=1)
    g, g_last = Gate(tmp_path, "held"), Gate(tmp_path, "last")
    held = o.run(t.blocker, str(g.started), str(g.release_fifo))
    ok, bad, queued = o.run(t.add, 1, 2), o.run(t.raise_value_error, "x"), o.run(t.add, 3, 4)
    last = o.run(t.blocker, str(g_last.started), str(g_last.release_fifo))
    assert held and ok and bad and queued and last
    g.wait_started()
    assert queued.cancel()
    first = wait([ok, bad, queued], timeout=R, return_when=FIRST_COMPLETED)
    assert first.done == {queued}  # the cancel woke it; the others wait behind ``held``
    finished: list[Any] = []
    failed_first: list[Any] = []
    waiters = [
        threading.Thread(target=lambda: finished.extend(as_completed([ok, bad], R))),
        threading.Thread(target=lambda: failed_first.append(
            wait([bad, last], timeout=3 * R, return_when=FIRST_EXCEPTION))),  # (> join's R)
    ]
    for waiter in waiters:
        waiter.start()
    wait_until(lambda: len(bad._waiters) == 2, what="both waiters installed")
    g.release()
    for waiter in waiters:
        waiter.join(R)  # (``last`` still blocks: the FIRST_EXCEPTION wait ends on ``bad``)
    assert not any(waiter.is_alive() for waiter in waiters)
    assert set(finished) == {ok, bad}
    assert failed_first[0].done == {bad} and failed_first[0].not_done == {last}
    assert isinstance(bad.exception(R), ValueError) and ok.result(R)[0] == 3
    g_last.release()
    assert last.result(R) == "go"


@pytest.mark.parametrize("error", [ValueError("x"), None])
def test_set_exception_ends_a_first_exception_wait_as_concurrent_futures_does(
        error: BaseException | None) -> None:
    # TaskFuture resolves through its own ``_finish`` (Future's, but the waiters' list is made
    # by the first wait() only): a waiter hears of set_exception() as an exception, even of
    # None, as with a plain Future; a future nobody waited for gets no list.
    from taskorch._parent.task import TaskFuture

    for cls in (concurrent.futures.Future, TaskFuture):
        futures = [cls(), cls()]
        ended: list[Any] = []
        waiter = threading.Thread(target=lambda: ended.append(
            wait(futures, timeout=3 * R, return_when=FIRST_EXCEPTION)))  # (> join's R)
        waiter.start()
        wait_until(lambda: all(len(f._waiters) == 1 for f in futures), what="wait() waiting")
        futures[0].set_exception(error)
        waiter.join(R)
        assert not waiter.is_alive() and ended[0].done == {futures[0]}, cls
        futures[1].set_result(2)
    alone = TaskFuture()
    alone.set_result(1)
    assert alone.result() == 1 and alone._waiter_list is None


def test_the_future_condition_waits_notifies_and_is_reentrant() -> None:
    from taskorch._parent.condition import FutureCondition

    cond = FutureCondition()
    with pytest.raises(RuntimeError):
        cond.wait(0)
    with pytest.raises(RuntimeError):
        cond.notify_all()
    with cond:
        assert cond.wait(0) is False and cond.wait(0.01) is False  # nobody notifies
    woken: list[int] = []
    waiting = threading.Semaphore(0)

    def waiter(n: int) -> None:
        with cond:
            with cond:  # held twice: wait() releases both levels, and takes both back
                waiting.release()
                assert cond.wait(R)
                woken.append(n)
            assert cond._is_owned()

    threads = [threading.Thread(target=waiter, args=(n,)) for n in range(3)]
    for n, thread in enumerate(threads):
        thread.start()
        assert waiting.acquire(timeout=R)  # thread n is about to wait, holding the lock
        with cond:  # taken: so thread n is inside wait(), which released it
            pass
    with cond:
        cond.notify()  # the longest waiting first
    wait_until(lambda: woken == [0], R)
    with cond:
        cond.notify_all()
    for thread in threads:
        thread.join(R)
    assert sorted(woken) == [0, 1, 2] and woken[0] == 0


_INTERRUPTS = [1]


def _interrupted_once() -> str:
    if _INTERRUPTS:
        _INTERRUPTS.pop()
        raise KeyboardInterrupt  # as Ctrl-C would, in the thread that unpickles
    return "decoded"


class _InterruptsOnce:
    def __reduce__(self) -> tuple[Any, ...]:
        return (_interrupted_once, ())


def test_ctrl_c_while_a_result_unpickles_leaves_it_to_the_next_caller() -> None:
    import pickle

    from taskorch._parent.task import TaskFuture

    future = TaskFuture()
    future.set_undecoded("result", pickle.dumps(_InterruptsOnce()))
    with pytest.raises(KeyboardInterrupt):
        future.result(0)
    thread, out = _in_thread(lambda: future.result(R), name="next")  # not held by a claim
    thread.join(R)
    assert out == ["decoded"] and future.result(0) == "decoded"
