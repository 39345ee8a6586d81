"""Child side: the state of one ``--child POOL`` run, and the pool lifecycle its sections use.

Runs in the child interpreter only, on its main thread (``call_bounded`` adds a daemon thread
per shutdown call). The JSON file it rewrites after each section is the only channel back to
the parent, which may kill this interpreter at its deadline and still read what was measured.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from . import tasks as T
from .config import FULL, POOL_LABELS, PROBE_WAIT_S, QUICK, WARM_TASK_S
from .harness import SectionError, call_bounded, describe, is_helper_process
from .pools import ADAPTERS, PoolAdapter


class Child:
    """The state of one ``--child POOL`` run: parameters, results so far, processes seen.

    The sections (``throughput``, ``lifecycle``, ``failure``) are functions of a Child: each
    builds its pools with ``new_pool``, warms them with ``warm``, and hands them back to
    ``close``, which is bounded in time whatever state the pool is in.
    """

    def __init__(self, args: Any) -> None:
        self.pool_name: str = args.child
        self.cls = ADAPTERS[args.child]
        self.out_path: str = args.child_out
        self.workers: int = args.workers
        self.p: dict[str, Any] = dict(QUICK if args.quick else FULL)
        if args.reps is not None:
            self.p["reps"] = args.reps
        self.cpu_loops: int = args.cpu_loops
        self.serial_s: float = args.serial_s
        self.sections: str = args.sections
        self.rss_bare = 0  # RSS before the pool library is imported, set by child_main
        self.result: dict[str, Any] = {
            "pool": self.pool_name, "label": POOL_LABELS[self.pool_name], "pid": os.getpid(),
            "sections": {}, "noise": {}, "notes": [], "seen_pids": {}, "current": None,
        }

    # -- bookkeeping -------------------------------------------------------------------------

    def write(self) -> None:
        """Atomically replace the JSON file: the parent may read it after killing us."""
        tmp = self.out_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.result, f, default=str)
        os.replace(tmp, self.out_path)

    def remember_tree(self) -> None:
        """Record every descendant (pid -> create time), so the parent can reap orphans."""
        import psutil

        for proc in psutil.Process().children(recursive=True):
            try:
                self.result["seen_pids"][str(proc.pid)] = proc.create_time()
            except psutil.Error:
                pass

    def reap_leftovers(self, section: str) -> None:
        """After a section: no worker of any pool may still be alive. Kill and note any."""
        import psutil

        deadline = time.monotonic() + 2.0
        while True:
            left = [p for p in psutil.Process().children(recursive=True)
                    if not is_helper_process(p)]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        if left:
            self.result["notes"].append(
                f"{section}: {len(left)} worker process(es) still alive after the pool was "
                f"stopped; killed: {[p.pid for p in left]}")
            for proc in left:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(left, timeout=2.0)

    # -- pool lifecycle ------------------------------------------------------------------------

    def new_pool(self) -> PoolAdapter:
        pool = self.cls(self.workers)
        pool.create()
        self.note_start_method(pool)
        return pool

    def note_start_method(self, pool: PoolAdapter) -> None:
        if self.result.get("start_method", "?") == "?":
            try:
                self.result["start_method"] = pool.start_method()
            except Exception as exc:  # noqa: BLE001
                self.result["start_method"] = f"? ({describe(exc)})"

    def close(self, pool: PoolAdapter, *, graceful: bool) -> None:
        """Stop *pool* within bounded time, whatever state it is in; never raises."""
        if pool.stopped or pool.pool is None:
            return
        self.remember_tree()
        stop_timeout = self.p["stop_timeout"]
        if graceful:
            try:
                call_bounded(lambda: pool.stop(stop_timeout), stop_timeout + 2.0, "stop")
                pool.stopped = True
                return
            except BaseException as exc:  # noqa: BLE001
                self.result["notes"].append(f"{self.result['current']}: graceful stop failed "
                                            f"({describe(exc)}); killing the pool")
        try:
            call_bounded(lambda: pool.kill(5.0), 10.0, "kill")
        except BaseException as exc:  # noqa: BLE001 (reap_leftovers kills what is left)
            self.result["notes"].append(f"{self.result['current']}: kill failed "
                                        f"({describe(exc)})")
        pool.stopped = True

    def warm(self, pool: PoolAdapter) -> None:
        """Bring every worker up and through a round trip before anything is timed.

        Rounds of short tasks until each of the workers has run one: spawn-based pools (loky,
        taskorch) boot their workers one after another, and a fast first worker would run a
        round of no-ops alone, leaving the second one's boot inside the timed section (it
        cost B 3-4% of its speedup here)."""
        deadline = time.perf_counter() + 30.0
        seen: set[int] = set()
        while len(seen) < self.workers:
            if time.perf_counter() >= deadline:
                raise SectionError(f"warm-up: only {len(seen)} of {self.workers} workers ran "
                                   "a task within 30 s")
            handles = [pool.submit(T.pid_after, (WARM_TASK_S,)) for _ in range(2 * self.workers)]
            seen.update(pool.get(h, max(0.0, deadline - time.perf_counter())) for h in handles)
        handles = [pool.submit(T.noop, ()) for _ in range(4 * self.workers)]
        self.wait_all(pool, handles, 30.0, "warm-up")

    def wait_all(self, pool: PoolAdapter, handles: list[Any], budget: float, what: str) -> None:
        deadline = time.perf_counter() + budget
        for i, handle in enumerate(handles):
            try:
                pool.get(handle, deadline - time.perf_counter())
            except Exception as exc:  # noqa: BLE001
                if time.perf_counter() >= deadline:
                    raise SectionError(f"{what}: only {i} of {len(handles)} results within "
                                       f"{budget:g} s") from exc
                raise SectionError(f"{what}: task {i} failed: {describe(exc)}") from exc

    def probe(self, pool: PoolAdapter) -> tuple[bool, str]:
        """Submit one echo task: does the pool still run tasks?"""
        try:
            handle = pool.submit(T.echo, (12345,))
        except Exception as exc:  # noqa: BLE001
            return False, f"submit raised {describe(exc)}"
        status, value = pool.outcome(handle, PROBE_WAIT_S)
        if status == "ok" and value == 12345:
            return True, "next task ran"
        if status == "pending":
            return False, f"next task not done within {PROBE_WAIT_S:g} s"
        return False, f"next task failed: {describe(value) if status == 'error' else value!r}"
