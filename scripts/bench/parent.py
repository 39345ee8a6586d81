"""Parent side: calibration, the serial baseline, one child interpreter per pool under a deadline.

Runs in the interpreter the user started, on its main thread. It never imports a pool library
or the child's modules: each pool runs in a fresh interpreter (``bench.py --child POOL``), in
a session of its own, and hands back its results as a JSON file that it rewrites after each
section. At the deadline (or on Ctrl-C) the parent kills the child's whole process tree, reads
what the child wrote so far, and kills whatever the child left behind (by pid and create time).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

from . import tasks as T
from .config import (
    CPU_TASK_S,
    DASK_POOLS,
    FULL,
    LAUNCHER,
    QUICK,
    REMOTE_POOLS,
    SCRIPTS_DIR,
)
from .harness import NoiseMeter, kill_pids, median
from .report import print_report, write_chart

# -- the CPU task and its serial baseline -------------------------------------------------------

def calibrate_cpu_loops(target_s: float) -> int:
    """Loop count for one ~target_s CPU task on this machine (median of 3 estimates)."""
    loops = 100_000
    t0 = time.perf_counter()
    T.cpu(loops)
    loops = max(1000, int(loops * target_s / (time.perf_counter() - t0)))
    estimates = []
    for _ in range(3):
        t0 = time.perf_counter()
        T.cpu(loops)
        estimates.append(loops * target_s / (time.perf_counter() - t0))
    return int(median(estimates))


def serial_baseline(loops: int, tasks: int, reps: int) -> dict[str, Any]:
    meter = NoiseMeter()
    meter.start()
    runs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(tasks):
            T.cpu(loops)
        runs.append(time.perf_counter() - t0)
    return {"serial_s": median(runs), "runs": runs, "noise": meter.stop()}


# -- children -----------------------------------------------------------------------------------

def run_child(pool: str, args: Any, p: dict[str, Any], cpu_loops: int,
              serial_s: float, sections: str | None = None,
              reps: int | None = None) -> dict[str, Any]:
    """Run one pool in a fresh interpreter under a deadline; return its (maybe partial) JSON.
    ``sections`` and ``reps`` override the command line's."""
    import tempfile

    timeout = args.child_timeout or p["child_timeout"]
    with tempfile.TemporaryDirectory(prefix=f"bench-{pool}-") as tmp:
        out_path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, LAUNCHER, "--child", pool, "--child-out", out_path,
               "--workers", str(args.workers), "--sections", sections or args.sections,
               "--cpu-loops", str(cpu_loops), "--serial-s", repr(serial_s)]
        if args.quick:
            cmd.append("--quick")
        if (reps or args.reps) is not None:
            cmd += ["--reps", str(reps or args.reps)]
        returncode, killed_at, elapsed, stderr_tail = wait_child(
            cmd, os.path.join(tmp, "stderr"), timeout)
        try:
            with open(out_path, encoding="utf-8") as f:
                result: dict[str, Any] = json.load(f)
        except (OSError, ValueError):
            result = {"pool": pool, "sections": {}, "noise": {}, "notes": [], "seen_pids": {}}
    result["elapsed_s"] = elapsed
    result["returncode"] = returncode
    if killed_at is not None:
        result["killed"] = (f"child killed after its {timeout:g} s deadline"
                            + (f" during section {result['current']}" if result.get("current")
                               else ""))
    elif returncode != 0:
        last = stderr_tail.strip().splitlines()[-1:] or ["no stderr"]
        result["killed"] = f"child exited with status {returncode}: {last[0][:120]}"
    if returncode != 0 or killed_at is not None:
        result["stderr_tail"] = stderr_tail
    reap_left_behind(result)
    return result


