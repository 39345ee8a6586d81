"""Child side: the throughput sections A, B, C, I and M (taskorch only).

Each function is one repetition on a fresh pool of its own, warmed up first, in the child
interpreter; ``child_main`` runs the repetitions and takes the medians.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from . import tasks as T
from .child import Child
from .config import C_SLEEP_S, DASK_A_TASKS, DASK_POOLS, M_PAIRS
from .harness import SectionError, median, percentile


def a_noop_throughput(child: Child) -> dict[str, Any]:
    """A: N no-op tasks submitted one by one, all results collected; tasks/s."""
    n = (min(child.p["a_tasks"], DASK_A_TASKS) if child.pool_name in DASK_POOLS
         else child.p["a_tasks"])
    pool = child.new_pool()
    try:
        child.warm(pool)
        child.remember_tree()
        gc.collect()
        submit, noop = pool.submit, T.noop
        t0 = time.perf_counter()
        handles = [submit(noop, ()) for _ in range(n)]
        child.wait_all(pool, handles, max(30.0, n / 200), "collect")
        elapsed = time.perf_counter() - t0
        return {"tasks_per_s": n / elapsed, "seconds": elapsed, "tasks": n}
    finally:
        child.close(pool, graceful=True)


def m_metrics_overhead(child: Child) -> dict[str, Any]:
    """A's no-op throughput with metrics off and on, on ONE pool, in M_PAIRS pairs of
    blocks of N / M_PAIRS tasks, the order alternating (off-on, on-off, ...); the median of
    the pairs' on/off ratios, by wall time and by the parent's CPU time (which the other
    processes of a shared machine disturb less). Successive blocks, and successive pools in
    one interpreter, get slower (seen on main as well): comparing separate pools, or
    blocks far apart, would measure that drift, not the metrics."""
    from taskorch._parent import figures

    n = max(200, child.p["a_tasks"] // M_PAIRS)
    pool = child.new_pool()
    wall: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    try:
        child.warm(pool)
        backlog = pool.pool._backlog
        submit, noop = pool.submit, T.noop
        for pair in range(M_PAIRS):
            for metrics in ((False, True) if pair % 2 == 0 else (True, False)):
                recorder = figures.enable(backlog) if metrics else None
                if not metrics:
                    figures.disable(backlog)
                t0, c0 = time.perf_counter(), time.process_time()
                handles = [submit(noop, ()) for _ in range(n)]
                child.wait_all(pool, handles, max(30.0, n / 200), "collect")
                wall[metrics].append(n / (time.perf_counter() - t0))
                cpu[metrics].append(n / max(1e-9, time.process_time() - c0))
                if recorder is not None:  # the figures did count the block's tasks
                    counted = sum(sum(f.run.counts) for f in recorder.by_name.values())
                    if counted < n:
                        raise SectionError(f"metrics counted {counted} of {n} tasks")
    finally:
        child.close(pool, graceful=True)
    return {
        "off_tasks_per_s": median(wall[False]), "on_tasks_per_s": median(wall[True]),
        "on_vs_off": median([on / off for on, off in zip(wall[True], wall[False])]),
        "cpu_on_vs_off": median([on / off for on, off in zip(cpu[True], cpu[False])]),
        "tasks": n * M_PAIRS * 2,
    }


def b_cpu_speedup(child: Child) -> dict[str, Any]:
    """B: N CPU tasks of ~50 ms against the same run serially in the parent."""
    n = child.p["b_tasks"]
    pool = child.new_pool()
    try:
        child.warm(pool)
        gc.collect()
        t0 = time.perf_counter()
        handles = [pool.submit(T.cpu, (child.cpu_loops,)) for _ in range(n)]
        child.wait_all(pool, handles, 60.0, "collect")
        elapsed = time.perf_counter() - t0
        return {"speedup": child.serial_s / elapsed, "parallel_s": elapsed,
                "serial_s": child.serial_s, "tasks": n}
    finally:
        child.close(pool, graceful=True)


def c_submit_latency(child: Child) -> dict[str, Any]:
    """C: each submit call timed alone while sleeping tasks keep the workers busy."""
    n = child.p["c_tasks"]
    pool = child.new_pool()
    try:
        child.warm(pool)
        gc.collect()
        clock, submit, task, args = time.perf_counter_ns, pool.submit, T.sleep_s, (C_SLEEP_S,)
        handles: list[Any] = []
        lat_ns: list[int] = []
        for _ in range(n):
            t0 = clock()
            handle = submit(task, args)
            lat_ns.append(clock() - t0)
            handles.append(handle)
        child.wait_all(pool, handles, 60.0, "collect")
        lat_ns.sort()
        return {"p50_us": percentile(lat_ns, 50) / 1e3, "p99_us": percentile(lat_ns, 99) / 1e3,
                "max_us": lat_ns[-1] / 1e3, "tasks": n}
    finally:
        child.close(pool, graceful=True)


def i_bulk_map(child: Child) -> dict[str, Any]:
    """I: N tiny items through the library's bulk API, results checked in order."""
    n = child.p["i_items"]
    pool = child.new_pool()
    try:
        child.warm(pool)
        items = list(range(n))
        gc.collect()
        t0 = time.perf_counter()
        results = pool.map(T.echo, items)
        elapsed = time.perf_counter() - t0
        if results != items:
            raise SectionError("map() returned wrong or misordered results")
        return {"items_per_s": n / elapsed, "seconds": elapsed, "items": n}
    finally:
        child.close(pool, graceful=True)
