"""Worker process entry point: the main thread runs calls, a reader thread receives them.

The process is started by the parent's dispatcher thread with loky's process context (start
method "loky": fork+exec of a fresh interpreter, safe from a threaded parent; the parent's
``__main__`` is not re-run). Its one channel is ``conn``, the private duplex connection to the
parent (see ``_wire``), used by two threads:

- "taskorch-call-reader" (daemon) is the only reader. It moves CALLS into ``_Inbox`` (so the
  socket buffer stays empty and the parent's sends never block while the main thread is busy),
  answers RECALL by handing back the calls not started yet (the parent gives them to an idle
  worker), and on SHUTDOWN closes the inbox. EOF means the parent process died, even by
  SIGKILL: it ends the process at once, mid-task included, with its process group (the stdlib
  pools leave orphans: CPython gh-111873).
- the main thread runs calls in order (tasks run in the main thread, so the per-attempt
  SIGALRM interrupt reaches them) and writes the events.

``_Inbox.cond`` (on ``_Inbox.lock``) guards the calls not started and the closed flag; the
reader takes it to add or hand back calls, the main thread to take the next one.
``send_lock`` serializes writes to ``conn`` (events from the main thread, Recalled from the
reader); nothing blocks while holding it but the write itself.

Process group and signals (``_lead_own_process_group``, first thing, before any task runs):

- The worker leads its own process group (``setpgid(0, 0)``; same session, so a terminal's
  SIGHUP still goes to the parent only). Every process a task starts joins that group, and
  the parent kills the group (``WorkerProcess.reap``/``kill``) whenever the worker ends: crash,
  hard timeout, stop, recycling. Signals sent to the *parent's* group (Ctrl-C's SIGINT,
  ``timeout(1)``'s SIGTERM, ``kill -TERM -PGID``) no longer reach workers: the parent
  decides (``taskorch run`` drains, exits 143). SIGINT is ignored as well, for a signal sent
  to every process of the session.
- Parent death. ``PR_SET_PDEATHSIG`` (SIGKILL) ends the worker even when its task holds the
  GIL in C code; it is tied to the *thread* that spawned us, which is why only the parent's
  dispatcher thread spawns workers. SIGKILL leaves no chance to kill the group, so a
  "guardian" does that: a process forked here before any thread or task exists
  (``_guard_group``, named "taskorch-guard"), in the group, with every signal blocked and
  no descriptor but two pidfds (the parent's and the worker's). When either process ends it
  SIGKILLs the group (itself included). It also covers a task that clears PDEATHSIG and
  holds the GIL (the guardian watches the parent itself). Without pidfds (Linux < 5.3,
  other systems) there is no guardian; the reader thread then kills the group on EOF
  (``_exit_with_group``), which needs the GIL: with PDEATHSIG the worker dies first and its
  group lives on; without it (a task cleared it, or not Linux) a task holding the GIL keeps
  the worker and its group alive until it lets go.
- A process that leaves the group itself (``setsid()``/``setpgid()``, as a daemon does)
  escapes every group kill. The worker is a child subreaper (``PR_SET_CHILD_SUBREAPER``):
  such a process, orphaned by a daemon's double fork, becomes the worker's child rather than
  init's, and a worker that exits normally (``stop()``, recycling) kills and reaps every child
  it has but the guardian (``_end_adopted``). On a hard kill or a stop-timeout kill the parent
  kills it if it is below the worker at that moment (from /proc); not after a crash or a
  parent death. Adopted processes that exit stay zombies of the worker until it exits.
  A SIGKILL to the guardian itself (the OOM killer, an operator) leaves
  only the parent's group kill. Killed processes that the worker no longer parents are reaped
  by init (or the nearest subreaper); a container whose PID 1 does not reap keeps zombies.
- Startup window: between the fork and ``setpgid`` (interpreter start, before Ready) a
  worker is still in the parent's group; a group signal then kills it. It held no call (the
  parent hands none over before Ready), so it is only replaced.
- SIGTERM keeps its default action (the parent's hard kill sends it to the group first);
  SIGALRM belongs to the per-attempt timer (``_worker.attempts``).
- A task that waits for "any child" (``os.wait()``) with no child of its own waits forever
  instead of failing, since the guardian is a child of the worker.
- A task that reads the terminal gets EIO: workers are a background group of its session, and
  SIGTTIN/SIGTTOU are ignored so that no worker is ever stopped by its terminal (before, a
  task competed with the application for terminal input).
- systemd's default ``KillMode=control-group`` signals every process of the unit's cgroup
  one by one, not a process group: workers still get that SIGTERM and die of it. Run a
  service with ``KillMode=mixed`` (SIGTERM to the main process only, SIGKILL to what is left
  after ``TimeoutStopSec``), so that the parent drains.
- Resource trackers: workers use the parent's (loky and multiprocessing hand theirs down), which
  exit once nothing holds their pipes; a leftover holding them kept them alive before. One
  that a worker starts itself is in its group and is killed with it, unable to unlink what a
  crashed task leaked.

This module imports only the worker side (``_wire``, ``_errors``, ``_policy``,
``_worker.attempts``) and starts no thread at import.
"""

