"""Worker process entry point: the main thread runs calls, a reader thread receives them.

The process is started by the parent's dispatcher thread with loky's process context (start
method "loky": fork+exec of a fresh interpreter, safe from a threaded parent; the parent's
``__main__`` is not re-run). Its one channel is ``conn``, the private duplex connection to the
parent (see ``_wire``), used by two threads:

- "taskorch-call-reader" (daemon) is the only reader. It moves CALLS into ``_Inbox`` (so the
  socket buffer stays empty and the parent's sends never block while the main thread is busy),
  answers RECALL by handing back the calls not started yet (the parent gives them to an idle
  worker), and on SHUTDOWN closes the inbox. EOF means the parent process died, even by
  SIGKILL: it exits the process at once, mid-task included (the stdlib pools leave orphans:
  CPython gh-111873). On Linux, ``PR_SET_PDEATHSIG`` backs it up for a task that holds the GIL
  in C code, where no thread of ours can run; it is tied to the *thread* that spawned us, which
  is why only the parent's dispatcher thread spawns workers.
- the main thread runs calls in order (tasks run in the main thread, so the per-attempt
  SIGALRM interrupt reaches them) and writes the events.

``_Inbox.cond`` guards the calls not started and the closed flag; the reader takes it to add or
hand back calls, the main thread to take the next one. ``send_lock`` serializes writes to
``conn`` (events from the main thread, RECALLED from the reader); nothing blocks while holding
it but the write itself.

Signals: SIGINT is ignored (Ctrl-C in a terminal reaches the whole process group; the parent
decides). SIGTERM keeps its default action, so the parent's hard kill works. SIGALRM belongs to
the per-attempt timer (``_worker.attempts``).

This module imports only the worker side (``_wire``, ``_errors``, ``_policy``,
``_worker.attempts``) and starts no thread at import.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection

from taskorch._policy import Policy
from taskorch._wire import (
    FAILED,
    READY,
    RECALL,
    RECALLED,
    RETIRING,
    SHUTDOWN,
    SUCCEEDED,
    CallItem,
    Event,
    decode_frame,
    decode_policy,
    encode_exception,
    encode_frame,
)
from taskorch._worker.attempts import AttemptRunner

#: Exit status of a worker that saw its parent die.
EXIT_PARENT_GONE = 70


class _Inbox:
    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.calls: deque[CallItem] = deque()  # handed over, not started, in order
        self.closed = False  # SHUTDOWN received: no more calls will come


def worker_main(
    conn: Connection, default_policy: bytes, parent_pid: int, max_memory_mib: float | None,
) -> None:
    _detach_from_parent_signals(parent_pid)
    send_lock = threading.Lock()
    outbox: list[Event] = []

    def flush() -> None:
        if outbox:
            with send_lock:
                conn.send_bytes(encode_frame(outbox))
            outbox.clear()

    inbox = _Inbox()
    threading.Thread(target=_read_calls, args=(conn, inbox, send_lock),
                     name="taskorch-call-reader", daemon=True).start()
    policies: dict[bytes, Policy] = {}
    default = decode_policy(default_policy)
    runner = AttemptRunner(outbox.append, flush)
    outbox.append((READY, os.getpid()))
    try:
        while True:
            with inbox.cond:
                call = inbox.calls.popleft() if inbox.calls else None
                if call is None and inbox.closed:
                    break
            if call is None:
                flush()  # before waiting: the parent must see every outcome
                with inbox.cond:
                    inbox.cond.wait_for(lambda: inbox.calls or inbox.closed)
                continue
            outbox.append(_run_task(runner, call, default, policies))
            if max_memory_mib is not None and _rss_mib() > max_memory_mib:
                outbox.append((RETIRING, f"resident memory above {max_memory_mib:g} MiB"))
                break  # calls still in the inbox were never started: the parent re-dispatches them
        flush()
    except OSError:
        os._exit(EXIT_PARENT_GONE)  # the channel broke: the parent is gone
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
    os._exit(0)


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
                    recalled = [call[0] for call in inbox.calls]
                    inbox.calls.clear()
                with send_lock:
                    conn.send_bytes(encode_frame([(RECALLED, recalled)]))
                continue
            calls = decode_frame(frame)
            with inbox.cond:
                inbox.calls.extend(calls)
                inbox.cond.notify()
    except BaseException:
        os._exit(EXIT_PARENT_GONE)  # EOF: the parent died or dropped us


def _run_task(
    runner: AttemptRunner, call: CallItem, default: Policy, policies: dict[bytes, Policy],
) -> Event:
    """One call, start to outcome. Everything after the start ack fails only this task: a
    policy or a call that does not unpickle here, the task's own exceptions, a result that
    does not pickle. Unpickling and pickling the result count against the first and last
    attempt's timeout, as the parent's hard timeout counts them (it runs from the start ack)."""
    task_id, payload, policy_bytes, attempts_done = call
    started = time.perf_counter()
    runner.announce_first_attempt(task_id, attempts_done)
    try:
        policy = default if policy_bytes is None else _policy(policy_bytes, policies)
        result = runner.run_call(payload, policy)
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt fail the task only
        return (FAILED, task_id, runner.attempt, time.perf_counter() - started, *encode_exception(exc))
    return (SUCCEEDED, task_id, runner.attempt, time.perf_counter() - started, result)


def _policy(data: bytes, cache: dict[bytes, Policy]) -> Policy:
    policy = cache.get(data)
    if policy is None:
        policy = cache[data] = decode_policy(data)  # SerializationError: this task fails
    return policy


def _detach_from_parent_signals(parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the reader thread still sees the parent's death as EOF
    if os.getppid() != parent_pid:  # the parent died before the watch was in place
        os._exit(EXIT_PARENT_GONE)


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm", "rb") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
