"""The Dask backend, on a real ``distributed.LocalCluster`` (2 worker processes, 1 thread each)
started once for this module: results (raw ones too), the backlog bound, the in-flight bound
following the cluster's threads, retries, per-attempt timeouts in worker threads (and the
thread timer alone), stop (drain and abandon), a worker killed mid-task, a closed Client,
recall, the circuit breaker, and what the backend refuses.

Each test uses its own ``TaskOrchestrator``. The cluster's worker processes are children of
this process, so this module overrides conftest's ``no_leaks`` with one that allows them (and
only them) while still checking every other child and every taskorch thread.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pytest

distributed = pytest.importorskip("distributed")

import _tasks as t  # noqa: E402
from _tasks import scaled, wait_until  # noqa: E402
from conftest import leftover_processes, taskorch_threads  # noqa: E402

from taskorch import (  # noqa: E402
    CircuitBreaker,
    CircuitOpenError,
    DependencyFailedError,
    Limit,
    OrchestratorBrokenError,
    Policy,
    QueueFullError,
    TaskAbandonedError,
    TaskExpiredError,
    TaskOrchestrator,
    TaskTimeoutError,
    WorkerCrashedError,
)
from taskorch._parent.task import RawOutcome  # noqa: E402
from taskorch._wire import decode_frame, encode_call  # noqa: E402
from taskorch.dask import DaskBackend  # noqa: E402

Make = Callable[..., TaskOrchestrator]
R = scaled(30)  # deadlock guard for results, not a speed assertion
WORKERS = 2


# -- the cluster, once per module ---------------------------------------------------------------


def local_cluster() -> Iterator[Any]:
    """A LocalCluster of WORKERS processes (one thread each, nannies), closed after the yield."""
    c = distributed.LocalCluster(
        n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None,
    )
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    yield from local_cluster()


@pytest.fixture(scope="module")
def client(cluster: Any) -> Iterator[Any]:
    c = distributed.Client(cluster, set_as_default=False)
    try:
        yield c
    finally:
        c.close()


def _cluster_pids(client: Any) -> set[int]:
    pids: set[int] = set()
    for pid in client.run(os.getpid, on_error="ignore").values():
        pids.add(pid)
        try:
            pids.update(p.pid for p in psutil.Process(pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return pids


@pytest.fixture(autouse=True)
def no_leaks(client: Any) -> Iterator[None]:
    """conftest's check, minus the cluster's own worker processes: also waits until the
    cluster is back to its size (a test may kill or add a worker)."""
    yield
    client.wait_for_workers(WORKERS, timeout=R)

    def strangers() -> list[psutil.Process]:
        allowed = _cluster_pids(client)
        return [p for p in leftover_processes() if p.pid not in allowed]

    wait_until(lambda: not strangers(), timeout=10,
               what="every process but the cluster's to be gone")
    wait_until(lambda: not taskorch_threads(), timeout=10, what="every taskorch thread to be gone")


class _Gate(t.Gate):
    """A Gate that knows whether its blocker was let go (released, or its worker killed)."""

    done_with = False

    def release(self, value: str = "go") -> None:
        super().release(value)
        self.done_with = True


def _free(gate: t.Gate) -> bool:
    """Release a blocker that waits on its FIFO now, without blocking (False: none waits)."""
    try:
        fd = os.open(gate.release_fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:  # ENXIO: no reader
        return False
    try:
        os.write(fd, b"go")
    finally:
        os.close(fd)
    return True


@pytest.fixture
def gates(tmp_path: Path) -> Iterator[Callable[[str], _Gate]]:
    """conftest's gates, plus a cleanup: a test that failed half-way must not leave a blocker
    holding a thread of the shared cluster for the tests after it."""
    made: list[_Gate] = []

    def make(name: str) -> _Gate:
        gate = _Gate(tmp_path, name)
        made.append(gate)
        return gate

    yield make
    for gate in made:
        if gate.done_with or not gate.started.exists():
            continue
        deadline = time.monotonic() + scaled(5)
        while not _free(gate) and time.monotonic() < deadline:
            time.sleep(0.01)


@pytest.fixture
def make_dask(make_orchestrator: Make, cluster: Any) -> Make:
    """An orchestrator on the cluster, through its own Client (stopped by make_orchestrator)."""

    def make(**kwargs: Any) -> TaskOrchestrator:
        kwargs.setdefault("backend", DaskBackend(cluster.scheduler_address))
        return make_orchestrator(**kwargs)

    return make


def _start_blockers(o: TaskOrchestrator, gates: Callable[[str], _Gate], *names: str) -> list[Any]:
    futures = []
    for name in names:
        gate = gates(name)
        futures.append((gate, o.run(t.blocker, str(gate.started), str(gate.release_fifo))))
    return futures


# -- results ------------------------------------------------------------------------------------


def test_results_of_module_functions_lambdas_and_exceptions(make_dask: Make) -> None:
    o = make_dask()
    assert o.worker_pids() == []
    assert o.worker_count == WORKERS
    square = o.run(t.square, 7)
    offset = 10
    closure = o.run(lambda x: x + offset, 1)
    kwargs = o.run(t.add, 1, b=2, policy="p")
    coro = o.run(t.async_add, 2, 3)
    boom = o.run(t.raise_value_error, "boom")
    assert square.result(R) == 49
    assert closure.result(R) == 11
    assert kwargs.result(R) == (3, "p")
    assert coro.result(R) == 5
    with pytest.raises(ValueError, match="boom") as info:
        boom.result(R)
    assert "raise_value_error" in str(info.value.__cause__)  # the remote traceback
    assert square.attempts == 1 and square.seconds is not None and square.seconds >= 0
    many = [o.run(t.identity, i) for i in range(100)]
    assert [f.result(R) for f in many] == list(range(100))
    s = o.stats()
    assert (s.submitted, s.succeeded, s.failed, s.queued, s.running) == (105, 104, 1, 0, 0)
    assert s.workers == WORKERS
    assert list(o.map(t.square, range(200))) == [i * i for i in range(200)]
    report = o.stop(R)
    assert report.drained and report.failed == 1


def test_an_existing_client_is_shared_and_not_closed(make_orchestrator: Make, client: Any) -> None:
    a = make_orchestrator(backend=DaskBackend(client))
    b = make_orchestrator(backend=DaskBackend(client))
    fa, fb = a.run(t.square, 3), b.run(t.square, 4)
    assert (fa.result(R), fb.result(R)) == (9, 16)
    a.stop(R)
    assert b.run(t.square, 5).result(R) == 25  # b still hears its events
    b.stop(R)
    assert client.status == "running"
    assert client.submit(t.square, 6, pure=False).result(R) == 36


def test_raw_tasks_get_the_pickled_outcome(make_dask: Make) -> None:
    o = make_dask()
    ok = o.intake.offer(o.intake.prepare(encode_call(t.square, (5,), {}), raw=True))
    bad = o.intake.offer(o.intake.prepare(encode_call(t.raise_value_error, ("x",), {}), raw=True))
    assert ok is not None and bad is not None
    outcome = ok.result(R)
    assert isinstance(outcome, RawOutcome) and outcome.ok and decode_frame(outcome.data) == 25
    failed = bad.result(R)
    assert isinstance(failed, RawOutcome) and not failed.ok
    assert failed.data[1] == "ValueError" and pickle.loads(failed.data[0]).args == ("x",)


# -- the backlog bound and the in-flight bound ----------------------------------------------------


def test_the_backlog_bound_is_exact_with_the_cluster_threads_busy(make_dask: Make, gates) -> None:
    o = make_dask(max_backlog=3)
    blocked = _start_blockers(o, gates, "a", "b")
    try:
        pids = {gate.wait_started() for gate, _ in blocked}
        assert len(pids) == WORKERS  # one per Dask worker process
        wait_until(lambda: o.stats().running == 2, what="both start acks")
        queued = [o.run(t.square, i) for i in range(3)]
        with pytest.raises(QueueFullError):
            o.run(t.square, 99)
        s = o.stats()
        assert (s.queued, s.running, s.rejected) == (3, 2, 1)
        assert not any(f.running() or f.done() for f in queued)
    finally:
        for gate, _ in blocked:
            gate.release()
    assert [f.result(R) for _, f in blocked] == ["go", "go"]
    assert [f.result(R) for f in queued] == [0, 1, 4]


def test_worker_count_bounds_what_runs_at_once(make_dask: Make, gates) -> None:
    o = make_dask(worker_count=1)
    assert o.worker_count == 1
    (first_gate, first), (second_gate, second) = _start_blockers(o, gates, "first", "second")
    try:
        first_gate.wait_started()
        wait_until(lambda: o.stats().running == 1, what="the first start ack")
        s = o.stats()
        assert (s.running, s.queued) == (1, 1)
        assert not second_gate.started.exists()
    finally:
        first_gate.release()
        second_gate.wait_started()
        second_gate.release()
    assert (first.result(R), second.result(R)) == ("go", "go")


def test_the_in_flight_bound_follows_the_cluster_threads(
    make_dask: Make, cluster: Any, client: Any,
) -> None:
    o = make_dask()
    assert o.worker_count == WORKERS
    cluster.scale(WORKERS + 1)
    try:
        wait_until(lambda: o.worker_count == WORKERS + 1, what="the bound to follow a new worker")
        assert o.stats().workers == WORKERS + 1 and o.stats().worker_restarts == 1
        assert [o.run(t.square, i).result(R) for i in range(6)] == [0, 1, 4, 9, 16, 25]
    finally:
        cluster.scale(WORKERS)
    wait_until(lambda: o.worker_count == WORKERS, what="the bound to follow a leaving worker")
    assert o.run(t.square, 3).result(R) == 9


# -- the policy inside the Dask worker -------------------------------------------------------------


def test_retries_run_inside_the_worker(make_dask: Make, tmp_path: Path) -> None:
    o = make_dask(policy=Policy(retries=3, backoff_initial=0.01, jitter=False))
    f = o.run(t.fail_until, str(tmp_path / "counter"), 3)
    assert f.result(R) == 3 and f.attempts == 3
    s = o.stats()
    assert (s.retried, s.succeeded, s.crashes) == (2, 1, 0)
    g = o.with_policy(Policy(retries=1, backoff_initial=0.01)).run(
        t.fail_until, str(tmp_path / "c2"), 5)
    with pytest.raises(ConnectionError, match="attempt 2 failed"):
        g.result(R)
    assert g.attempts == 2


def test_the_timeout_interrupts_a_busy_loop_in_a_worker_thread(make_dask: Make) -> None:
    o = make_dask(policy=Policy(timeout=0.5, retries=1, backoff_initial=0.01))
    f = o.run(t.busy_identity, "x", 60.0)
    # result(R) is the deadlock guard: two uninterrupted attempts would take 120 s, and a
    # plain TimeoutError from result() is not a TaskTimeoutError.
    with pytest.raises(TaskTimeoutError, match="0.5 s timeout"):
        f.result(R)
    assert f.attempts == 2
    s = o.stats()
    assert (s.timeouts, s.retried, s.failed) == (2, 1, 1)
    # The thread is free again, and the timer left nothing pending in it.
    assert [o.run(t.square, i).result(R) for i in range(4)] == [0, 1, 4, 9]


def test_the_timeout_interrupts_a_sleeping_loop(make_dask: Make) -> None:
    def sleep_in_steps(seconds: float) -> str:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(0.02)
        return "slept"

    o = make_dask(policy=Policy(timeout=0.3))
    f = o.run(sleep_in_steps, 60.0)
    with pytest.raises(TaskTimeoutError):
        f.result(R)
    # The thread is free again and the first task's timer left nothing pending in it: a
    # short task with a generous timeout of its own (0.3 s would make this a race with
    # the machine's load) runs to the end.
    assert o.with_policy(Policy(timeout=R)).run(sleep_in_steps, 0.05).result(R) == "slept"


def test_a_timer_racing_the_end_of_its_attempt_never_escapes_the_attempt(make_dask: Make) -> None:
    # Attempts that end about when their timer fires: each one either returns or fails with
    # TaskTimeoutError; the interrupt never lands in Dask's code in that thread afterwards.
    o = make_dask(policy=Policy(timeout=0.02))
    raced = [o.run(t.busy_identity, i, 0.02) for i in range(30)]
    for i, f in enumerate(raced):
        error = f.exception(R)
        assert error is None and f.result() == i or isinstance(error, TaskTimeoutError), error
    generous = [o.with_policy(Policy(timeout=5.0)).run(t.busy_identity, i, 0.01) for i in range(20)]
    assert [f.result(R) for f in generous] == list(range(20))
    s = o.stats()
    assert s.timeouts == s.failed and s.succeeded == 50 - s.failed


def test_the_thread_timer_in_process_never_leaves_an_interrupt_behind() -> None:
    # The worker side's timer, run here in plain threads: interrupts on time, never late.
    import threading

    from taskorch._worker.dask import AttemptInterrupted, ThreadTimer

    timer = ThreadTimer(idle_exit=0.05)
    results: list[str] = []

    def attempts() -> None:
        try:
            timer.call(lambda: t.busy_identity(None, 30.0), 0.1)
        except TaskTimeoutError:
            results.append("timed out")
        outcomes = set()
        for i in range(300):  # attempts that end about when their timer fires
            try:
                timer.call(lambda: (time.sleep(0.001), sum(range(50))), 0.001)
                outcomes.add("returned")
            except TaskTimeoutError:
                outcomes.add("timed out")
            try:
                for _ in range(2000):  # bytecodes after the attempt: a late interrupt lands here
                    pass
            except AttemptInterrupted:
                results.append(f"late interrupt after attempt {i}")
        results.append(",".join(sorted(outcomes)))

    threads = [threading.Thread(target=attempts) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(R)
    assert results.count("timed out") == 3
    assert not [r for r in results if r.startswith("late")], results
    assert results.count("returned,timed out") >= 1  # the race was run
    wait_until(lambda: not taskorch_threads(), what="the idle timer thread to exit")


# -- stop ------------------------------------------------------------------------------------------


def test_stop_drains_everything(make_dask: Make) -> None:
    o = make_dask()
    futures = [o.run(t.busy_identity, i, 0.05) for i in range(10)]
    report = o.stop(R)
    assert report.drained and report.succeeded == 10
    assert all(f.done() for f in futures)
    assert [f.result() for f in futures] == list(range(10))


def test_stop_timeout_abandons_the_running_and_cancels_the_queued(make_dask: Make, gates) -> None:
    o = make_dask()
    blocked = _start_blockers(o, gates, "a", "b")
    try:
        for gate, _ in blocked:
            gate.wait_started()
        wait_until(lambda: o.stats().running == 2, what="both start acks")
        queued = o.run(t.square, 3)
        started = time.monotonic()
        report = o.stop(timeout=0.5)
        # A deadlock guard, not a speed check: the blockers never end by themselves, so a
        # stop that waited for them would never return.
        assert time.monotonic() - started < R
        assert not report.drained
        assert (report.abandoned, report.cancelled) == (2, 1)
        for _, f in blocked:
            with pytest.raises(TaskAbandonedError, match="Dask cannot stop a running task"):
                f.result(0)
        assert queued.cancelled()
    finally:
        for gate, _ in blocked:
            gate.release()  # the Dask threads run on: free them for the next tests


# -- a worker lost mid-task ------------------------------------------------------------------------


def test_a_killed_dask_worker_fails_only_its_task(make_dask: Make, gates, client: Any) -> None:
    o = make_dask(policy=Policy(retries=0))
    (victim_gate, victim), (other_gate, other) = _start_blockers(o, gates, "victim", "other")
    try:
        victim_pid = victim_gate.wait_started()
        other_pid = other_gate.wait_started()
        assert victim_pid != other_pid
        wait_until(lambda: o.stats().running == 2, what="both start acks")
        os.kill(victim_pid, signal.SIGKILL)
        victim_gate.done_with = True
        with pytest.raises(WorkerCrashedError) as info:
            victim.result(R)
        assert info.value.pid == victim_pid and "Dask worker" in str(info.value)
        assert not other.done()
    finally:
        other_gate.release()
    assert other.result(R) == "go"
    s = o.stats()
    assert (s.crashes, s.failed, s.succeeded) == (1, 1, 1)
    client.wait_for_workers(WORKERS, timeout=R)  # the nanny restarts it
    assert [o.run(t.square, i).result(R) for i in range(4)] == [0, 1, 4, 9]


def test_a_task_whose_worker_was_killed_is_retried_within_its_budget(
    make_dask: Make, gates,
) -> None:
    o = make_dask(policy=Policy(retries=1, backoff_initial=0.01))
    (gate, f), = _start_blockers(o, gates, "task")
    killed = gate.wait_started()
    wait_until(lambda: o.stats().running == 1, what="the start ack")
    os.kill(killed, signal.SIGKILL)
    # The retry runs the same task again, on a live worker: it announces itself anew.
    wait_until(lambda: gate.started.read_text() != str(killed), what="the retry to start")
    gate.release()
    assert f.result(R) == "go" and f.attempts == 2
    s = o.stats()
    assert (s.crashes, s.retried, s.succeeded) == (1, 1, 1)


def test_calls_a_lost_worker_had_not_started_run_elsewhere_uncharged(
    make_dask: Make, gates,
) -> None:
    o = make_dask(policy=Policy(retries=0), max_backlog=200)
    # Tiny tasks first: the dispatcher learns their duration and prefetches from then on.
    assert [f.result(R) for f in [o.run(t.identity, i) for i in range(40)]] == list(range(40))
    (gate_a, a), (gate_b, b) = _start_blockers(o, gates, "a", "b")
    behind = [o.run(t.getpid) for _ in range(10)]  # handed over behind the two blockers
    try:
        pid_a, pid_b = gate_a.wait_started(), gate_b.wait_started()
        assert pid_a != pid_b
        wait_until(lambda: o.stats().running == 2, what="both start acks")
        early = [(f.task_id, f.result()) for f in behind if f.done()]
        assert not early, f"ran before the blockers on {pid_a}, {pid_b}: {early}"
        os.kill(pid_a, signal.SIGKILL)
        gate_a.done_with = True
        with pytest.raises(WorkerCrashedError):
            a.result(R)
        # The calls the dead worker held run on its replacement while "b" still blocks.
        wait_until(lambda: any(f.done() for f in behind), what="the re-queued calls to run")
    finally:
        gate_b.release()
    assert b.result(R) == "go"
    ran_on = [f.result(R) for f in behind]
    assert pid_a not in ran_on and all(f.attempts == 1 for f in behind)
    s = o.stats()
    assert (s.crashes, s.retried, s.failed) == (1, 0, 1)


def test_a_closed_client_breaks_the_orchestrator(make_orchestrator: Make, cluster: Any) -> None:
    own = distributed.Client(cluster, set_as_default=False)
    o = make_orchestrator(backend=DaskBackend(own))
    f = o.run(t.busy_identity, "x", 0.5)
    wait_until(lambda: o.stats().running == 1, what="the start ack")
    own.close()
    with pytest.raises(OrchestratorBrokenError, match="lost its scheduler or was closed"):
        f.result(R)
    with pytest.raises(OrchestratorBrokenError):
        o.run(t.square, 2)
    # A broken orchestrator has nothing left to drain: stop() must not wait out its timeout.
    # The margin is half that timeout, generous on a loaded machine: it tells "waited for
    # the deadline" from "returned", and measures no speed.
    started = time.monotonic()
    assert not o.stop(2 * R).drained
    assert time.monotonic() - started < R


# -- recall: calls prefetched behind a slow task move to an idle worker ----------------------------


def test_calls_waiting_behind_a_slow_task_are_recalled_for_an_idle_worker(
    make_dask: Make, gates, caplog: pytest.LogCaptureFixture,
) -> None:
    o = make_dask(max_backlog=1000)
    assert [f.result(R) for f in [o.run(t.identity, i) for i in range(60)]] == list(range(60))
    with caplog.at_level(logging.DEBUG, logger="taskorch"):
        (gate, blocked), = _start_blockers(o, gates, "slow")
        fast = [o.run(t.getpid) for _ in range(30)]  # tiny: prefetched, some behind "slow"
        try:
            gate.wait_started()
            ran_on = [f.result(R) for f in fast]  # never, if one stayed behind "slow"
            assert not blocked.done() and len(ran_on) == 30
        finally:
            gate.release()
    assert blocked.result(R) == "go"
    assert o.stats().succeeded == 60 + 30 + 1
    recalls = [r for r in caplog.records if "recalling" in r.getMessage()]
    assert recalls, "no call was prefetched behind the slow task: this test tested nothing"


# -- the circuit breaker ---------------------------------------------------------------------------


def test_the_circuit_breaker_opens_on_dask_too(make_dask: Make) -> None:
    o = make_dask(circuit_breaker=CircuitBreaker(failure_threshold=2, break_duration=60))
    for _ in range(2):
        with pytest.raises(ValueError):
            o.run(t.raise_value_error, "down").result(R)
    with pytest.raises(CircuitOpenError):
        o.run(t.square, 2).result(R)
    assert o.stats().breaker_state == "open"


# -- what the backend refuses, and how it loads ----------------------------------------------------


def test_options_that_cannot_hold_on_dask_are_refused(cluster: Any) -> None:
    backend = DaskBackend(cluster.scheduler_address)
    with pytest.raises(ValueError, match="max_tasks_per_worker"):
        TaskOrchestrator(backend=backend, max_tasks_per_worker=10)
    with pytest.raises(ValueError, match="max_memory_per_worker"):
        TaskOrchestrator(backend=backend, max_memory_per_worker=512)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # kill_grace has a meaning on Dask: the hard timeout
        o = TaskOrchestrator(backend=backend, kill_grace=3.0)
    o.stop(R)
    with pytest.raises(ValueError, match="scheduler address"):
        DaskBackend(8786)


def test_an_unreachable_scheduler_breaks_the_constructor() -> None:
    started = time.monotonic()
    with pytest.raises(OrchestratorBrokenError, match="could not use the Dask cluster"):
        TaskOrchestrator(backend=DaskBackend("tcp://127.0.0.1:9", connect_timeout=0.5))
    # Tells "connect_timeout honoured" from "distributed's default connect timeout (30 s)",
    # 40x the 0.5 s asked for: a guard against ignoring the option, not a speed check.
    assert time.monotonic() - started < 20


def test_distributed_is_imported_only_when_used() -> None:
    code = (
        "import sys, taskorch, taskorch.dask\n"
        "from taskorch import TaskOrchestrator\n"
        "assert 'distributed' not in sys.modules, 'imported too early'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=R)


def test_the_dask_worker_side_is_import_light() -> None:
    # What the Dask workers import: no parent module, not even tenacity until a retry.
    code = (
        "import sys, threading, taskorch._worker.dask\n"
        "print(sorted(m for m in sys.modules if m.startswith(('taskorch._parent', "
        "'taskorch._dask', 'taskorch._service', 'distributed', 'tenacity'))), "
        "threading.active_count())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=R)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "1"]


def test_the_command_line_runs_on_the_cluster(cluster: Any, client: Any, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    jobs = tmp_path / "cli_jobs.py"
    jobs.write_text("import os\ndef where(x):\n    return [x * 2, os.getpid()]\n")
    proc = subprocess.run(
        [sys.executable, "-m", "taskorch", "run", f"{jobs}:where",
         "--dask", cluster.scheduler_address, "--retries", "1"],
        input="".join(f"[{i}]\n" for i in range(20)), capture_output=True, text=True,
        timeout=scaled(120))
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(r["result"][0] for r in records) == [2 * i for i in range(20)]
    assert {r["result"][1] for r in records} <= _cluster_pids(client)  # ran on the cluster
    refused = subprocess.run(
        [sys.executable, "-m", "taskorch", "run", f"{jobs}:where",
         "--dask", cluster.scheduler_address, "--max-tasks-per-worker", "5"],
        input="[1]\n", capture_output=True, text=True, timeout=scaled(120))
    assert refused.returncode == 2 and "max_tasks_per_worker" in refused.stderr


def test_options_priority_delay_and_expiry_on_the_cluster(make_dask: Callable[..., Any],
                                                          gates: Callable[[str], _Gate],
                                                          tmp_path: Path) -> None:
    """The backlog is the parent's: the same options, unchanged, with both threads held."""
    o = make_dask()
    log = str(tmp_path / "log")
    held = [gates(f"busy{i}") for i in range(WORKERS)]
    blockers = [o.run(t.blocker, str(g.started), str(g.release_fifo)) for g in held]
    for g in held:
        g.wait_started()
    submitted = time.time()
    later = o.options(delay=0.5).run(t.log_start, log, "later")
    doomed = o.options(expires=0.2).run(t.log_start, log, "doomed")
    low = o.options(priority=0).run(t.log_start, log, "low")  # ("later" queues behind it)
    high = o.options(priority=7).run(t.log_start, log, "high")
    assert doomed is not None
    with pytest.raises(TaskExpiredError):
        doomed.result(R)  # the threads are still held: it never started
    held[0].release()
    for f in (blockers[0], high, low, later):
        assert f is not None
        f.result(R)
    starts = t.logged(log)
    assert [label for label, _ in starts][:2] == ["high", "low"]
    assert dict(starts)["later"] >= submitted + 0.5
    assert "doomed" not in dict(starts)
    held[1].release()
    assert o.stats().expired == 1