def wait_child(cmd: list[str], stderr_path: str,
               timeout: float) -> tuple[int, float | None, float, str]:
    """Start *cmd* and wait for it up to *timeout* s, killing its whole tree past that (or on
    Ctrl-C, re-raised once it is dead). Returns (exit status, seconds at which it was killed
    or None, seconds it ran, the tail of its stdout and stderr)."""
    import subprocess

    import psutil

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SCRIPTS_DIR, env.get("PYTHONPATH")]))
    with open(stderr_path, "w+b") as err:
        t0 = time.perf_counter()
        # Own session: a Ctrl-C in the terminal reaches only us; we then kill the child.
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                env=env, start_new_session=True)
        killed_at = None
        try:
            proc.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, KeyboardInterrupt) as exc:
            killed_at = time.perf_counter() - t0
            try:  # snapshot the tree first: the child's workers outlive it otherwise
                tree = psutil.Process(proc.pid).children(recursive=True)
            except psutil.Error:
                tree = []
            kill_pids(tree + [psutil.Process(proc.pid)])
            proc.wait()
            if isinstance(exc, KeyboardInterrupt):
                raise
        elapsed = time.perf_counter() - t0
        err.seek(0)
        stderr_tail = err.read()[-2000:].decode("utf-8", "replace")
    return proc.returncode, killed_at, elapsed, stderr_tail


def reap_left_behind(result: dict[str, Any]) -> None:
    """Kill the processes the child started and left behind (e.g. a pool's workers after the
    child was killed), known by pid and create time. Trackers exit on their own once their
    pipe closes: give them a moment first."""
    import psutil

    leftovers = []
    for pid, created in result.get("seen_pids", {}).items():
        try:
            candidate = psutil.Process(int(pid))
            if abs(candidate.create_time() - created) < 0.01:
                leftovers.append(candidate)
        except psutil.Error:
            pass
    if leftovers:
        _, alive = psutil.wait_procs(leftovers, timeout=2.0)
        killed = kill_pids(alive)
        if killed:
            result.setdefault("notes", []).append(
                f"killed {len(killed)} process(es) the child left behind: {killed}")


def run_cold_starts(pools: list[str], args: Any, p: dict[str, Any],
                    log: Callable[[str], None]) -> dict[str, list[dict[str, Any]]]:
    """Section D in fresh interpreters of its own: one per pool and repetition.

    A cold start happens once per interpreter, so a median over repetitions needs as many
    interpreters; one sample each (as when D ran inside the main child) swung by 30% from run
    to run here, and loky's own samples spread from 87 to 125 ms within one run, so full mode
    takes 7 (``d_reps``; ``--reps`` overrides). The pools take turns, rotating who goes first,
    so a disturbance of a few seconds does not land on one pool's samples only. In full mode
    each child also builds a second pool ("restart")."""
    reps = args.reps or p["d_reps"]
    log(f"bench: D (cold start): {reps} fresh interpreter(s) per pool for {', '.join(pools)} ...")
    runs: dict[str, list[dict[str, Any]]] = {pool: [] for pool in pools}
    for rep in range(reps):
        k = rep % len(pools)
        for pool in pools[k:] + pools[:k]:
            runs[pool].append(run_child(pool, args, p, 0, 0.0, sections="D",
                                        reps=2 if p["warmup"] else 1))
    return runs


def merge_cold_starts(child: dict[str, Any], runs: list[dict[str, Any]]) -> None:
    """Fold the D children's results into the pool's main result, medians across them."""
    samples: list[dict[str, Any]] = []
    for run in runs:
        res = run.get("sections", {}).get("D")
        if res is None or "error" in res:
            why = (res or {}).get("error") or run.get("killed") or run.get("import_error")
            child["sections"]["D"] = {"error": why or "the cold-start child gave no result"}
            break
        samples.append(res)
    else:
        cold = [r["cold_ms"] for r in samples]
        merged: dict[str, Any] = {"cold_ms": median(cold), "cold_each": cold, "reps": samples}
        for field in ("import_ms", "restart_ms"):
            values = [r[field] for r in samples if isinstance(r.get(field), (int, float))]
            if values:
                merged[field] = median(values)
        child["sections"]["D"] = merged
    noises = [r.get("noise", {}).get("D") for r in runs]
    known = [n for n in noises if n and n.get("cores") is not None]
    child.setdefault("noise", {})["D"] = (max(known, key=lambda n: n["cores"]) if known
                                         else next((n for n in noises if n), None))
    for key in ("version", "start_method"):
        if child.get(key) in (None, "?"):
            child[key] = next((r[key] for r in runs if r.get(key) not in (None, "?")),
                              child.get(key))
    child.setdefault("notes", []).extend(
        f"D: {note}" for run in runs for note in run.get("notes", []))


