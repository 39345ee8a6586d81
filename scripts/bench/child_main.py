"""Child side: the entry of ``--child POOL``, in a fresh interpreter the parent started.

Imports the pool's library (timed apart: D's "import"), then runs the asked sections in
EXEC_ORDER, each repetition on a fresh pool, and rewrites the JSON file after each section so
that the parent, were it to kill this interpreter at its deadline, still reads what was done.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Callable

from . import delayed, failure, lifecycle, records, throughput
from .child import Child
from .config import EXEC_ORDER
from .harness import NoiseMeter, describe, median

# One repetition of each section, on its own fresh pool.
SECTIONS: dict[str, Callable[[Child], dict[str, Any]]] = {
    "A": throughput.a_noop_throughput,
    "B": throughput.b_cpu_speedup,
    "C": throughput.c_submit_latency,
    "D": lifecycle.d_cold_start,
    "E": lifecycle.e_memory,
    "F": failure.f_crash,
    "G": failure.g_hard_timeout,
    "H": lifecycle.h_drain,
    "I": throughput.i_bulk_map,
    "M": throughput.m_metrics_overhead,
    "P": delayed.p_delayed_backlog,
    "Q": delayed.q_dependencies_and_keys,
    "R": records.r_task_records,
}


def run_section(child: Child, key: str) -> dict[str, Any]:
    """Warm-up (full mode), then the repetitions; medians of the numeric fields."""
    body = SECTIONS[key]
    # D's first run is the measurement ("cold" = first pool of this interpreter), so it
    # has no warm-up; in full mode its further runs are reported as "restart".
    warmup = child.p["warmup"] and key not in "DF"
    if warmup:
        body(child)
    runs = [body(child) for _ in range(child.p["reps"])]
    out = combine_reps(runs)
    if key == "F":
        # Losing a task is never noise: show the worst repetition, not the median.
        worst = min(runs, key=lambda r: r["ok"])
        out.update({k: v for k, v in worst.items()})
        out["usable"] = all(r["usable"] for r in runs)
        out["ok_each"] = [r["ok"] for r in runs]
    if key == "D":
        out["cold_ms"] = runs[0]["cold_ms"]
        if len(runs) > 1:
            out["restart_ms"] = median([r["cold_ms"] for r in runs[1:]])
        out["import_ms"] = child.result.get("import_ms")
    return out


def combine_reps(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each field across the repetitions: booleans all-true, numbers their median, anything
    else the first repetition's; the repetitions themselves under "reps"."""
    out: dict[str, Any] = {"reps": runs}
    for field, first in runs[0].items():
        values = [r[field] for r in runs if isinstance(r.get(field), (int, float))]
        if isinstance(first, bool):
            out[field] = all(r[field] for r in runs)
        elif isinstance(first, (int, float)) and len(values) == len(runs):
            out[field] = median(values)
        else:
            out[field] = first
    return out


def main(args: Any) -> int:
    """Run the child role; the exit status is 0 whatever was measured (the JSON says)."""
    import psutil

    child = Child(args)
    child.rss_bare = psutil.Process().memory_info().rss
    try:
        t0 = time.perf_counter()
        child.result["version"] = child.cls.preload()
        child.result["import_ms"] = (time.perf_counter() - t0) * 1e3
    except BaseException as exc:  # noqa: BLE001 (e.g. taskorch not importable yet)
        child.result["import_error"] = describe(exc)
        child.write()
        return 0
    child.result["start_method"] = "?"
    child.write()
    meter, overall = NoiseMeter(), NoiseMeter()
    overall.start()
    for key in EXEC_ORDER:
        if key not in child.sections or key not in child.cls.sections:
            continue
        child.result["current"] = key
        child.write()
        gc.collect()
        meter.start()
        try:
            child.result["sections"][key] = run_section(child, key)
        except BaseException as exc:  # noqa: BLE001 (one section's failure ends only it)
            if isinstance(exc, KeyboardInterrupt):
                raise
            child.result["sections"][key] = {"error": describe(exc)}
        child.result["noise"][key] = meter.stop()
        child.reap_leftovers(key)
        child.write()
    child.result["current"] = None
    child.result["noise_overall"] = overall.stop()
    child.remember_tree()
    child.write()
    return 0
