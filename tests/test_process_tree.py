"""A worker's process tree: what its tasks start goes with it, and a dead worker never stalls
the dispatcher (issue #11). Real processes and signals; handshakes order every step, and the
deadlines only catch deadlocks."""

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
from test_cli import records, release_once_the_signal_is_noticed, start_gated_run

from taskorch import Policy, TaskOrchestrator, TaskTimeoutError, WorkerCrashedError

Make = Callable[..., TaskOrchestrator]
R = scaled(30)
TESTS = str(Path(__file__).parent)
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
#: Before the fix the dispatcher joined a crashed worker on loky's sentinel pipe for up to 5 s
#: when a process the task started held that pipe. A deadlock guard below that, not a speed
#: bound: the crash is seen through the worker's pidfd within milliseconds.
STALL_GUARD = 4.0


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_if_alive(pids: list[int]) -> None:
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _read_pids(path: Path) -> list[int]:
    wait_until(path.exists, what=f"{path}")
    return [int(p) for p in path.read_text().split()]


# -- 1. a crash with a forked process never stalls the dispatcher ---------------------------------


def test_a_crash_that_leaves_a_process_holding_its_pipes_does_not_stall_other_tasks(
    make_orchestrator: Make, gates, tmp_path: Path,
) -> None:
    # The grandchild calls setsid(): it escapes the worker's process group on purpose, so it
    # lives on, holding every descriptor the worker had (loky's sentinel pipe among them).
    o = make_orchestrator(worker_count=2)
    warm = [gates("a"), gates("b")]  # both workers up first: no cold start inside STALL_GUARD
    warming = [o.run(t.blocker, str(g.started), str(g.release_fifo)) for g in warm]
    assert len({g.wait_started() for g in warm}) == 2
    for g, fut in zip(warm, warming):
        g.release()
        fut.result(R)
    pid_file = tmp_path / "grandchild"
    crashing = o.run(t.orphan_then_exit, str(pid_file), 7, True)
    [grandchild] = _read_pids(pid_file)
    try:
        other = o.run(t.square, 7)  # submitted while the crash is being handled
        with pytest.raises(WorkerCrashedError) as info:
            crashing.result(STALL_GUARD)
        assert info.value.exitcode == 7
        assert other.result(STALL_GUARD) == 49
        assert o.run(t.square, 8).result(STALL_GUARD) == 64  # and after it, on either worker
        assert _alive(grandchild)  # all of it happened while the grandchild held the pipes
    finally:
        _kill_if_alive([grandchild])


# -- 2. what a task starts goes with its worker ---------------------------------------------------


def test_each_worker_leads_the_process_group_of_what_its_tasks_start(
    make_orchestrator: Make
) -> None:
    o = make_orchestrator(worker_count=2)
    results = [o.run(t.process_groups).result(R) for _ in range(4)]
    for pid, group, childs_group in results:
        assert pid == group == childs_group != os.getpgrp()
        assert os.getpgid(pid) == pid  # as seen from outside


def test_a_popen_child_left_by_a_task_is_gone_after_stop(make_orchestrator: Make) -> None:
    o = make_orchestrator(worker_count=1)
    child = o.run(t.start_popen_child).result(R)
    try:
        assert _alive(child)
        assert o.stop(timeout=R).drained
        wait_until(lambda: not _alive(child), timeout=10, what="the task's child to be killed")
    finally:
        _kill_if_alive([child])


def test_a_grandchild_that_left_the_group_is_gone_after_stop(make_orchestrator: Make,
                                                              tmp_path: Path) -> None:
    """A daemon's double fork with setsid(): the grandchild leaves the worker's group and
    session, so no group kill reaches it; the worker, a child subreaper, adopts it and ends it
    when it exits."""
    o = make_orchestrator(worker_count=1)
    grandchild = o.run(t.orphan_with_setsid, str(tmp_path / "grandchild")).result(R)
    try:
        assert _alive(grandchild) and os.getsid(grandchild) != os.getsid(0)
        assert o.stop(timeout=R).drained
        wait_until(lambda: not _alive(grandchild), timeout=10, what="the grandchild to end")
    finally:
        _kill_if_alive([grandchild])


def test_an_orphaned_grandchild_is_gone_after_its_worker_crashes(
    make_orchestrator: Make, tmp_path: Path
) -> None:
    o = make_orchestrator(worker_count=1)
    pid_file = tmp_path / "grandchild"
    fut = o.run(t.orphan_then_exit, str(pid_file), 7)
    [grandchild] = _read_pids(pid_file)
    try:
        with pytest.raises(WorkerCrashedError):
            fut.result(R)
        wait_until(lambda: not _alive(grandchild), timeout=10,
                   what="the task's grandchild to be killed")
        assert o.run(t.square, 3).result(R) == 9  # a replacement took over
    finally:
        _kill_if_alive([grandchild])


