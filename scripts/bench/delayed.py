"""Child side: section P (taskorch only), no-op tasks flowing past 100,000 delayed ones.

One pool per repetition: a block of N no-op tasks, then 100,000 tasks delayed by an hour
(waiting in the backlog's not-before heap, in its bound), then another block of N no-op tasks
with them waiting; the ratio of the two rates (with / without). The block with them runs
second, so the drift of successive blocks (see ``throughput.m_metrics_overhead``) counts
against it. The pool is then stopped without draining: the delayed tasks are cancelled.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from . import tasks as T
from .child import Child


def p_delayed_backlog(child: Child) -> dict[str, Any]:
    n, p_delayed = child.p["a_tasks"], child.p["p_delayed"]  # (100,000 but in --quick)
    pool = child.new_pool()
    try:
        child.warm(pool)
        orchestrator = pool.pool  # (the taskorch adapter's TaskOrchestrator)
        submit, noop = pool.submit, T.noop
        rates = []
        for delayed in (0, p_delayed):
            if delayed:
                later = orchestrator.options(delay=3600)
                t0 = time.perf_counter()
                waiting = [later.run(noop) for _ in range(delayed)]
                enqueue_us = (time.perf_counter() - t0) / delayed * 1e6
            gc.collect()
            t0 = time.perf_counter()
            handles = [submit(noop, ()) for _ in range(n)]
            child.wait_all(pool, handles, max(30.0, n / 200), "collect")
            rates.append(n / (time.perf_counter() - t0))
        assert orchestrator.stats().delayed == len(waiting) == p_delayed
    finally:
        child.close(pool, graceful=False)
    return {"without_tasks_per_s": rates[0], "with_tasks_per_s": rates[1],
            "with_vs_without": rates[1] / rates[0], "delayed": p_delayed,
            "enqueue_delayed_us": enqueue_us, "tasks": 2 * n}


def q_dependencies_and_keys(child: Child) -> dict[str, Any]:
    """Section Q (taskorch only): no-op tasks/s with plain ``run()``, then each task with one
    dependency (the task submitted 100 before it: not a serial chain), then each with a key; the
    ratios to plain in the same pool (the issue asks for at least 0.5x each), by wall time and
    by the parent's CPU time (which other processes of a shared machine disturb less: with
    one block each, the wall-time ratios swing with them)."""
    n = child.p["a_tasks"]
    pool = child.new_pool()
    try:
        child.warm(pool)
        orchestrator = pool.pool
        noop = T.noop
        rates, cpu = [], []
        for kind in ("plain", "after", "key"):
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            handles: list[Any] = []
            previous = orchestrator.run(noop)
            for i in range(n):
                if kind == "plain":
                    handles.append(orchestrator.run(noop))
                elif kind == "after":
                    before = handles[i - 100] if i >= 100 else previous
                    handles.append(orchestrator.options(after=[before]).run(noop))
                else:
                    handles.append(orchestrator.options(key=f"k{i}").run(noop))
            for handle in handles:
                handle.result(max(30.0, n / 200))
            rates.append(n / (time.perf_counter() - t0))
            cpu.append(n / max(1e-9, time.process_time() - c0))
    finally:
        child.close(pool, graceful=False)
    return {"plain_tasks_per_s": rates[0], "after_tasks_per_s": rates[1],
            "key_tasks_per_s": rates[2], "after_vs_plain": rates[1] / rates[0],
            "key_vs_plain": rates[2] / rates[0], "cpu_after_vs_plain": cpu[1] / cpu[0],
            "cpu_key_vs_plain": cpu[2] / cpu[0], "tasks": 3 * n}
