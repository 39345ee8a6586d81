"""The orchestrator of the peers section: the peers' venv, the rounds, the report.

Runs in the interpreter the user started (taskorch's venv), on its main thread; it imports no
peer library. For each round it runs one driver per system (``python -m bench.peers.driver``
in the system's venv, a session of its own, under a deadline), rotating who goes first, so
that a disturbance of a few seconds does not land on one system only; ratios to taskorch are
taken within each round, then their median across rounds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from ..config import SCRIPTS_DIR
from ..harness import taskorch_root
from . import work
from .procs import kill_group, redis_version
from .report import print_report
from .systems import ADAPTERS, LABELS, PEER_PACKAGES, TASKORCH_SYSTEMS

# Sizes. QUICK is for the test suite's smoke run; FULL is the issue's. ``stall_s``: W4 stops
# waiting once no task has ended for that long after the restart; what is left counts as lost.
# It costs time only when something is lost, and a restart (recovery, new workers) on a busy
# machine can take seconds: QUICK's is as long as FULL's, so that its "0 lost" does not hang
# on the machine's load.
QUICK: dict[str, Any] = {"w1": 300, "w2": 20, "w3": 4, "w4": 100, "rounds": 1,
                         "stall_s": 20.0, "deadline_s": 180.0}
FULL: dict[str, Any] = {"w1": 10_000, "w2": 300, "w3": 40, "w4": 2_000, "rounds": 3,
                        "stall_s": 20.0, "deadline_s": 420.0}
CPU_TASK_S = 0.050
IMPORTS = {"huey-sqlite": "huey", "huey-redis": "huey", "rq": "rq", "dramatiq": "dramatiq",
           "celery": "celery"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peers_venv(path: str, install: bool) -> tuple[str | None, str]:
    """The peers' venv's python, created and filled if *install* and needed; else (None, why)."""
    python = os.path.join(path, "bin", "python")
    if not os.path.exists(python):
        if not install:
            return None, f"no peers venv at {path} (run without --no-install to create it)"
        log(f"bench: creating {path} ...")
        proc = subprocess.run([sys.executable, "-m", "venv", path], capture_output=True, text=True)
        if proc.returncode != 0:
            return None, f"could not create {path}: {proc.stderr.strip()[-200:]}"
    if install and missing_imports(python, sorted(set(IMPORTS.values()))):
        log(f"bench: pip install {' '.join(PEER_PACKAGES)} into {path} ...")
        proc = subprocess.run([python, "-m", "pip", "install", "--quiet",
                               "--disable-pip-version-check", *PEER_PACKAGES],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            log(f"bench: pip install failed: {proc.stderr.strip()[-500:]}")
    return python, ""


def redis_server(install: bool) -> tuple[str | None, str]:
    """Debian's redis-server: (its version, "") if it is there, installed with apt-get if
    *install* and it is not (as root, as ``scripts/test`` installs chromium in CI); else
    (None, why not)."""
    version = redis_version()
    if version is not None or not install:
        return version, "" if version else (
            "redis-server is not installed (Debian: apt-get install redis-server; or run "
            "without --no-install, as root)")
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None, ("redis-server is not installed, and the benchmark can install it only "
                      "as root with apt-get (Debian: sudo apt-get install redis-server)")
    log("bench: apt-get install redis-server ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "redis-server"]):
        try:  # (a mirror that does not answer, or a held dpkg lock: not forever)
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        except subprocess.TimeoutExpired:
            return None, f"apt-get could not install redis-server: {' '.join(cmd)} timed out"
        if proc.returncode != 0:
            return None, f"apt-get could not install redis-server: {proc.stderr.strip()[-300:]}"
    version = redis_version()
    return version, "" if version else "apt-get installed redis-server, but it does not start"


def missing_imports(python: str, modules: list[str]) -> list[str]:
    code = ("import importlib,sys\nfor m in sys.argv[1:]:\n try: importlib.import_module(m)\n"
            " except Exception: print(m)")
    proc = subprocess.run([python, "-c", code, *modules], capture_output=True, text=True)
    return proc.stdout.split() if proc.returncode == 0 else modules


def which_can_run(systems: list[str], args: Any) -> tuple[dict[str, str], dict[str, str]]:
    """({system: its python}, {system: why it cannot run})."""
    pythons: dict[str, str] = {}
    why_not: dict[str, str] = {}
    peers = [s for s in systems if s not in TASKORCH_SYSTEMS]
    python, reason = peers_venv(args.peers_venv, not args.no_install) if peers else (None, "")
    missing = missing_imports(python, sorted({IMPORTS[s] for s in peers})) if python else []
    redis, no_redis = (redis_server(not args.no_install)
                       if any(ADAPTERS[s].needs_redis for s in peers) else (None, ""))
    for system in systems:
        if system in TASKORCH_SYSTEMS:
            pythons[system] = sys.executable
        elif python is None:
            why_not[system] = reason
        elif IMPORTS[system] in missing:
            why_not[system] = f"{IMPORTS[system]} does not import in {args.peers_venv}"
        elif ADAPTERS[system].needs_redis and redis is None:
            why_not[system] = no_redis
        else:
            pythons[system] = python
    return pythons, why_not


def run_driver(python: str, opts: dict[str, Any], deadline_s: float) -> dict[str, Any]:
    """One driver under a deadline; its (maybe partial) JSON, and whatever it left killed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (SCRIPTS_DIR, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp:
        out, err_path = os.path.join(tmp, "result.json"), os.path.join(tmp, "stderr")
        t0 = time.perf_counter()
        with open(err_path, "w+b") as err:
            proc = subprocess.Popen([python, "-m", "bench.peers.driver", json.dumps(opts), out],
                                    stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env,
                                    start_new_session=True, cwd=taskorch_root())
            killed = False
            try:
                proc.wait(timeout=deadline_s)
            except subprocess.TimeoutExpired:
                killed = True
            kill_group(proc.pid)
            proc.wait()
            err.seek(0)
            tail = err.read()[-1500:].decode("utf-8", "replace")
        try:
            with open(out, encoding="utf-8") as f:
                result: dict[str, Any] = json.load(f)
        except (OSError, ValueError):
            result = {"system": opts["system"], "pgids": [], "w": {}}
    for pgid in result.get("pgids", []):
        kill_group(pgid)
    result["elapsed_s"] = time.perf_counter() - t0
    if killed:
        result["killed"] = f"driver killed after its {deadline_s:g} s deadline"
    elif proc.returncode != 0:
        result["killed"] = f"driver exited with status {proc.returncode}"
    if killed or proc.returncode != 0:
        result["stderr_tail"] = tail
    return result


def calibrate(n: int) -> tuple[int, float]:
    """Loops for one ~50 ms CPU task, and the serial time of *n* of them (timed on 3)."""
    loops = work.calibrate_loops(CPU_TASK_S)
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        work.cpu(loops, 0, os.devnull)
        runs.append(time.perf_counter() - t0)
    return loops, sorted(runs)[1] * n


def main(args: Any) -> int:
    sizes = dict(QUICK if args.quick else FULL)
    rounds = args.reps or sizes["rounds"]
    systems = args.system_list
    started = time.perf_counter()
    pythons, why_not = which_can_run(systems, args)
    for system, why in why_not.items():
        log(f"bench: {system}: not run: {why}")
    loops, serial_s = calibrate(sizes["w3"])
    log(f"bench: CPU task = {loops:,} loops; serial {sizes['w3']} tasks = {serial_s:.2f} s")
    runnable = [s for s in systems if s in pythons]
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in runnable}
    for rnd in range(rounds):
        k = rnd % max(1, len(runnable))
        for system in runnable[k:] + runnable[:k]:
            opts = {"system": system, "workers": args.workers, "loops": loops,
                    "serial_s": serial_s, **{key: sizes[key] for key in
                                             ("w1", "w2", "w3", "w4", "stall_s")}}
            log(f"bench: round {rnd + 1}/{rounds}: {system} ...")
            res = run_driver(pythons[system], opts, args.child_timeout or sizes["deadline_s"])
            log(f"bench: round {rnd + 1}/{rounds}: {system}: {res.get('killed') or 'done'} in "
                f"{res['elapsed_s']:.1f} s")
            results[system].append(res)
    meta = {"mode": "quick" if args.quick else "full", "rounds": rounds,
            "workers": args.workers, "systems": systems, "cpu_loops": loops,
            "serial_s": serial_s, "redis": redis_version(), "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(), "loadavg_end": list(os.getloadavg()),
            "elapsed_s": time.perf_counter() - started,
            **{key: sizes[key] for key in ("w1", "w2", "w3", "w4", "stall_s")}}
    print_report(results, why_not, systems, LABELS, meta)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "peers": results, "not_run": why_not}, f, indent=2)
        log(f"bench: wrote {args.json}")
    return 0


__all__ = ["main"]
