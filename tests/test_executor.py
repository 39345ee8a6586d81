"""``taskorch.Executor`` (a ``concurrent.futures.Executor``) and ``cancel()`` of queued tasks
that a worker holds but has not started (recalled from it).

Ordering comes from the gates in ``_tasks`` and from the dispatcher's own snapshot of the calls
each worker holds (``held_calls``), polled to a deadline; never from sleeps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import _tasks as t
import pytest
from _tasks import Gate, scaled, wait_until
from conftest import FAST

from taskorch import Executor, SerializationError, TaskOrchestrator, WorkerCrashedError

R = scaled(30)  # deadline for any one result: only catches deadlocks
TESTS_DIR = str(Path(__file__).resolve().parent)

Make = Callable[..., Executor]


@pytest.fixture
def make_executor() -> Iterator[Make]:
    made: list[Executor] = []

    def make(*args: Any, **kwargs: Any) -> Executor:
        kwargs.setdefault("policy", FAST)
        executor = Executor(*args, **kwargs)
        made.append(executor)
        return executor

    yield make
    for executor in made:
        executor.orchestrator.stop(timeout=scaled(5))


def held(o: TaskOrchestrator) -> int:
    """Calls handed to the workers and not finished (the dispatcher's snapshot)."""
    return sum(o._dispatcher.pool.held_calls().values())  # type: ignore[attr-defined]


def busy_with_a_prefetched_call(o: TaskOrchestrator, gate: Gate) -> concurrent.futures.Future:
    """One worker: make it run a blocking task; the caller then submits, and the worker takes
    one call ahead of it (its prefetch) that it cannot start until the gate opens."""
    assert o.run(t.square, 1).result(R) == 1  # a first duration: prefetch beyond one call
    blocked = o.run(t.blocker, str(gate.started), str(gate.release_fifo))
    gate.wait_started()
    return blocked


def test_is_a_concurrent_futures_executor_with_submit_and_map(make_executor: Make) -> None:
    ex = make_executor(2)
    assert isinstance(ex, concurrent.futures.Executor)
    assert ex.submit(t.add, 1, b=2, policy="p").result(R) == (3, "p")
    assert list(ex.map(t.square, range(20))) == [i * i for i in range(20)]
    assert list(ex.map(t.square, range(20), chunksize=7)) == [i * i for i in range(20)]
    assert list(ex.map(t.add, [1, 2], [10, 20], timeout=R)) == [(11, ""), (22, "")]
    assert list(ex.map(t.square, [])) == []
    with pytest.raises(ValueError, match="chunksize"):
        ex.map(t.square, [1], chunksize=0)
    with pytest.raises(SerializationError):
        ex.submit(t.identity, threading.Lock())  # pickled in the caller: nothing enqueued
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            Executor(max_workers=bad)


def test_map_raises_the_first_exception_where_it_occurs(make_executor: Make) -> None:
    results = make_executor(2).map(divmod, [1, 1, 1, 1], [2, 3, 0, 5])
    assert next(results) == (0, 1)
    assert next(results) == (0, 1)
    with pytest.raises(ZeroDivisionError):
        next(results)


def test_run_in_executor(make_executor: Make) -> None:
    ex = make_executor(2)

    async def main() -> list[int]:
        loop = asyncio.get_running_loop()
        return list(await asyncio.gather(*(loop.run_in_executor(ex, t.square, n)
                                           for n in range(5))))

    assert asyncio.run(main()) == [0, 1, 4, 9, 16]


def test_submit_waits_for_room_and_the_backlog_stays_bounded(make_executor: Make, gates) -> None:
    ex = make_executor(1, max_backlog=1)
    o = ex.orchestrator
    gate = gates("b")
    blocked = ex.submit(t.blocker, str(gate.started), str(gate.release_fifo))
    gate.wait_started()
    first = ex.submit(t.square, 2)  # fills the backlog
    submitted: list[concurrent.futures.Future] = []
    waiter = threading.Thread(target=lambda: submitted.append(ex.submit(t.square, 3)))
    waiter.start()
    wait_until(lambda: len(o._backlog._room_waiters) == 1, what="submit() waiting for room")
    assert o.stats().queued == 1 and not submitted
    gate.release()
    waiter.join(R)
    assert blocked.result(R) == "go" and first.result(R) == 4 and submitted[0].result(R) == 9


def test_map_timeout_raises_timeout_error_and_cancels_what_has_not_started(
        make_executor: Make, gates) -> None:
    ex = make_executor(1)
    gate = gates("b")
    blocked = ex.submit(t.blocker, str(gate.started), str(gate.release_fifo))
    gate.wait_started()
    results = ex.map(t.mark, [str(gate.started) + f".{i}" for i in range(3)], timeout=0)
    with pytest.raises(TimeoutError):
        next(results)
    results.close()
    assert ex.orchestrator.stats().cancelled == 3
    gate.release()
    assert blocked.result(R) == "go"
    ex.shutdown()
    assert not list(Path(gate.started).parent.glob("b.started.*"))  # none ran


def test_cancel_recalls_a_call_that_a_worker_holds_but_has_not_started(
        make_orchestrator, gates, tmp_path: Path) -> None:
    o = make_orchestrator(worker_count=1)
    gate = gates("b")
    blocked = busy_with_a_prefetched_call(o, gate)
    pids = o.worker_pids()
    marker = tmp_path / "ran"
    held_back = o.run(t.mark, str(marker))
    wait_until(lambda: held(o) == 2, what="the worker to take the call ahead")
    assert held_back.cancel() and held_back.cancelled()
    assert not held_back.running() and held_back.done()
    s = o.stats()
    assert s.cancelled == 1 and s.queued == 0 and s.running == 1
    gate.release()
    assert blocked.result(R) == "go"
    assert o.run(t.square, 5).result(R) == 25  # the worker goes on, in order: the call is gone
    assert not marker.exists() and o.worker_pids() == pids  # recalled, not killed
    assert not blocked.cancel()  # finished: nothing to cancel


def test_cancel_of_a_started_task_is_refused(make_orchestrator, gates) -> None:
    o = make_orchestrator(worker_count=1)
    gate = gates("b")
    blocked = o.run(t.blocker, str(gate.started), str(gate.release_fifo))
    gate.wait_started()
    assert not blocked.cancel() and blocked.running()
    gate.release()
    assert blocked.result(R) == "go" and o.stats().cancelled == 0


def test_shutdown_cancel_futures_cancels_calls_a_worker_holds_too(
        make_executor: Make, gates, tmp_path: Path) -> None:
    ex = make_executor(1)
    o = ex.orchestrator
    gate = gates("b")
    blocked = busy_with_a_prefetched_call(o, gate)
    queued = [ex.submit(t.mark, str(tmp_path / f"ran{i}")) for i in range(3)]
    wait_until(lambda: held(o) >= 2, what="the worker to take a call ahead")
    ex.shutdown(wait=False, cancel_futures=True)
    assert all(f.cancelled() for f in queued)
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(t.square, 1)
    gate.release()
    ex.shutdown(wait=True)
    assert blocked.result(R) == "go" and not o.worker_pids()
    assert not list(tmp_path.glob("ran*"))
    s = o.stats()
    assert (s.cancelled, s.succeeded) == (3, 2)


def test_a_crash_fails_its_task_and_the_executor_goes_on(make_executor: Make,
                                                         tmp_path: Path) -> None:
    ex = make_executor(2)
    crashed = ex.submit(t.exit_first_time, str(tmp_path / "marker"), 1)
    with pytest.raises(WorkerCrashedError):
        crashed.result(R)
    assert list(ex.map(t.square, range(4))) == [0, 1, 4, 9]


def test_interpreter_exit_runs_what_was_submitted_then_refuses_more() -> None:
    # What CPython's test_interpreter_shutdown and test_submit_after_interpreter_shutdown
    # check, for taskorch.Executor (they can only name the stdlib's executors).
    script = """if 1:
        import atexit

        @atexit.register
        def after_taskorch():  # registered first: runs after taskorch's exit hook
            try:
                ex.submit(id, None)
            except RuntimeError:
                print("runtime-error", flush=True)

        import _tasks as t
        from taskorch import Executor
        ex = Executor(2)
        ex.submit(t.print_line, "apple")
    """
    env = dict(os.environ, PYTHONPATH=TESTS_DIR)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, env=env,
                          timeout=scaled(60))
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split() == ["apple", "runtime-error"]
    assert "Traceback" not in done.stderr.decode()