def test_keys_dependencies_and_limits_on_the_cluster(make_dask: Callable[..., Any],
                                                     gates: Callable[[str], _Gate],
                                                     tmp_path: Path) -> None:
    """The backlog is the parent's: keys, after= and per-name limits, unchanged."""
    name = f"{t.exclusive_logged.__module__}.{t.exclusive_logged.__qualname__}"
    o = make_dask(max_backlog=100, limits={name: Limit(concurrency=1)})
    gate = gates("keyed")
    keyed = o.options(key="tenant-42").run(t.blocker, str(gate.started), str(gate.release_fifo))
    gate.wait_started()
    assert keyed is not None and o.options(key="tenant-42").run(t.identity, "x") is keyed
    gate.release()
    assert keyed.result(R) == "go" and o.stats().submitted == 1

    a = o.run(t.identity, 1)
    b = o.options(after=[a]).run(t.square, 3)
    failing = o.options(policy=Policy(retries=0)).run(t.raise_value_error, "boom")
    dependant = o.options(after=[b, failing]).run(t.identity, "never")
    assert b is not None and b.result(R) == 9 and dependant is not None
    with pytest.raises(DependencyFailedError) as info:
        dependant.result(R)
    assert isinstance(info.value.__cause__, ValueError)
    assert failing is not None and info.value.dependency == failing.task_id

    lock, log = str(tmp_path / "held"), str(tmp_path / "log")
    first_gate = gates("limited")
    strict = o.options(policy=Policy(retries=0))
    first = strict.run(t.exclusive_logged, lock, log, str(first_gate.started),
                       str(first_gate.release_fifo))
    first_gate.wait_started()
    limited = [strict.run(t.exclusive_logged, lock, log) for _ in range(10)]
    others = [o.run(t.square, i) for i in range(10)]  # on the other thread, meanwhile
    assert [f.result(R) for f in others if f is not None] == [i * i for i in range(10)]
    assert not any(f is None or f.done() for f in limited)
    first_gate.release()
    assert first is not None and first.result(R) == lock
    assert [f.result(R) for f in limited if f is not None] == [lock] * 10
    assert t.most_at_once(log) == 1
