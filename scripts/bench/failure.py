"""Child side: the failure sections F (a worker crash) and G (a hung task's hard timeout).

Each function is one repetition on a fresh pool of its own, in the child interpreter. Both may
leave the pool broken, so they stop it by killing (bounded), unless the pool proved usable.
"""

from __future__ import annotations

import os
import time
from typing import Any

from . import tasks as T
from .child import Child
from .config import (
    F_CRASH_INDEX,
    F_CRASHED_WAIT_S,
    F_DEADLINE_S,
    F_TASK_S,
    G_GRACE_S,
    G_HANG_S,
    G_TIMEOUT_S,
)
from .harness import SectionError, describe


def f_crash(child: Child) -> dict[str, Any]:
    """F: one task of N calls os._exit(1); how many of the innocent others succeed,
    what became of the rest, and does the pool still run a task?"""
    n = child.p["f_tasks"]
    pool = child.new_pool()
    try:
        child.warm(pool)
        child.remember_tree()
        handles: list[Any] = []
        submit_errors: dict[int, str] = {}
        for i in range(n):
            try:
                handles.append(pool.submit(T.crash_or_sleep, (i, F_CRASH_INDEX, F_TASK_S)))
            except Exception as exc:  # noqa: BLE001 (the pool broke while we submitted)
                handles.append(None)
                submit_errors[i] = describe(exc)
        deadline = time.perf_counter() + F_DEADLINE_S
        ok = 0
        pending: list[int] = []      # indices of innocent tasks unresolved at the deadline
        errors: dict[str, int] = {}  # full description -> count (JSON, notes)
        kinds: dict[str, int] = {}   # exception type name -> count (table cell)
        for i, handle in enumerate(handles):
            if i == F_CRASH_INDEX:
                continue
            if handle is None:
                key = f"submit raised {submit_errors[i]}"
                errors[key] = errors.get(key, 0) + 1
                kinds["submit raised"] = kinds.get("submit raised", 0) + 1
                continue
            status, value = pool.outcome(handle, deadline - time.perf_counter())
            if status == "ok" and value == i:
                ok += 1
            elif status == "pending":
                pending.append(i)
            else:
                key = describe(value) if status == "error" else f"wrong result {value!r}"
                errors[key] = errors.get(key, 0) + 1
                kind = type(value).__name__ if status == "error" else "wrong result"
                kinds[kind] = kinds.get(kind, 0) + 1
        crashed = handles[F_CRASH_INDEX]
        if crashed is None:
            crashed_outcome = f"submit raised {submit_errors[F_CRASH_INDEX]}"
        else:
            status, value = pool.outcome(crashed, F_CRASHED_WAIT_S)
            crashed_outcome = {"ok": f"returned {value!r}", "pending":
                               f"never resolved (still pending {F_CRASHED_WAIT_S:g} s "
                               "after the others were done)"}.get(status) or describe(value)
        usable, usable_detail = child.probe(pool)
        child.remember_tree()
        # "Nothing is lost silently": once the pool is stopped, are the futures that never
        # resolved resolved now (cancelled, abandoned, failed), or still pending forever?
        child.close(pool, graceful=False)
        after_stop: dict[str, int] = {}
        for i in pending + ([F_CRASH_INDEX] if crashed is not None else []):
            status, value = pool.outcome(handles[i], 0.5)
            kind = type(value).__name__ if status == "error" else status
            after_stop[kind] = after_stop.get(kind, 0) + 1
        return {"ok": ok, "innocent": n - 1, "lost_pending": len(pending),
                "lost_pending_indices": pending, "lost_errors": errors, "lost_kinds": kinds,
                "crashed_task": crashed_outcome, "unresolved_after_stop": after_stop,
                "usable": usable, "usable_detail": usable_detail}
    finally:
        # Never graceful here: multiprocessing.Pool's close()+join() waits forever for the
        # crashed task. kill() is bounded and then reap_leftovers() cleans up.
        child.close(pool, graceful=False)


def g_hard_timeout(child: Child) -> dict[str, Any]:
    """G: a hung task with a per-task timeout: how late its failure is seen."""
    import tempfile

    if not child.cls.has_task_timeout:
        return {"supported": False}
    pool = child.new_pool()
    fd, start_file = tempfile.mkstemp(prefix="bench-hang-")
    os.close(fd)
    os.unlink(start_file)  # the task recreates it when it starts
    graceful = False
    try:
        child.warm(pool)
        t_submit = time.monotonic_ns()
        handle = pool.submit_with_timeout(T.hang, (start_file, G_HANG_S), G_TIMEOUT_S)
        status, value = pool.outcome(handle, G_TIMEOUT_S + G_GRACE_S)
        t_seen = time.monotonic_ns()
        if status == "pending":
            raise SectionError(f"the hung task was not failed {G_GRACE_S:g} s after its "
                               f"{G_TIMEOUT_S:g} s timeout")
        if status == "ok":
            raise SectionError(f"the hung task returned {value!r}")
        try:
            with open(start_file, encoding="ascii") as f:
                t_start = int(f.read())
        except (OSError, ValueError):
            t_start = None  # failed before it started: report from submit only
        timeout_ns = G_TIMEOUT_S * 1e9
        usable, usable_detail = child.probe(pool)
        graceful = usable
        return {
            "supported": True,
            "late_ms": ((t_seen - t_start - timeout_ns) / 1e6 if t_start is not None
                        else (t_seen - t_submit - timeout_ns) / 1e6),
            "late_from_submit_ms": (t_seen - t_submit - timeout_ns) / 1e6,
            "start_delay_ms": (t_start - t_submit) / 1e6 if t_start is not None else None,
            "failure": describe(value), "usable": usable, "usable_detail": usable_detail,
        }
    finally:
        child.close(pool, graceful=graceful)
        try:
            os.unlink(start_file)
        except OSError:
            pass