from __future__ import annotations

import ctypes
import functools
import os
import select
import signal
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection
from typing import NoReturn

from taskorch._framing import write_frame
from taskorch._policy import Policy
from taskorch._wire import (
    RECALL,
    SHUTDOWN,
    Call,
    WireMessage,
    decode_calls,
    decode_policy,
    encode_exception,
    encode_frame,
    failed,
    ready,
    recalled,
    reported,
    retiring,
    succeeded,
)
from taskorch._worker import progress
from taskorch._worker.attempts import AttemptRunner

#: Exit status of a worker that saw its parent die.
EXIT_PARENT_GONE = 70
#: Linux prctl(2) options.
_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
_PR_SET_CHILD_SUBREAPER = 36

#: Pid of this worker's guardian (see the module docstring), None without one. Set once by the
#: main thread before any other thread exists; read when the worker exits.
_guardian: int | None = None


class _Inbox:
    def __init__(self) -> None:
        self.lock = threading.Lock()  # (the main thread's take: the C lock, not a Python call)
        self.cond = threading.Condition(self.lock)
        self.calls: deque[Call] = deque()  # handed over, not started, in order
        self.closed = False  # SHUTDOWN received: no more calls will come


def worker_main(
    conn: Connection, default_policy: bytes, parent_pid: int, max_memory_mib: float | None,
) -> None:
    _lead_own_process_group(parent_pid)
    send_lock = threading.Lock()
    outbox: list[WireMessage] = []

    fd = conn.fileno()

    def flush() -> None:
        if outbox:
            with send_lock:
                write_frame(fd, encode_frame(outbox))
            outbox.clear()

    inbox = _Inbox()
    threading.Thread(target=_read_calls, args=(conn, inbox, send_lock),
                     name="taskorch-call-reader", daemon=True).start()
    policies: dict[bytes, Policy] = {}
    default = decode_policy(default_policy)
    runner = AttemptRunner(outbox.append, flush)
    progress.install(functools.partial(_report, fd, send_lock))
    outbox.append(ready(os.getpid()))
    try:
        while True:
            with inbox.lock:
                call = inbox.calls.popleft() if inbox.calls else None
                if call is None and inbox.closed:
                    break
            if call is None:
                flush()  # before waiting: the parent must see every outcome
                with inbox.cond:
                    inbox.cond.wait_for(lambda: inbox.calls or inbox.closed)
                continue
            progress.begin(call.task_id)
            try:
                outbox.append(_run_task(runner, call, default, policies))
            finally:
                progress.end()
            if max_memory_mib is not None and _rss_mib() > max_memory_mib:
                outbox.append(retiring(f"resident memory above {max_memory_mib:g} MiB"))
                break  # calls still in the inbox were never started: the parent re-dispatches them
        flush()
    except OSError:
        _exit_with_group(EXIT_PARENT_GONE)  # the channel broke: the parent is gone
    _exit_quickly()


