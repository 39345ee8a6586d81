"""Child side: the lifecycle sections D (cold start), E (memory) and H (drain).

Each function is one repetition on a fresh pool of its own, in the child interpreter. D runs
in interpreters of its own (``parent.run_cold_starts``), so that its pool is the first one the
interpreter builds.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from . import tasks as T
from .child import Child
from .config import H_TASK_S, MIB
from .harness import SectionError, call_bounded


def d_cold_start(child: Child) -> dict[str, Any]:
    """D: constructor to the first result, the library already imported; no warm-up."""
    pool = child.cls(child.workers)
    gc.collect()
    t0 = time.perf_counter()
    try:
        pool.create()
        value = pool.get(pool.submit(T.echo, (7,)), 30.0)
        elapsed = time.perf_counter() - t0
        child.note_start_method(pool)
        if value != 7:
            raise SectionError(f"first result was {value!r}, expected 7")
        return {"cold_ms": elapsed * 1e3}
    finally:
        child.close(pool, graceful=True)


def e_memory(child: Child) -> dict[str, Any]:
    """E: RSS of this interpreter (which owns the pool) and USS of each worker."""
    import psutil

    gc.collect()
    me = psutil.Process()
    rss_before = me.memory_info().rss
    pool = child.new_pool()
    try:
        child.warm(pool)
        handles = [pool.submit(T.noop, ()) for _ in range(child.p["e_tasks"])]
        child.wait_all(pool, handles, 30.0, "collect")
        deadline = time.monotonic() + 5.0
        pids = pool.worker_pids()
        while len(pids) < child.workers and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = pool.worker_pids()
        uss = []
        for pid in pids:
            try:
                uss.append(psutil.Process(pid).memory_full_info().uss)
            except psutil.Error:
                pass
        if not uss:
            raise SectionError(f"no worker process found to measure (pids {pids})")
        rss = me.memory_info().rss
        child.remember_tree()
        return {"parent_rss_mib": rss / MIB, "parent_rss_delta_mib": (rss - rss_before) / MIB,
                "parent_rss_over_bare_mib": (rss - child.rss_bare) / MIB,
                "worker_uss_mib": sum(uss) / len(uss) / MIB,
                "worker_uss_each_mib": [u / MIB for u in uss], "workers_found": len(uss)}
    finally:
        child.close(pool, graceful=True)


def h_drain(child: Child) -> dict[str, Any]:
    """H: from the last of N short tasks completing to stop()/shutdown() returning."""
    n = child.p["h_tasks"]
    pool = child.new_pool()
    try:
        child.warm(pool)
        handles = [pool.submit(T.sleep_s, (H_TASK_S,)) for _ in range(n)]
        child.wait_all(pool, handles, 30.0, "collect")
        child.remember_tree()
        timeout = child.p["stop_timeout"]
        t0 = time.perf_counter()
        call_bounded(lambda: pool.stop(timeout), timeout + 2.0, "stop")
        elapsed = time.perf_counter() - t0
        pool.stopped = True
        return {"drain_ms": elapsed * 1e3}
    finally:
        child.close(pool, graceful=False)  # only reached unstopped if stop() failed
