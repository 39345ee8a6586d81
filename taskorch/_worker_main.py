"""Worker process entry point: the loop that reads calls and writes events, in the main thread.

The process is started by the parent's dispatcher thread with loky's process context (start
method "loky": fork+exec of a fresh interpreter, safe from a threaded parent; the parent's
``__main__`` is not re-run). Its only channels are the ones it was handed:

- ``conn``: the private duplex connection to the parent (see ``_wire``). Read by the main
  thread only when it holds no call, so the parent's prefetch limit bounds what waits in the
  socket buffer. EOF means the parent is gone: exit.
- ``lifeline``: the read end of a pipe whose only write end the parent holds and never writes.
  A daemon thread blocks on it; EOF means the parent process died (even by SIGKILL), and the
  worker exits at once, mid-task included (the stdlib pools leave orphans: CPython gh-111873).
  On Linux, ``PR_SET_PDEATHSIG`` backs it up for a task that holds the GIL in C code; it is
  tied to the *thread* that spawned us, which is why only the dispatcher thread spawns.

Signals: SIGINT is ignored (Ctrl-C in a terminal reaches the whole process group; the parent
decides). SIGTERM keeps its default action, so the parent's hard kill works. SIGALRM belongs to
the per-attempt timer (``_worker_attempts``).

This module imports only the worker side (``_wire``, ``_errors``, ``_policy``,
``_worker_attempts``) and starts no thread at import.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import deque
from multiprocessing.connection import Connection

from taskorch._errors import SerializationError
from taskorch._policy import Policy
from taskorch._wire import (
    FAILED,
    READY,
    RETIRING,
    SHUTDOWN,
    SUCCEEDED,
    CallItem,
    Event,
    decode_call,
    decode_frame,
    decode_policy,
    encode_exception,
    encode_frame,
    encode_result,
)
from taskorch._worker_attempts import AttemptRunner

#: Exit status of a worker that saw its parent die.
EXIT_PARENT_GONE = 70


def worker_main(
    conn: Connection,
    lifeline: Connection,
    default_policy: bytes,
    parent_pid: int,
    max_memory_mib: float | None,
) -> None:
    _detach_from_parent_signals(parent_pid)
    _watch_parent(lifeline)
    policies: dict[bytes, Policy] = {}
    default = decode_policy(default_policy)
    outbox: list[Event] = []

    def flush() -> None:
        if outbox:
            conn.send_bytes(encode_frame(outbox))
            outbox.clear()

    runner = AttemptRunner(outbox.append, flush)
    calls: deque[CallItem] = deque()
    try:
        conn.send_bytes(encode_frame([(READY, os.getpid())]))
        while True:
            if not calls:
                flush()
                frame = conn.recv_bytes()
                if frame == SHUTDOWN:
                    break
                calls.extend(decode_frame(frame))
                continue
            task_id, payload, policy_bytes, attempts_done = calls.popleft()
            if policy_bytes is None:
                policy = default
            else:
                policy = policies.get(policy_bytes) or policies.setdefault(
                    policy_bytes, decode_policy(policy_bytes)
                )
            outbox.append(_run_task(runner, task_id, payload, policy, attempts_done))
            if max_memory_mib is not None and _rss_mib() > max_memory_mib:
                outbox.append((RETIRING, f"resident memory above {max_memory_mib:g} MiB"))
                break  # calls still held were never started: the parent re-dispatches them
        flush()
    except (EOFError, OSError):
        os._exit(EXIT_PARENT_GONE)  # the parent closed our channel or died
    finally:
        conn.close()


def _run_task(
    runner: AttemptRunner, task_id: int, payload: bytes, policy: Policy, attempts_done: int
) -> Event:
    started = time.perf_counter()
    runner.announce_first_attempt(task_id, attempts_done)
    try:
        try:
            fn, args, kwargs = decode_call(payload)
        except Exception as exc:
            raise SerializationError(
                f"the task could not be unpickled in the worker: {type(exc).__name__}: {exc}. "
                "Its function and arguments must be importable there (a module on sys.path), "
                "or defined in __main__, a lambda or a closure (sent by value)"
            ) from exc
        value = runner.run(fn, args, kwargs, policy)
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt fail the task only
        return (FAILED, task_id, runner.attempt, time.perf_counter() - started, *encode_exception(exc))
    seconds = time.perf_counter() - started
    try:
        result = encode_result(value)
    except BaseException as exc:  # noqa: BLE001 - a __reduce__ may even call sys.exit()
        return (FAILED, task_id, runner.attempt, seconds, *encode_exception(exc))
    return (SUCCEEDED, task_id, runner.attempt, seconds, result)


def _detach_from_parent_signals(parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass  # the lifeline thread still watches the parent
    if os.getppid() != parent_pid:  # the parent died before the watch was in place
        os._exit(EXIT_PARENT_GONE)


def _watch_parent(lifeline: Connection) -> None:
    def wait_for_parent_death() -> None:
        try:
            lifeline.recv_bytes()  # the parent never writes: this returns only by EOF
        except BaseException:
            pass
        os._exit(EXIT_PARENT_GONE)

    # Daemon: it must never keep a finished worker alive; it exits with the process.
    threading.Thread(target=wait_for_parent_death, name="taskorch-parent-watch", daemon=True).start()


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm", "rb") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
