"""A worker's death touches only the task it was running; interpreter exit without stop()."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import _tasks as t
import psutil
import pytest
from _tasks import scaled, wait_until

from taskorch import Policy, TaskOrchestrator, WorkerCrashedError

Make = Callable[..., TaskOrchestrator]
R = scaled(30)


def test_a_task_that_kills_its_worker_fails_alone(make_orchestrator: Make, gates) -> None:
    o = make_orchestrator(worker_count=2)
    g = gates("survivor")
    survivor = o.run(t.blocker, str(g.started), str(g.release_fifo))
    survivor_pid = g.wait_started()
    crasher = o.run(t.crash_os_exit, 7)
    with pytest.raises(WorkerCrashedError) as info:
        crasher.result(R)
    err = info.value
    assert err.exitcode == 7 and err.signal_name is None and err.pid != survivor_pid
    assert "exited with code 7" in str(err)
    # The other worker's task went on undisturbed, and a replacement took the dead one's place.
    wait_until(lambda: len(o.worker_pids()) == 2, what="replacement worker")
    assert survivor_pid in o.worker_pids() and err.pid not in o.worker_pids()
    g.release()
    assert survivor.result(R) == "go"
    assert [o.run(t.square, i).result(R) for i in range(4)] == [0, 1, 4, 9]
    s = o.stats()
    assert s.crashes == 1 and s.worker_restarts == 1 and s.failed == 1 and s.succeeded == 5


def test_sigkill_from_outside_fails_only_the_running_task_and_names_the_signal(
    make_orchestrator: Make, gates
) -> None:
    o = make_orchestrator(worker_count=2)
    victim_gate, other_gate = gates("victim"), gates("other")
    victim = o.run(t.blocker, str(victim_gate.started), str(victim_gate.release_fifo))
    other = o.run(t.blocker, str(other_gate.started), str(other_gate.release_fifo))
    victim_pid = victim_gate.wait_started()
    other_gate.wait_started()
    os.kill(victim_pid, signal.SIGKILL)
    with pytest.raises(WorkerCrashedError) as info:
        victim.result(R)
    assert info.value.signal_name == "SIGKILL" and info.value.pid == victim_pid
    other_gate.release()
    assert other.result(R) == "go"


def test_crash_is_retried_within_the_budget(make_orchestrator: Make, tmp_path: Path) -> None:
    o = make_orchestrator(worker_count=1, policy=Policy(retries=2, backoff_initial=0.0))
    fut = o.run(t.exit_first_time, str(tmp_path / "marker"), "second try")
    assert fut.result(R) == "second try"
    assert fut.attempts == 2
    s = o.stats()
    assert s.crashes == 1 and s.retried == 1 and s.succeeded == 1


def test_handed_over_but_unstarted_tasks_rerun_elsewhere_uncharged(
    make_orchestrator: Make, gates
) -> None:
    # One worker, so that quick tasks queue up behind the blocker in its prefetch.
    o = make_orchestrator(worker_count=1, max_backlog=100)
    for f in [o.run(t.square, i) for i in range(50)]:  # teach it that tasks are quick
        f.result(R)
    g = gates("victim")
    victim = o.run(t.blocker, str(g.started), str(g.release_fifo))
    behind = [o.run(t.getpid) for _ in range(5)]
    pid = g.wait_started()
    wait_until(lambda: o._dispatcher.pool.held_calls().get(pid, 0) > 1,
               what="calls prefetched behind the blocker")
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(WorkerCrashedError):
        victim.result(R)
    pids = {f.result(R) for f in behind}
    assert pid not in pids
    assert all(f.attempts == 1 for f in behind)
    assert o.stats().retried == 0


def test_interpreter_exit_without_stop_drains_and_leaves_no_process(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    out = tmp_path / "out"
    out.mkdir()
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import _tasks
        from taskorch import Policy, TaskOrchestrator
        o = TaskOrchestrator(worker_count=2, policy=Policy())
        for i in range(20):
            o.run(_tasks.write_file, {str(out)!r} + f"/{{i}}", "done")
        print(*o.worker_pids(), flush=True)
        # no stop(): the interpreter exits here
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=scaled(60))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(str(i) for i in range(20))
    wait_until(lambda: not any(psutil.pid_exists(p)
                               and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                               for p in pids), timeout=10, what="workers gone")


def test_garbage_collected_orchestrator_drains_in_the_background(tmp_path: Path) -> None:
    import gc

    o = TaskOrchestrator(worker_count=1, policy=Policy())
    fut = o.run(t.write_file, str(tmp_path / "f"), "x")
    finished = o._dispatcher.finished
    del o
    gc.collect()
    assert finished.wait(R)
    assert fut.result(0) == str(tmp_path / "f")


def test_interpreter_exit_without_stop_does_not_hang_whatever_was_registered_first(
    tmp_path: Path
) -> None:
    # multiprocessing's exit hook must not join taskorch's workers: an earlier finalizer (a
    # TemporaryDirectory, say) changes the order in which exit hooks run.
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent(f"""
        import sys, tempfile
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        scratch = tempfile.TemporaryDirectory()
        import _tasks
        from taskorch import Policy, TaskOrchestrator
        o = TaskOrchestrator(worker_count=2, policy=Policy())
        fut = o.run(_tasks.write_file, {str(tmp_path / "done")!r}, "yes")
        print(*o.worker_pids(), flush=True)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=scaled(60))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "done").read_text() == "yes"
    pids = [int(p) for p in proc.stdout.split()]
    wait_until(lambda: not any(psutil.pid_exists(p)
                               and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                               for p in pids), timeout=10, what="workers gone")
