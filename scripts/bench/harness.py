"""Shared measurement helpers, for both roles: statistics, bounded calls, processes, noise.

Runs in the parent (serial baseline, reaping a killed child's leftovers) and in each child
(sections, pool shutdown). psutil is imported where it is used: see the package docstring.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Sequence

from .config import NOISE_MIN_WALL_S


class SectionError(Exception):
    """A section could not produce its measurement; its cell shows ``error: <message>``."""


def taskorch_root() -> str:
    """The directory holding the taskorch package this process imported: where to start a
    ``python -m ...`` child, which puts its working directory first on its sys.path (started
    elsewhere, it would run whatever taskorch that directory holds: a comparison of checkouts
    once measured one server twice)."""
    import taskorch

    return os.path.dirname(os.path.dirname(os.path.abspath(taskorch.__file__)))


# -- statistics and messages -----------------------------------------------------------------------

def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    rank = max(1, -(-len(ordered) * pct // 100))  # ceil without importing math
    return ordered[int(rank) - 1]


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text and text[0] else type(exc).__name__


# -- deadlines -------------------------------------------------------------------------------------

def call_bounded(fn: Callable[[], Any], timeout: float, what: str) -> Any:
    """Run *fn* in a daemon thread and give up after *timeout* seconds.

    Used for shutdown calls, which hang for real in some pools (multiprocessing.Pool after a
    worker death). A call that times out keeps running in its daemon thread; the caller then
    kills the pool's processes, which usually lets it finish.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 (re-raised in the caller's thread)
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"bench-bounded-{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise SectionError(f"{what} did not return within {timeout:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# -- processes -------------------------------------------------------------------------------------

def is_helper_process(proc: Any) -> bool:
    """A resource tracker or fork server: a pool's helper, not one of its workers."""
    try:
        cmdline = " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 (gone, zombie, or denied: not a worker we can measure)
        return True
    return any(s in cmdline for s in ("resource_tracker", "semaphore_tracker", "forkserver"))


def kill_pids(procs: list[Any]) -> list[int]:
    """Kill the given psutil processes, each by its own pid; return the pids killed."""
    import psutil

    killed = []
    for proc in procs:
        try:
            proc.kill()
            killed.append(proc.pid)
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=5.0)
    return killed


# -- noise: CPU that processes outside our tree used -----------------------------------------------

def system_busy_cpu_s() -> float:
    """CPU seconds used so far by everything on the machine (/proc/stat via psutil)."""
    import psutil

    t = psutil.cpu_times()
    # guest and guest_nice are already included in user and nice on Linux.
    fields = ("user", "nice", "system", "irq", "softirq", "steal")
    return sum(getattr(t, name, 0.0) for name in fields)


def own_tree_cpu_s() -> float:
    """CPU seconds used by this process, its reaped children, and its live descendants."""
    import psutil

    me = psutil.Process()
    t = me.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in me.children(recursive=True):
        try:
            c = child.cpu_times()
            total += c.user + c.system + c.children_user + c.children_system
        except psutil.Error:
            pass  # exited between the listing and the read: its time is lost, a small error
    return float(total)


class NoiseMeter:
    """CPU used by processes outside our own tree between start() and stop().

    It is /proc/stat's busy time minus our tree's. Both sides move in clock ticks (10 ms), so
    on a short section the figure is coarse; a descendant that exits unreaped by us is charged
    to "others".
    """

    def start(self) -> None:
        self._wall = time.perf_counter()
        self._busy = system_busy_cpu_s()
        self._own = own_tree_cpu_s()

    def stop(self) -> dict[str, Any]:
        """{"cores": others' CPU s per wall s, or None if too short to tell; "wall_s"}."""
        wall = time.perf_counter() - self._wall
        others = (system_busy_cpu_s() - self._busy) - (own_tree_cpu_s() - self._own)
        cores = max(0.0, others) / wall if wall >= NOISE_MIN_WALL_S else None
        return {"cores": cores, "wall_s": wall}