def _exit_quickly() -> None:
    """Exit without the interpreter's teardown (module cleanup and a final GC take tens of ms,
    which stop() would wait for), but after the atexit handlers that tasks may have registered
    (multiprocessing's, which joins processes a task started, among them) and a stdio flush."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    _end_adopted()
    _stop_guardian()  # what tasks left in the group is the parent's to kill (WorkerProcess.reap)
    os._exit(0)


def _exit_with_group(code: int) -> NoReturn:
    """End the worker now, and with it every process its tasks started (its group)."""
    if _guardian is None and os.getpgrp() == os.getpid():
        os.killpg(0, signal.SIGKILL)  # ourselves included: nothing is left to do here
    os._exit(code)  # the guardian sees this and kills the group


def _read_calls(conn: Connection, inbox: _Inbox, send_lock: threading.Lock) -> None:
    try:
        while True:
            frame = conn.recv_bytes()
            if frame == SHUTDOWN:
                with inbox.cond:
                    inbox.closed = True
                    inbox.cond.notify()
                return
            if frame == RECALL:
                with inbox.cond:
                    taken = [call.task_id for call in inbox.calls]
                    inbox.calls.clear()
                with send_lock:
                    write_frame(conn.fileno(), encode_frame([recalled(taken)]))
                continue
            calls = decode_calls(frame)
            with inbox.cond:
                inbox.calls.extend(calls)
                inbox.cond.notify()
    except BaseException:
        _exit_with_group(EXIT_PARENT_GONE)  # EOF: the parent died or dropped us


def _report(fd: int, send_lock: threading.Lock, task_id: int, done: float,
            total: float | None, message: str | None, at: float) -> None:
    """``taskorch.progress()`` of the running task, sent now (any thread of the task)."""
    with send_lock:
        write_frame(fd, encode_frame([reported(task_id, done, total, message, at)]))


def _run_task(
    runner: AttemptRunner, call: Call, default: Policy, policies: dict[bytes, Policy],
) -> WireMessage:
    """One call, start to outcome. Everything after the start ack fails only this task: a
    policy or a call that does not unpickle here, the task's own exceptions, a result that
    does not pickle. Unpickling and pickling the result count against the first and last
    attempt's timeout, as the parent's hard timeout counts them (it runs from the start ack)."""
    task_id, policy_bytes = call.task_id, call.policy
    started = time.perf_counter()
    runner.announce_first_attempt(task_id, call.attempts_done)
    try:
        policy = default if policy_bytes is None else _policy(policy_bytes, policies)
        result = runner.run_call(call.payload, policy)
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt fail the task only
        return failed(task_id, runner.attempt, time.perf_counter() - started, encode_exception(exc))
    return succeeded(task_id, runner.attempt, time.perf_counter() - started, result)


def _policy(data: bytes, cache: dict[bytes, Policy]) -> Policy:
    policy = cache.get(data)
    if policy is None:
        policy = cache[data] = decode_policy(data)  # SerializationError: this task fails
    return policy


def _lead_own_process_group(parent_pid: int) -> None:
    """Leave the parent's process group, watch the parent, start the guardian (see the module
    docstring). Runs first in the worker, before any other thread or any task."""
    global _guardian
    try:
        os.setpgid(0, 0)
    except OSError:
        pass  # already a group or session leader: its group is its own anyway
    for sig in (signal.SIGINT, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            libc = _libc()
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
            libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)  # (see _end_adopted)
        except (OSError, AttributeError):
            pass  # the reader thread still sees the parent's death as EOF
    watched = _pidfds(parent_pid)
    if os.getppid() != parent_pid:  # the parent died before the watches were in place
        _exit_with_group(EXIT_PARENT_GONE)
    if watched is not None:
        _guardian = _start_guardian(watched)


def _pidfds(parent_pid: int) -> tuple[int, int] | None:
    """pidfds of the parent and of this worker, or None where the kernel has none. (The parent's
    is right only if it is still our parent after the call: the caller checks getppid().)"""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return None
    try:
        parent_fd: int = pidfd_open(parent_pid)
    except OSError:
        return None
    try:
        own_fd: int = pidfd_open(os.getpid())
    except OSError:
        os.close(parent_fd)
        return None
    return parent_fd, own_fd


def _start_guardian(watched: tuple[int, int]) -> int | None:
    """Fork the guardian (single-threaded here: the fork is safe); its pid, None on failure."""
    try:
        pid = os.fork()
    except OSError:
        pid = None
    if pid == 0:
        _guard_group(watched)
    for fd in watched:
        os.close(fd)
    return pid


def _guard_group(watched: tuple[int, int]) -> NoReturn:
    """The guardian's whole life: wait until the parent or the worker has ended, then SIGKILL
    the worker's process group, itself included. Every signal is blocked (the parent's SIGTERM
    to the group on a hard timeout must not end it; only SIGKILL does), and it holds no
    descriptor of the worker's: not the channel, not loky's pipes, not stdio."""
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        low, high = sorted(watched)
        os.closerange(3, low)
        os.closerange(low + 1, high)
        os.closerange(high + 1, _max_fd())
        try:
            _libc().prctl(_PR_SET_NAME, b"taskorch-guard", 0, 0, 0)
        except (OSError, AttributeError):
            pass
        poller = select.poll()
        for fd in watched:
            poller.register(fd, select.POLLIN)
        poller.poll()  # a pidfd is readable once its process has ended
        os.killpg(0, signal.SIGKILL)
    finally:
        os._exit(0)


def _end_adopted() -> None:
    """Kill and reap every child of the worker but the guardian: what its tasks left, the
    processes that left its group (``setsid()``) among them, adopted as their parents exited
    (the worker is a child subreaper). Each round may orphan the next generation onto us."""
    for _ in range(100):
        pids = [pid for pid in _children() if pid != _guardian]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for pid in pids:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _children() -> list[int]:
    """The worker's child processes (every thread's), from /proc; none where it cannot tell."""
    pids: list[int] = []
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as f:
                pids += [int(pid) for pid in f.read().split()]
    except (OSError, ValueError):
        return []
    return pids


def _stop_guardian() -> None:
    """On a normal exit: end and reap the guardian, leaving no zombie for init."""
    if _guardian is None:
        return
    try:
        os.waitid(os.P_PID, _guardian, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        os.kill(_guardian, signal.SIGKILL)  # still our child (perhaps a zombie): its pid is ours
        os.waitpid(_guardian, 0)
    except OSError:
        pass  # a task reaped it (os.wait()): its pid may be another process's now


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _max_fd() -> int:
    try:
        return max(int(os.sysconf("SC_OPEN_MAX")), 256)
    except (OSError, ValueError):
        return 65536


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm", "rb") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
