"""The hard timeout on Dask, on a real ``distributed.LocalCluster`` (2 worker processes under
nannies, 1 thread each; its own, since these tests restart its workers): an attempt that the
in-process interrupt cannot reach (a thread blocked in C) fails on time, the worker's nanny
restarts the worker process, the slot stays busy until it is back, and the next task runs; a
cluster without nannies fails the attempt on time all the same and says why it cannot restart.
A terminate (``Client.cancel(id, terminate=True)`` on ``taskorch serve --dask``) is the same
restart: the task ends cancelled, never retried, and the next task runs.

The fixtures (the cluster, ``no_leaks`` allowing the cluster's processes, gates, ``make_dask``)
are test_dask's. Handshakes order events; the result timeouts only catch deadlocks: each is
shorter than the blocking call it guards against, so that a timeout which only took effect
when the call returned by itself fails the test instead of passing it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

distributed = pytest.importorskip("distributed")

import _tasks as t  # noqa: E402
import test_dask  # noqa: E402
import test_service  # noqa: E402
from _tasks import wait_until  # noqa: E402
from test_dask import WORKERS, R, _Gate  # noqa: E402

from taskorch import Policy, TaskOrchestrator, TaskTimeoutError  # noqa: E402
from taskorch.dask import DaskBackend  # noqa: E402

Make = Callable[..., TaskOrchestrator]
#: How long the stuck tasks block by themselves: far longer than any guard below.
STUCK = 60.0
#: The deadlock guard for a hard timeout (0.5 s timeout + 1 s kill_grace, then events).
SEEN_BY = 20.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    """test_dask's cluster, but a LocalCluster closes a worker's nanny when a worker of the
    same name has been gone for ``lost-worker-timeout`` (15 s) after *any* of its removals: a
    second restart of the same worker within that time may be cut short by the first one's
    timer. Here restarts follow each other closely: the timeout is made longer than the tests."""
    import dask

    with dask.config.set({"distributed.deploy.lost-worker-timeout": "1h"}):
        yield from test_dask.local_cluster()


# test_dask's fixtures, on this module's cluster.
client = test_dask.client
no_leaks = test_dask.no_leaks
gates = test_dask.gates
make_dask = test_dask.make_dask
# test_service's served pool, here on this module's cluster (``--dask``).
start_server = test_service.start_server
short_dir = test_service.short_dir


# -- tasks (run in the Dask workers, imported by reference from this module) ----------------------


def sleep_announced(started: str, seconds: float) -> str:
    """Announce the start, then sleep in C: the thread interrupt cannot reach it."""
    t.announce(started)
    time.sleep(seconds)
    return "slept"


def hang_once(marker: str, started: str, never_fifo: str) -> str:
    """The first time: announce, block SIGALRM and wait in C on a FIFO nobody writes. Then
    (a retry, in the restarted or another worker process): return at once."""
    if os.path.exists(marker):
        return f"ran again in {os.getpid()}"
    Path(marker).touch()
    t.hang_with_signals_blocked(started, never_fifo)
    return "unreachable"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _worker_pids(client: Any) -> set[int]:
    return set(client.run(os.getpid, on_error="ignore").values())


# -- the tests -------------------------------------------------------------------------------------


def test_a_sleep_past_its_timeout_fails_on_time_and_its_worker_is_restarted(
    make_dask: Make, client: Any, gates: Callable[[str], _Gate],
) -> None:
    o = make_dask(policy=Policy(timeout=0.5))
    gate = gates("sleeper")
    f = o.run(sleep_announced, str(gate.started), STUCK)
    stuck_pid = gate.wait_started()
    gate.done_with = True  # nothing to release: the restart ends it
    error = f.exception(SEEN_BY)  # the sleep itself would take STUCK seconds
    assert isinstance(error, TaskTimeoutError), error
    assert "0.5 s timeout" in str(error) and "is restarted" in str(error)
    assert f.attempts == 1
    # A new worker process in its place: the cluster is back to its size without that pid.
    wait_until(lambda: not alive(stuck_pid), what="the stuck worker process to be gone")
    client.wait_for_workers(WORKERS, timeout=R)
    wait_until(lambda: o.stats().workers == WORKERS and o.stats().worker_restarts >= 1,
               what="the orchestrator to see the new worker")
    assert stuck_pid not in _worker_pids(client)
    assert [o.run(t.getpid).result(R) for _ in range(4)] != [stuck_pid] * 4
    assert o.run(t.square, 7).result(R) == 49
    s = o.stats()
    assert (s.timeouts, s.crashes, s.failed, s.retried, s.running) == (1, 1, 1, 0, 0)


def test_a_task_blocked_in_c_with_signals_blocked_is_retried_after_the_restart(
    make_dask: Make, client: Any, gates: Callable[[str], _Gate], tmp_path: Path,
) -> None:
    o = make_dask(policy=Policy(timeout=0.5, retries=1, backoff_initial=0.01))
    gate = gates("hung")
    never = tmp_path / "never"
    os.mkfifo(never)
    f = o.run(hang_once, str(tmp_path / "marker"), str(gate.started), str(never))
    stuck_pid = gate.wait_started()
    gate.done_with = True
    assert f.result(R).startswith("ran again in")  # the retry's outcome: the task's own
    assert f.attempts == 2
    s = o.stats()
    assert (s.timeouts, s.crashes, s.retried, s.succeeded) == (1, 1, 1, 1)
    wait_until(lambda: not alive(stuck_pid), what="the stuck worker process to be gone")


def test_the_slot_stays_busy_until_the_restarted_worker_is_back(
    make_dask: Make, client: Any, gates: Callable[[str], _Gate], tmp_path: Path,
) -> None:
    # One task at a time: while the stuck task's worker restarts, the other worker idles, and
    # the next task must still wait, since the stuck thread runs on until the restart ends it.
    o = make_dask(worker_count=1, policy=Policy(timeout=0.5))
    gate = gates("hung")
    never = tmp_path / "never"
    os.mkfifo(never)
    f = o.run(t.hang_with_signals_blocked, str(gate.started), str(never))
    stuck_pid = gate.wait_started()
    gate.done_with = True
    assert isinstance(f.exception(SEEN_BY), TaskTimeoutError)
    after = o.run(alive, stuck_pid)  # offered while the restart is under way
    assert after.result(R) is False  # it started only once the stuck process was gone
    assert o.stats().workers == WORKERS


def test_a_worker_without_a_nanny_fails_the_attempt_on_time_and_says_why(
    make_orchestrator: Make, gates: Callable[[str], _Gate], caplog: pytest.LogCaptureFixture,
) -> None:
    # Workers in this process (processes=False): no nanny can restart them.
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as bare:
        o = make_orchestrator(backend=DaskBackend(bare.scheduler_address),
                              policy=Policy(timeout=0.5))
        gate = gates("blocked")
        with caplog.at_level(logging.WARNING, logger="taskorch"):
            f = o.run(t.blocker, str(gate.started), str(gate.release_fifo))
            try:
                gate.wait_started()
                # The blocker waits for its release in C: only the hard timeout fails it.
                assert isinstance(f.exception(SEEN_BY), TaskTimeoutError)
                wait_until(lambda: any("could not restart" in r.getMessage()
                                       for r in caplog.records), what="the warning")
                assert o.run(t.square, 3).result(R) == 9  # the other thread serves
            finally:
                try:
                    gate.release()  # the thread returns; the held slot frees
                except BrokenPipeError:
                    # The interrupt still pending in that thread fires as soon as its open()
                    # returns, which closes the FIFO before our write: it was let go all the same.
                    pass
        assert [o.run(t.square, i).result(R) for i in range(4)] == [0, 1, 4, 9]
        warned = [r for r in caplog.records if "could not restart" in r.getMessage()]
        assert len(warned) == 1 and "nanny" in warned[0].getMessage()
        assert o.stop(R).drained
        assert len(bare.scheduler.workers) == 1  # not shut down by taskorch


def test_terminate_on_dask_restarts_the_worker_and_the_task_ends_cancelled(
    cluster: Any, client: Any, start_server: Any, short_dir: Path,
) -> None:
    server = start_server("--dask", cluster.scheduler_address)
    started, never = short_dir / "stuck.started", short_dir / "never"
    os.mkfifo(never)
    with server.connect() as served:
        stuck = served.with_policy(Policy(retries=3)).run(
            t.hang_with_signals_blocked, str(started), str(never))
        wait_until(lambda: started.exists() and started.read_text(), what="the stuck task")
        stuck_pid = int(started.read_text())
        # The task runs before the server hears of its start (the attempt's start ack comes
        # through the scheduler): a terminate needs the server to know it is running.
        wait_until(lambda: served.task(stuck.task_id).state == "running",
                   what="the server to see the task running")
        assert served.cancel(stuck.task_id) is False  # running: without terminate, it runs on
        assert served.cancel(stuck.task_id, terminate=True) is True
        concurrent.futures.wait([stuck], timeout=R)
        assert stuck.cancelled()  # never retried, though its policy allows 3 retries
        info = served.task(stuck.task_id)
        assert info.state == "cancelled" and info.attempts == 1
        wait_until(lambda: not alive(stuck_pid), what="the stuck worker process to be gone")
        client.wait_for_workers(WORKERS, timeout=R)
        assert served.run(t.square, 7).result(R) == 49
        assert served.cancel(stuck.task_id, terminate=True) is False  # ended


def test_terminate_on_a_dask_worker_without_a_nanny_answers_false_and_the_task_runs_on(
    start_server: Any, gates: Callable[[str], _Gate],
) -> None:
    # Workers in this process (processes=False): no nanny can restart them; on TCP, for the
    # server's process. The cancel used to wait for an outcome that was not coming and fail
    # with ServerTimeoutError.
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  protocol="tcp", host="127.0.0.1",
                                  dashboard_address=None) as bare:
        server = start_server("--dask", bare.scheduler_address)
        gate = gates("runs-on")
        with server.connect() as served:
            # (no timeout: the attempt timer's thread, in this process, would outlive it)
            running = served.with_policy(Policy()).run(
                t.blocker, str(gate.started), str(gate.release_fifo))
            gate.wait_started()
            wait_until(lambda: running.task_id and served.task(running.task_id).state == (
                "running"), what="the server to see the start")  # (task_id: once committed)
            assert served.cancel(running.task_id, terminate=True) is False
            assert served.task(running.task_id).state == "running"
            log = server.stderr()
            assert "could not be terminated" in log and "nanny" in log
            assert "overran its timeout" not in log  # (no timeout happened)
            gate.release("ran on")
            assert running.result(R) == "ran on"
        assert len(bare.scheduler.workers) == 1  # not shut down by taskorch


@pytest.mark.slow
def test_a_terminate_on_dask_runs_the_other_attempts_of_its_worker_again_uncharged(
    start_server: Any, short_dir: Path,
) -> None:
    # One worker process (a nanny), two threads: the task terminated and an innocent one.
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=True,
                                  dashboard_address=None) as one:
        server = start_server("--dask", one.scheduler_address)
        never = short_dir / "never"
        os.mkfifo(never)
        stuck_started, other_started = short_dir / "stuck.started", short_dir / "other.started"
        once = Policy(retries=0)  # one attempt: a charge would fail it
        with server.connect() as served:
            stuck = served.with_policy(once).run(
                t.hang_with_signals_blocked, str(stuck_started), str(never))
            other = served.with_policy(once).run(
                hang_once, str(short_dir / "marker"), str(other_started), str(never))
            wait_until(lambda: stuck_started.exists() and other_started.exists(),
                       what="both tasks to start in the worker")
            for task in (stuck, other):  # (task_id: once committed)
                wait_until(lambda task=task: task.task_id and served.task(
                    task.task_id).state == "running", what="the server to see both start")
            assert served.cancel(stuck.task_id, terminate=True) is True
            assert other.result(R).startswith("ran again in")  # not failed with a crash
            info = served.task(other.task_id)
            assert info.state == "succeeded" and info.attempts == 1
            assert served.task(stuck.task_id).state == "cancelled"
        log = server.stderr()
        assert f"was restarted to terminate task {stuck.task_id}; run again, not charged" in log
        assert "segfault" not in log
