"""The driver: one system, one round, workloads W1-W4; writes its JSON after each.

Runs as ``python -m bench.peers.driver`` in a fresh interpreter of the system's venv (taskorch's
for taskorch, the peers' for the others), started by the orchestrator (``run.py``) in a session
of its own and under a deadline. Its JSON lists the process groups it started as soon as it
starts them, so that the orchestrator can kill what a killed driver left behind.

  W1  N no-op tasks (each leaves its mark) enqueued one by one: enqueue/s, and end-to-end/s
      from the first enqueue to the N-th mark
  W2  sequential round trips of a no-op through the system's own result API: p50, p99 ms
  W3  N CPU-bound tasks of ~50 ms: wall s, and the speedup over running them serially
  W4  N short tasks (2 ms each) enqueued; at N/2 marks the broker (or server) is SIGKILLed,
      restarted on the same files, and worker processes that exited are restarted; then the
      driver waits until every accepted task has ended or no mark came for ``stall_s``: how
      many accepted tasks ended, how many ran twice
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

from . import work
from .procs import Started, kill_group
from .systems import ADAPTERS, System

W4_TASK_S = 0.002
WAIT_S = 10.0  # W2: one result's timeout; W1/W3: the end waits this long past the last mark


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text and text[0] else type(exc).__name__


def percentile(ordered: list[float], pct: float) -> float:
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def wait_marks(path: str, n: int, quiet_s: float) -> float:
    """Wait until *path* holds *n* marks; give up once no mark came for *quiet_s*. Returns the
    time of the last mark seen (perf_counter)."""
    seen, last = work.count_marks(path), time.perf_counter()
    while seen < n:
        time.sleep(0.001)
        now_seen = work.count_marks(path)
        if now_seen != seen:
            seen, last = now_seen, time.perf_counter()
        elif time.perf_counter() - last > quiet_s:
            raise TimeoutError(f"{seen} of {n} tasks ended; none for {quiet_s:g} s")
    return last


def warm(system: System) -> None:
    """Workers up and serving: one round trip, then one per worker."""
    system.result(system.enqueue("noop"), 120.0)
    for handle in [system.enqueue("noop") for _ in range(system.workers)]:
        system.result(handle, 30.0)


def w1(system: System, tmp: str, n: int) -> dict[str, Any]:
    path = os.path.join(tmp, "w1.marks")
    t0 = time.perf_counter()
    for i in range(n):
        system.enqueue("mark", i, path)
    t_enq = time.perf_counter()
    t_end = wait_marks(path, n, WAIT_S)
    return {"tasks": n, "enqueue_per_s": n / (t_enq - t0), "e2e_per_s": n / (t_end - t0)}


def w2(system: System, n: int) -> dict[str, Any]:
    lat = []
    for _ in range(n):
        t0 = time.perf_counter()
        system.result(system.enqueue("noop"), WAIT_S)
        lat.append((time.perf_counter() - t0) * 1e3)
    lat.sort()
    return {"trips": n, "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99)}


def w3(system: System, tmp: str, n: int, loops: int, serial_s: float) -> dict[str, Any]:
    path = os.path.join(tmp, "w3.marks")
    t0 = time.perf_counter()
    for i in range(n):
        system.enqueue("cpu", loops, i, path)
    wall = wait_marks(path, n, 60.0) - t0
    return {"tasks": n, "wall_s": wall, "speedup": serial_s / wall}


def w4(system: System, tmp: str, n: int, stall_s: float) -> dict[str, Any]:
    path = os.path.join(tmp, "w4.marks")
    accepted: set[int] = set()
    refused = 0
    for i in range(n):
        try:
            system.enqueue("short", W4_TASK_S, i, path)
            accepted.add(i)
        except Exception:  # noqa: BLE001 (refused: not accepted, not counted)
            refused += 1
    wait_marks(path, n // 2, 60.0)
    at_kill = work.count_marks(path)
    system.kill_broker()
    time.sleep(0.5)
    t_restart = time.perf_counter()
    system.restart_broker()
    revived = system.revive_workers()
    seen, last = work.count_marks(path), time.perf_counter()
    while len(set(work.read_marks(path)) & accepted) < len(accepted):
        time.sleep(0.05)
        revived += system.revive_workers()
        now_seen = work.count_marks(path)
        if now_seen != seen:
            seen, last = now_seen, time.perf_counter()
        elif time.perf_counter() - last > stall_s:
            break
    marks = work.read_marks(path)
    counts: dict[int, int] = {}
    for i in marks:
        counts[i] = counts.get(i, 0) + 1
    ended = sum(1 for i in accepted if i in counts)
    return {"tasks": n, "accepted": len(accepted), "refused": refused, "at_kill": at_kill,
            "ended": ended, "lost": len(accepted) - ended,
            "twice": sum(1 for c in counts.values() if c > 1),
            "recovered_s": last - t_restart, "workers_restarted": revived}


def run(opts: dict[str, Any], out: str) -> dict[str, Any]:
    result: dict[str, Any] = {"system": opts["system"], "pgids": [], "w": {}}

    def save() -> None:
        with open(out + ".tmp", "w", encoding="utf-8") as f:
            json.dump(result, f)
        os.replace(out + ".tmp", out)

    def on_start(pgid: int) -> None:
        result["pgids"].append(pgid)
        save()

    started = Started(on_start)
    cls = ADAPTERS[opts["system"]]
    with tempfile.TemporaryDirectory(prefix=f"peers-{opts['system']}-") as tmp:
        for phase, aof in (("W1-W3", False), ("W4", True)):
            if phase == "W4" and not cls.durable:
                result["w"]["W4"] = {"skipped": "not durable"}
                save()
                continue
            sub = os.path.join(tmp, phase)
            os.mkdir(sub)
            system = cls(started, sub, opts["workers"], aof)
            result["version"] = system.version()
            try:
                system.start()
                warm(system)
                if phase == "W4":
                    result["w"]["W4"] = guarded(w4, system, sub, opts["w4"], opts["stall_s"])
                else:
                    result["w"]["W1"] = guarded(w1, system, sub, opts["w1"])
                    save()
                    result["w"]["W2"] = guarded(w2, system, opts["w2"])
                    save()
                    result["w"]["W3"] = guarded(w3, system, sub, opts["w3"], opts["loops"],
                                                opts["serial_s"])
            except Exception as exc:  # noqa: BLE001 (reported in the table, as "error: ...")
                for key in (("W4",) if phase == "W4" else ("W1", "W2", "W3")):
                    result["w"].setdefault(key, {"error": f"start: {describe(exc)}"})
            finally:
                try:
                    system.stop()
                except Exception as exc:  # noqa: BLE001
                    result.setdefault("notes", []).append(f"{phase} stop: {describe(exc)}")
                for pgid in result["pgids"]:
                    kill_group(pgid)
            save()
    return result


def guarded(fn: Any, *args: Any) -> dict[str, Any]:
    try:
        return dict(fn(*args))
    except Exception as exc:  # noqa: BLE001 (reported in the table)
        return {"error": describe(exc)}


def main() -> int:
    opts = json.loads(sys.argv[1])
    run(opts, sys.argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