def test_an_orphaned_grandchild_is_gone_after_a_hard_timeout_kill(
    make_orchestrator: Make, gates, fifo, tmp_path: Path,
) -> None:
    o = make_orchestrator(worker_count=1, kill_grace=0.2, policy=Policy(timeout=0.3, retries=0))
    g = gates("hung")
    pid_file = tmp_path / "grandchild"
    fut = o.run(t.orphan_then_hang, str(pid_file), str(g.started), fifo("never"))
    [grandchild] = _read_pids(pid_file)
    try:
        with pytest.raises(TaskTimeoutError):
            fut.result(R)
        wait_until(lambda: not _alive(grandchild), timeout=10,
                   what="the task's grandchild to be killed")
    finally:
        _kill_if_alive([grandchild])


APP = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    import _tasks
    from taskorch import Policy, TaskOrchestrator
    tmp = Path({tmp!r})
    o = TaskOrchestrator(worker_count=2, policy=Policy())
    gate = _tasks.Gate(tmp, "mid")
    fut = o.run(_tasks.start_descendants_then_block, str(tmp / "descendants"), str(gate.started),
                str(gate.release_fifo))
    gate.wait_started()
    print(*o.worker_pids(), flush=True)
    signal.pause()
""")


def test_a_parent_sigkill_takes_every_worker_and_its_descendants_down(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(APP.format(tests=TESTS, tmp=str(tmp_path)))
    app = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        assert app.stdout is not None
        workers = [int(p) for p in app.stdout.readline().split()]
        descendants = _read_pids(tmp_path / "descendants")  # a Popen child, an orphan
        # The app's own children besides (loky's and multiprocessing's resource trackers,
        # which exit once nothing holds their pipes: a leftover holding them kept them alive).
        children = [p.pid for p in psutil.Process(app.pid).children(recursive=True)]
        pids = sorted({*workers, *descendants, *children})
        assert len(workers) == 2 and len(descendants) == 2 and all(_alive(p) for p in pids)
        app.kill()
        app.wait(R)
        wait_until(lambda: not any(_alive(p) for p in pids),
                   what="every worker and every process its tasks started to be gone")
    finally:
        app.kill()
        app.wait()
        _kill_if_alive(pids)


HOLDS_GIL_APP = textwrap.dedent("""
    import signal, sys
    sys.path.insert(0, {tests!r})
    import _tasks
    from taskorch import Policy, TaskOrchestrator
    o = TaskOrchestrator(worker_count=1, policy=Policy())
    started = {started!r}
    fut = o.run(_tasks.clear_pdeathsig_then_hold_gil, started)
    _tasks.wait_until(lambda: _tasks.Path(started).exists(), what=started)
    print(*o.worker_pids(), flush=True)
    signal.pause()
""")


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="the guardian needs pidfds")
def test_a_parent_sigkill_ends_a_worker_whose_task_cleared_pdeathsig_and_holds_the_gil(
    tmp_path: Path
) -> None:
    # Neither PR_SET_PDEATHSIG nor the reader thread (which needs the GIL) can act here.
    script = tmp_path / "app.py"
    script.write_text(HOLDS_GIL_APP.format(tests=TESTS, started=str(tmp_path / "started")))
    app = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        assert app.stdout is not None
        workers = [int(p) for p in app.stdout.readline().split()]
        assert len(workers) == 1 and _alive(workers[0])
        app.kill()
        app.wait(R)
        wait_until(lambda: not _alive(workers[0]), what="the worker to be killed")
    finally:
        app.kill()
        app.wait()
        _kill_if_alive(workers)


# -- 3. a SIGTERM to the whole process group drains ------------------------------------------------


def test_a_sigterm_to_the_process_group_drains_instead_of_killing_tasks(
    tmp_path: Path, jobfile: Path,
) -> None:
    # What `timeout`, systemd and a shell's `kill -TERM -PGID` do: every process in the group.
    cli, gate_dir = start_gated_run(jobfile, tmp_path, 10, "--retries", "0", "--no-progress",
                                    start_new_session=True)
    workers = [int((gate_dir / f"{i}.started").read_text()) for i in range(2)]
    try:
        os.killpg(cli.pid, signal.SIGTERM)
        err = release_once_the_signal_is_noticed(cli, [gate_dir / f"{i}.fifo" for i in range(2)])
    finally:
        _kill_if_alive(workers)
    assert cli.returncode == 143, err
    recs = records((tmp_path / "out.jsonl").read_text())
    assert [r["index"] for r in recs] == list(range(len(recs))) and len(recs) >= 2
    assert all(r["ok"] for r in recs), [r for r in recs if not r["ok"]]
    assert recs[0]["result"] == recs[1]["result"] == "released"
    wait_until(lambda: not any(_alive(p) for p in workers), timeout=10, what="the workers to exit")