def compile_bytecode() -> list[str]:
    """Write the .pyc files of taskorch and of ``scripts/`` (this package included), as
    ``pip install`` does for a package (and did for every anchor library in site-packages).

    Hazard, measured here: taskorch is installed editable, and with PYTHONDONTWRITEBYTECODE set
    (as in this workplace's shells) no import ever writes a .pyc, so every fresh interpreter
    (each child, each worker) compiled taskorch from source: ~5 ms more in each worker's boot
    and more in the parent, all of it charged to taskorch's cold start (D) and none to the
    anchors. Returns the directories that could not be compiled (read-only, say)."""
    import compileall
    import importlib.util

    spec = importlib.util.find_spec("taskorch")
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    dirs.append(SCRIPTS_DIR)
    return [d for d in dirs if not compileall.compile_dir(d, quiet=1)]


def main(args: Any) -> int:
    """The parent role: measure, print the report, write the JSON and chart if asked."""
    p = dict(QUICK if args.quick else FULL)
    reps = args.reps or p["reps"]
    started = time.perf_counter()
    for failed in compile_bytecode():
        log(f"bench: could not write the .pyc files under {failed}; imports there compile "
            "from source in every fresh interpreter")
    cpu_loops = 0
    serial: dict[str, Any] = {"serial_s": 0.0, "runs": [], "noise": {"cores": 0.0, "wall_s": 0.0}}
    if "B" in args.sections:
        cpu_loops = calibrate_cpu_loops(CPU_TASK_S)
        serial = serial_baseline(cpu_loops, p["b_tasks"], reps)
        log(f"bench: CPU task = {cpu_loops:,} loops (~{CPU_TASK_S * 1e3:.0f} ms); serial "
            f"{p['b_tasks']} tasks = {serial['serial_s']:.2f} s")
    children = run_pools(args, p, cpu_loops, serial["serial_s"])
    meta = run_meta(args, p, reps, cpu_loops, serial, started)
    print_report(children, args.pool_list, meta)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "pools": children}, f, indent=2, default=str)
        log(f"bench: wrote {args.json}")
    if args.chart:
        why_not = write_chart(args.chart, children, args.pool_list)
        log(f"bench: skipped the chart: {why_not}" if why_not else f"bench: wrote {args.chart}")
    return 0


def log(msg: str) -> None:
    """Progress goes to stderr; stdout holds only the report."""
    print(msg, file=sys.stderr, flush=True)


def run_pools(args: Any, p: dict[str, Any], cpu_loops: int,
              serial_s: float) -> dict[str, Any]:
    """D's cold starts first (interpreters of their own), then one child per pool for the
    other sections; returns each pool's result, D folded in."""
    children: dict[str, Any] = {}
    cold_pools = [pool for pool in args.pool_list
                  if pool not in DASK_POOLS and pool not in REMOTE_POOLS]
    cold = run_cold_starts(cold_pools, args, p, log) if "D" in args.sections and cold_pools else {}
    rest = args.sections.replace("D", "")
    for pool in args.pool_list:
        if rest:
            log(f"bench: {pool} ...")
            children[pool] = run_child(pool, args, p, cpu_loops, serial_s, sections=rest)
            state = children[pool].get("killed") or children[pool].get("import_error") or "done"
            log(f"bench: {pool}: {state} in {children[pool]['elapsed_s']:.1f} s")
        else:
            children[pool] = {"pool": pool, "sections": {}, "noise": {}, "notes": [],
                              "elapsed_s": sum(r["elapsed_s"] for r in cold.get(pool, []))}
        if pool in cold:
            merge_cold_starts(children[pool], cold[pool])
    return children


def run_meta(args: Any, p: dict[str, Any], reps: int, cpu_loops: int,
             serial: dict[str, Any], started: float) -> dict[str, Any]:
    """The run's parameters and machine, for the report's header and the JSON's "meta"."""
    import platform

    return {
        "mode": "quick" if args.quick else "full", "reps": reps, "d_reps": args.reps or p["d_reps"],
        "warmup": bool(p["warmup"]),
        "workers": args.workers, "sections": args.sections, "pools": args.pool_list,
        "a_tasks": p["a_tasks"], "b_tasks": p["b_tasks"], "c_tasks": p["c_tasks"],
        "i_items": p["i_items"],
        "f_tasks": p["f_tasks"], "h_tasks": p["h_tasks"], "cpu_loops": cpu_loops,
        "serial": serial, "python": sys.version.split()[0], "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "loadavg_end": list(os.getloadavg()),
        "elapsed_s": time.perf_counter() - started,
    }
