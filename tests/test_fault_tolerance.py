"""Fault tolerance: hard timeouts, poison tasks, recycling, the circuit breaker, no orphans,
a crash table, and the chaos test."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import _tasks as t
import psutil
import pytest
from _tasks import scaled, wait_until

from taskorch import (
    BreakerMode,
    CircuitBreaker,
    CircuitOpenError,
    Policy,
    QueueFullError,
    RemoteTaskError,
    SerializationError,
    TaskOrchestrator,
    TaskTimeoutError,
    WorkerCrashedError,
)

Make = Callable[..., TaskOrchestrator]
R = scaled(30)
TESTS = str(Path(__file__).parent)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- hard timeouts ------------------------------------------------------------------------------


def test_hard_timeout_kills_a_task_stuck_in_c_with_signals_blocked(
    make_orchestrator: Make, gates, fifo, caplog
) -> None:
    o = make_orchestrator(worker_count=2, kill_grace=0.2, policy=Policy(timeout=0.3))
    other_gate, stuck_gate = gates("other"), gates("stuck")
    other = o.with_policy(Policy()).run(
        t.blocker, str(other_gate.started), str(other_gate.release_fifo)
    )
    other_pid = other_gate.wait_started()
    with caplog.at_level(logging.WARNING, logger="taskorch"):
        stuck = o.run(t.hang_with_signals_blocked, str(stuck_gate.started), fifo("never"))
        stuck_pid = stuck_gate.wait_started()
        with pytest.raises(TaskTimeoutError, match="did not respond to the in-process interrupt"):
            stuck.result(R)
    assert any("terminating worker pid" in r.getMessage() for r in caplog.records)
    wait_until(lambda: len(o.worker_pids()) == 2, what="replacement")
    assert stuck_pid not in o.worker_pids() and other_pid in o.worker_pids()
    other_gate.release()
    assert other.result(R) == "go"  # the other worker's task was untouched
    s = o.stats()
    assert s.timeouts == 1 and s.crashes == 1 and s.worker_restarts == 1


def test_a_task_ignoring_sigterm_is_escalated_to_sigkill(
    make_orchestrator: Make, gates, fifo, caplog
) -> None:
    o = make_orchestrator(worker_count=1, kill_grace=0.2, policy=Policy(timeout=0.2))
    g = gates("stubborn")
    with caplog.at_level(logging.WARNING, logger="taskorch"):
        fut = o.run(t.hang_ignoring_sigterm, str(g.started), fifo("never"))
        pid = g.wait_started()
        with pytest.raises(TaskTimeoutError):
            fut.result(R)
    assert any("ignored SIGTERM; sending SIGKILL" in r.getMessage() for r in caplog.records)
    assert not _alive(pid)
    new_pid = o.run(t.getpid).result(R)
    assert new_pid != pid and o.worker_pids() == [new_pid]


def test_hard_timeout_is_retried_within_the_budget(
    make_orchestrator: Make, gates, fifo, tmp_path: Path
) -> None:
    o = make_orchestrator(worker_count=1, kill_grace=0.2,
                          policy=Policy(timeout=0.3, retries=1, backoff_initial=0.0))
    g = gates("stuck")
    fut = o.run(t.hang_with_signals_blocked, str(g.started), fifo("never"))
    with pytest.raises(TaskTimeoutError):
        fut.result(R)
    assert fut.attempts == 2
    s = o.stats()
    assert s.timeouts == 2 and s.crashes == 2 and s.retried == 1


# -- poison tasks and the crash table --------------------------------------------------------


def test_poison_task_fails_once_its_attempts_are_spent(make_orchestrator: Make, gates) -> None:
    o = make_orchestrator(worker_count=2, policy=Policy(retries=2, backoff_initial=0.0))
    g = gates("bystander")
    bystander = o.run(t.blocker, str(g.started), str(g.release_fifo))
    g.wait_started()
    poison = o.run(t.crash_os_exit, 9)
    with pytest.raises(WorkerCrashedError) as info:
        poison.result(R)
    assert info.value.attempts == 3 and poison.attempts == 3 and info.value.exitcode == 9
    g.release()
    assert bystander.result(R) == "go"
    s = o.stats()
    assert s.crashes == 3 and s.retried == 2 and s.failed == 1 and s.succeeded == 1


def _unpickle_phase(action: str) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    return t.takes, (t.ExplodesOnUnpickle(action),)


def _run_phase(action: str) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    return t._explode, (action,)


def _result_phase(action: str) -> tuple[Callable[..., Any], tuple[Any, ...]]:
    return t.return_exploding, (action,)


PHASES = {"unpickling the call": _unpickle_phase, "running": _run_phase,
          "pickling the result": _result_phase}
# kind -> (expected exception type, attribute check)
KINDS: dict[str, tuple[type[BaseException], Callable[[BaseException], bool]]] = {
    "raise": (Exception, lambda e: "exploded" in str(e)),
    "sys.exit": (RemoteTaskError,
                 lambda e: isinstance(e, RemoteTaskError) and e.type_name == "SystemExit"),
    "os._exit": (WorkerCrashedError,
                 lambda e: isinstance(e, WorkerCrashedError) and e.exitcode == 6),
    "segfault": (WorkerCrashedError,
                 lambda e: isinstance(e, WorkerCrashedError) and e.signal_name == "SIGSEGV"),
    "sigkill": (WorkerCrashedError,
                lambda e: isinstance(e, WorkerCrashedError) and e.signal_name == "SIGKILL"),
}
ACTIONS = {"raise": "raise", "sys.exit": "exit", "os._exit": "os_exit", "segfault": "segfault",
           "sigkill": "sigkill"}


@pytest.mark.parametrize("phase", list(PHASES))
def test_crash_table(make_orchestrator: Make, phase: str) -> None:
    """Every phase x kind fails that task alone, with a clear error; the pool lives on."""
    o = make_orchestrator(worker_count=2)
    for kind, (expected, check) in KINDS.items():
        fn, args = PHASES[phase](ACTIONS[kind])
        fut = o.run(fn, *args)
        with pytest.raises(expected) as info:
            fut.result(R)
        assert check(info.value), (phase, kind, repr(info.value))
        if kind == "raise" and phase != "running":
            assert isinstance(info.value, SerializationError), (phase, repr(info.value))
        assert o.run(t.square, 5).result(R) == 25, (phase, kind)
    s = o.stats()
    assert s.crashes == 3 and s.failed == 5 and s.succeeded == 5


# -- recycling --------------------------------------------------------------------------------


def test_max_tasks_per_worker_recycles_workers(make_orchestrator: Make) -> None:
    o = make_orchestrator(worker_count=2, max_tasks_per_worker=3, max_backlog=100)
    pids = [f.result(R) for f in [o.run(t.getpid) for _ in range(20)]]
    assert max(Counter(pids).values()) <= 3
    assert len(set(pids)) >= 7
    wait_until(lambda: len(o.worker_pids()) == 2, what="steady state after recycling")
    assert o.stats().worker_restarts >= 5


def test_recycling_keeps_queued_work_flowing(make_orchestrator: Make, gates) -> None:
    # One worker that retires after each task: while it still runs a blocker, its
    # replacement must already take the queued work (CPython gh-115634 hung here).
    o = make_orchestrator(worker_count=1, max_tasks_per_worker=1)
    g = gates("long")
    long = o.run(t.blocker, str(g.started), str(g.release_fifo))
    long_pid = g.wait_started()
    quick = [o.run(t.getpid) for _ in range(3)]
    quick_pids = [f.result(R) for f in quick]  # done while the blocker still runs
    assert not long.done() and long_pid not in quick_pids
    g.release()
    assert long.result(R) == "go"
    wait_until(lambda: not _alive(long_pid), what="the retired worker to exit")


def test_max_memory_per_worker_recycles_after_the_task_that_crossed_the_line(
    make_orchestrator: Make
) -> None:
    o = make_orchestrator(worker_count=1, max_memory_per_worker=150)
    small = o.run(t.allocate_mib, 1).result(R)
    assert o.run(t.getpid).result(R) == small  # under the line: same worker
    big = o.run(t.allocate_mib, 200).result(R)  # succeeds, then its worker retires
    after = o.run(t.getpid).result(R)
    assert big == small and after != big
    assert not _alive(big) or wait_until(lambda: not _alive(big), what="retired worker gone")
    s = o.stats()
    assert s.crashes == 0 and s.failed == 0 and s.worker_restarts == 1


# -- circuit breaker --------------------------------------------------------------------------


def test_breaker_opens_fails_fast_then_half_opens_and_closes(
    make_orchestrator: Make, tmp_path: Path, caplog
) -> None:
    breaker = CircuitBreaker(failure_threshold=3, break_duration=0.5)
    o = make_orchestrator(worker_count=2, circuit_breaker=breaker)
    with caplog.at_level(logging.WARNING, logger="taskorch"):
        for _ in range(3):
            with pytest.raises(ValueError):
                o.run(t.raise_value_error, "down").result(R)
        wait_until(lambda: o.stats().breaker_state == "open", what="open")
        marker = tmp_path / "ran"
        with pytest.raises(CircuitOpenError):
            o.run(t.write_file, str(marker), "x").result(R)
        assert not marker.exists()  # rejected without running
        wait_until(lambda: o.stats().breaker_state == "half_open", what="half-open")
        assert o.run(t.square, 3).result(R) == 9  # the probe succeeds
        assert o.stats().breaker_state == "closed"
    transitions = [r.getMessage() for r in caplog.records if "circuit breaker" in r.getMessage()]
    assert [m.split(":")[0] for m in transitions] == [
        "circuit breaker closed -> open", "circuit breaker open -> half_open",
        "circuit breaker half_open -> closed"]


def test_breaker_reopens_when_the_probe_fails(make_orchestrator: Make) -> None:
    o = make_orchestrator(worker_count=1,
                          circuit_breaker=CircuitBreaker(failure_threshold=1, break_duration=0.3))
    with pytest.raises(ValueError):
        o.run(t.raise_value_error, "1").result(R)
    wait_until(lambda: o.stats().breaker_state == "half_open", what="half-open")
    with pytest.raises(ValueError):
        o.run(t.raise_value_error, "probe").result(R)
    assert o.stats().breaker_state == "open"


def test_breaker_failure_ratio_over_a_window(make_orchestrator: Make) -> None:
    breaker = CircuitBreaker(failure_threshold=100, failure_ratio=0.5, minimum_throughput=4,
                             sampling_window=60, break_duration=30)
    o = make_orchestrator(worker_count=1, circuit_breaker=breaker)
    for ok in (True, False, True):
        fut = o.run(t.square, 2) if ok else o.run(t.raise_value_error, "x")
        concurrent.futures.wait([fut], R)
    assert o.stats().breaker_state == "closed"  # 3 < minimum_throughput
    concurrent.futures.wait([o.run(t.raise_value_error, "x")], R)  # 2 of 4 failed
    assert o.stats().breaker_state == "open"


def test_breaker_hold_mode_applies_back_pressure(make_orchestrator: Make) -> None:
    breaker = CircuitBreaker(failure_threshold=1, break_duration=0.5, mode=BreakerMode.HOLD)
    o = make_orchestrator(worker_count=1, max_backlog=3, circuit_breaker=breaker)
    with pytest.raises(ValueError):
        o.run(t.raise_value_error, "x").result(R)
    held = [o.run(t.square, i) for i in range(3)]
    with pytest.raises(QueueFullError):
        o.run(t.square, 99)
    assert o.stats().queued == 3 and not any(f.done() for f in held)
    # After break_duration one probe runs; its success closes the circuit and the rest flow.
    assert [f.result(R) for f in held] == [0, 1, 4]
    assert o.stats().breaker_state == "closed"


def test_breaker_settings_are_validated() -> None:
    for kwargs in ({"failure_threshold": 0}, {"break_duration": 0}, {"failure_ratio": 1.5},
                   {"mode": "hold"}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            CircuitBreaker(**kwargs)


# -- no orphans, signals -------------------------------------------------------------------------


APP = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import _tasks
    from taskorch import Policy, TaskOrchestrator
    o = TaskOrchestrator(worker_count=2, policy=Policy())
    gate = _tasks.Gate(__import__("pathlib").Path({tmp!r}), "mid")
    fut = o.run(_tasks.blocker, str(gate.started), str(gate.release_fifo))
    gate.wait_started()
    {tail}
""")


