"""The per-task cost section (``--cost``): CPU seconds of the dispatching process per no-op task.

Runs in the interpreter the user started, on its main thread (a role of its own: it builds the
pools itself, with the child's adapters). For each setting it submits N no-op tasks one by one
and collects every result, after a warm-up, and reads the CPU time (user + system, all
threads) of:

  local            the process that owns ``TaskOrchestrator`` (``resource.getrusage``, self)
  remote, client   the process that calls ``taskorch.connect().run`` (the same)
  remote, server   the ``taskorch serve`` process, journal on and off (psutil; its own CPU
                   only, not its workers')
  floor            the bare mechanism of taskorch's shape and nothing else (``floor.py``):
                   the cheapest pool of this shape we built in this interpreter

From it: how many workers busy with 1 ms tasks one dispatcher keeps fed (1 ms over the cost
per task, were the dispatcher given a core of its own), and what share of a core it needs to
keep 16 and 64 such workers busy. CPU time is counted in clock ticks (10 ms): N is large
enough that this is well under 1%.
"""

from __future__ import annotations

import sys
import time
from typing import Any

QUICK_N = 2_000
FULL_N = 50_000
TASK_MS = 1.0   # the task length the figure is about
CORES = (16, 64)


def own_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def pid_cpu_s(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def submit_all(adapter: Any, n: int) -> float:
    """Submit *n* no-ops one by one, then wait for every result; returns the wall time."""
    from . import tasks as T

    t0 = time.perf_counter()
    handles = [adapter.submit(T.noop, ()) for _ in range(n)]
    for handle in handles:
        adapter.get(handle, 120.0)
    return time.perf_counter() - t0


def measure(kind: str, workers: int, n: int) -> dict[str, Any]:
    """One setting: 'local', 'remote' (journal), 'remote-nj' or 'floor'."""
    from .floor import FloorAdapter
    from .pools import ADAPTERS

    if kind == "floor":
        adapter = FloorAdapter(workers)
    else:
        adapter = ADAPTERS[{"local": "taskorch", "remote": "taskorch-remote",
                            "remote-nj": "taskorch-remote-nj"}[kind]](workers)
    adapter.preload()
    adapter.create()
    try:
        submit_all(adapter, min(n, 1000))  # warm-up: workers started, imports done
        server = getattr(adapter, "server", None)
        me0 = own_cpu_s()
        srv0 = pid_cpu_s(server.pid) if server is not None else 0.0
        wall = submit_all(adapter, n)
        me = own_cpu_s() - me0
        srv = pid_cpu_s(server.pid) - srv0 if server is not None else None
    finally:
        adapter.stop(30.0)
    out: dict[str, Any] = {"tasks": n, "wall_s": wall, "per_s": n / wall,
                           "own_us": me / n * 1e6}
    if srv is not None:
        out["server_us"] = srv / n * 1e6
    return out


def busy_workers(us: float) -> float:
    return TASK_MS * 1e3 / us


def print_report(results: dict[str, dict[str, Any]], workers: int, n: int, reps: int) -> None:
    print(f"## Per-task cost: CPU of the dispatching process per no-op task ({n:,} tasks, "
          f"{workers} workers, median of {reps})")
    print()
    head = ["process", "CPU per task, us", "1 ms workers it keeps busy"] + [
        f"share of a core for {c} busy 1 ms workers" for c in CORES]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    rows = [("local: the TaskOrchestrator's process", "local", "own_us"),
            ("remote: the client (connect().run), journal", "remote", "own_us"),
            ("remote: taskorch serve, journal", "remote", "server_us"),
            ("remote: the client, --no-journal", "remote-nj", "own_us"),
            ("remote: taskorch serve, --no-journal", "remote-nj", "server_us"),
            ("floor: the bare mechanism, nothing else (bench/floor.py)", "floor", "own_us")]
    for label, kind, key in rows:
        res = results.get(kind, {})
        if "error" in res:
            print(f"| {label} | error: {res['error']} | | | |")
            continue
        if key not in res:
            continue
        us = res[key]
        shares = [f"{c * us / (TASK_MS * 1e3):.0%}" for c in CORES]
        print(f"| {label} | {us:.1f} | {busy_workers(us):.0f} | " + " | ".join(shares) + " |")
    print()
    print("Busy workers = 1 ms / CPU per task: how many workers running 1 ms tasks one "
          "dispatcher could keep fed with a core to itself; a share above 100% means it cannot. "
          "Wall rates (tasks/s, these "
          + f"{workers} workers): " + ", ".join(
              f"{kind} {res['per_s']:,.0f}" for kind, res in results.items() if "per_s" in res)
          + ". The floor keeps of taskorch's shape only a future per task, the call pickled "
          "in the caller's thread, a bounded deque under a lock, one dispatcher thread and "
          "batched pipes to the workers (no retries, priorities, crash isolation, records, "
          "metrics): the cheapest pool of this shape we built in this interpreter.")


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out = dict(ok[0])
    for key in ("wall_s", "per_s", "own_us", "server_us"):
        values = sorted(r[key] for r in ok if key in r)
        if values:
            out[key] = values[len(values) // 2]
    out["runs"] = ok
    return out


def main(args: Any) -> int:
    from .harness import describe

    n = QUICK_N if args.quick else FULL_N
    reps = args.reps or (1 if args.quick else 3)
    runs: dict[str, list[dict[str, Any]]] = {"local": [], "remote": [], "remote-nj": [],
                                             "floor": []}
    for rep in range(reps):
        for kind in runs:
            print(f"bench: cost {rep + 1}/{reps}: {kind} ...", file=sys.stderr, flush=True)
            try:
                runs[kind].append(measure(kind, args.workers, n))
            except Exception as exc:  # noqa: BLE001 (reported in the table)
                runs[kind].append({"error": describe(exc)})
    results = {kind: median_of(r) for kind, r in runs.items()}
    print_report(results, args.workers, n, reps)
    if args.json:
        import json

        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"tasks": n, "reps": reps, "workers": args.workers, "cost": results}, f,
                      indent=2)
    return 0