def test_workers_exit_when_the_parent_is_sigkilled(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(APP.format(tests=TESTS, tmp=str(tmp_path),
                                 tail="print(*o.worker_pids(), flush=True); signal.pause()"))
    app = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert app.stdout is not None
        pids = [int(p) for p in app.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        app.kill()
        app.wait(R)
        killed_at = time.monotonic()
        wait_until(lambda: not any(_alive(p) for p in pids),
                   what="orphaned workers to exit")
        assert time.monotonic() - killed_at < 2.0
    finally:
        app.kill()
        app.wait()


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_ctrl_c_reaches_the_app_not_the_workers(tmp_path: Path, inherited: str) -> None:
    # "ignored": the app starts with SIGINT ignored, as every command of a background job
    # (`./scripts/test > log &`) does when the shell has no job control (a script, `sh -c`);
    # Python then installs no KeyboardInterrupt handler, and an app that wants Ctrl-C (as
    # this one does, like the CLI) installs its own. Without it the app never sees the signal.
    tail = textwrap.dedent("""
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            print(*o.worker_pids(), flush=True)  # inside the try: SIGINT may come right after
            signal.pause()
        except KeyboardInterrupt:
            gate.release()  # the app decides: finish the running task, then stop
            report = o.stop()
            print("drained", report.drained, fut.result(), report.succeeded, flush=True)
    """)
    script = tmp_path / "app.py"
    script.write_text(APP.format(tests=TESTS, tmp=str(tmp_path), tail=tail.strip()))
    command = [sys.executable, str(script)]
    if inherited == "ignored":  # (exec keeps the pid: app.pid is the app's)
        command = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *command]
    app = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert app.stdout is not None
        pids = [int(p) for p in app.stdout.readline().split()]
        os.killpg(app.pid, signal.SIGINT)  # as a terminal does: the whole process group
        out, _ = app.communicate(timeout=R)
        assert app.returncode == 0
        assert out.split() == ["drained", "True", "go", "1"]
        assert not any(_alive(p) for p in pids)
    finally:
        if app.poll() is None:
            app.kill()
            app.wait()
        if app.stdout is not None:
            app.stdout.close()


# -- chaos -----------------------------------------------------------------------------------------


def test_chaos_random_worker_kills_and_crashing_tasks(tmp_path: Path) -> None:
    """2,000 short tasks, 2 workers, a retry budget of 3, a random worker SIGKILLed every
    ~100 ms, and 1% of the tasks os._exit on their first attempt."""
    o = TaskOrchestrator(worker_count=2, max_backlog=2000,
                         policy=Policy(retries=3, backoff_initial=0.001, backoff_max=0.01))
    resolutions: Counter[int] = Counter()
    lock = threading.Lock()

    def count(i: int) -> Callable[[concurrent.futures.Future], None]:
        def done(_: concurrent.futures.Future) -> None:
            with lock:
                resolutions[i] += 1
        return done

    rng = random.Random(1234)
    crashers = set(rng.sample(range(2000), 20))
    futures = []
    for i in range(2000):
        if i in crashers:
            fut = o.run(t.exit_first_time, str(tmp_path / f"m{i}"), i)
        else:
            fut = o.run(t.busy_identity, i, 0.001)
        assert fut is not None
        fut.add_done_callback(count(i))
        futures.append(fut)

    stop_killing = threading.Event()
    kills = []

    def killer() -> None:
        while not stop_killing.wait(0.1):  # chaos pacing, not event ordering
            pids = o.worker_pids()
            if pids:
                victim = rng.choice(pids)
                try:
                    os.kill(victim, signal.SIGKILL)
                    kills.append(victim)
                except ProcessLookupError:
                    pass

    th = threading.Thread(target=killer)
    th.start()
    try:
        done, not_done = concurrent.futures.wait(futures, timeout=scaled(120))
    finally:
        stop_killing.set()
        th.join()
    assert not not_done
    report = o.stop(timeout=scaled(30))
    assert report.drained
    assert len(kills) >= 5
    with lock:
        assert all(resolutions[i] == 1 for i in range(2000))
    for i, fut in enumerate(futures):
        if fut.exception() is None:
            assert fut.result() == i
        else:  # only a task whose whole budget went to crashes may fail
            assert isinstance(fut.exception(), WorkerCrashedError) and fut.attempts == 4, (
                i, fut.exception())
    s = o.stats()
    assert s.submitted == 2000 == s.succeeded + s.failed
    assert s.queued == s.running == s.cancelled == s.abandoned == 0
    assert s.crashes >= 20 and s.retried >= s.crashes - s.failed
    assert s.failed <= 5


def test_hard_timeout_also_kills_the_processes_the_task_started(
    make_orchestrator: Make, gates, fifo, tmp_path: Path
) -> None:
    o = make_orchestrator(worker_count=1, kill_grace=0.2, policy=Policy(timeout=0.3))
    g = gates("parent")
    pid_file = tmp_path / "grandchild"
    fut = o.run(t.spawn_child_then_hang, str(g.started), fifo("never"), str(pid_file))
    with pytest.raises(TaskTimeoutError):
        fut.result(R)
    grandchild = int(pid_file.read_text())
    wait_until(lambda: not _alive(grandchild), timeout=10,
               what="the task's own process to be killed")


def test_a_retry_backoff_longer_than_kill_grace_is_not_a_hang(
    make_orchestrator: Make, gates, fifo
) -> None:
    # Between attempts the worker sleeps; the parent's hard-timeout clock must pause then.
    o = make_orchestrator(worker_count=1, kill_grace=0.2,
                          policy=Policy(timeout=0.2, retries=1, backoff_initial=1.0, jitter=False))
    pid = o.worker_pids()
    g = gates("sleepy")
    fut = o.run(t.hang, str(g.started), fifo("never"))
    with pytest.raises(TaskTimeoutError, match="interrupted"):
        fut.result(R)
    s = o.stats()
    assert fut.attempts == 2 and s.crashes == 0 and s.timeouts == 2
    assert o.worker_pids() == pid


def test_a_policy_the_worker_cannot_unpickle_fails_only_its_task(make_orchestrator: Make) -> None:
    import types

    ghost = types.ModuleType("taskorch_test_ghost_module")  # importable here, not in workers
    exec("class GhostError(Exception):\n    pass\n", ghost.__dict__)
    sys.modules[ghost.__name__] = ghost
    try:
        o = make_orchestrator(worker_count=1)
        pid = o.worker_pids()
        fut = o.with_policy(Policy(retries=2, retry_on=(ghost.GhostError,))).run(t.square, 3)
        with pytest.raises(SerializationError, match="policy"):
            fut.result(R)
        assert o.run(t.square, 4).result(R) == 16
        assert o.worker_pids() == pid and o.stats().crashes == 0
    finally:
        del sys.modules[ghost.__name__]


def test_a_future_resolved_by_its_caller_does_not_break_the_orchestrator(
    make_orchestrator: Make, gates
) -> None:
    o = make_orchestrator(worker_count=1)
    g = gates("meddled")
    fut = o.run(t.blocker, str(g.started), str(g.release_fifo))
    g.wait_started()
    fut.set_result("mine")  # the caller meddles with the future while the task runs
    g.release()
    assert o.run(t.square, 5).result(R) == 25
    assert fut.result(0) == "mine" and o.stats().succeeded == 2
