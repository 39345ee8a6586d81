"""Pools, sections, sizes and tuning constants: read by both roles (parent and child).

Only constants here, and stdlib imports: every module of the package imports this one.
"""

from __future__ import annotations

import os
from typing import Any

# scripts/: on sys.path of every role, and on PYTHONPATH of the children and their workers,
# which import ``bench.tasks`` to unpickle the task functions.
SCRIPTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What the parent runs for each child: the same thin launcher a user runs.
LAUNCHER = os.path.join(SCRIPTS_DIR, "bench.py")

# The peers section (bench/peers/): its systems, and the peers' own venv.
PEER_SYSTEMS = ("taskorch", "taskorch-normal", "taskorch-nj", "huey-sqlite", "huey-redis", "rq",
                "dramatiq", "celery")
PEERS_VENV = os.path.join(os.path.dirname(SCRIPTS_DIR), ".bench-peers-venv")

MIB = 1024 * 1024
ALL_POOLS = ("taskorch", "cf", "loky", "mp", "pebble", "taskorch-dask", "dask",
             "taskorch-remote", "taskorch-remote-nj")
# The Dask pair runs only A and B (no-op throughput, CPU-bound speedup) on a 2-worker
# distributed.LocalCluster (processes, one thread each), with fewer no-op tasks: a Dask task
# costs a few scheduler messages, so 20,000 of them would take minutes.
DASK_POOLS = ("taskorch-dask", "dask")
DASK_A_TASKS = 2_000
POOL_LABELS = {
    "taskorch": "taskorch.TaskOrchestrator.run",
    "cf": "concurrent.futures.ProcessPoolExecutor.submit",
    "loky": "loky.ProcessPoolExecutor.submit",
    "mp": "multiprocessing.Pool.apply_async",
    "pebble": "pebble.ProcessPool.schedule",
    "taskorch-dask": "taskorch.TaskOrchestrator.run on a Dask LocalCluster",
    "dask": "distributed.Client.submit on a Dask LocalCluster",
    "taskorch-remote": "taskorch.connect().run to taskorch serve, journal on",
    "taskorch-remote-nj": "taskorch.connect().run to taskorch serve --no-journal",
}
# The remote pair runs only A: remote run() against the local orchestrator, journal on and off.
REMOTE_POOLS = ("taskorch-remote", "taskorch-remote-nj")
ALL_SECTIONS = "ABCDEFGHIMPQR"
# Sections every pool runs; M (metrics overhead) is taskorch's alone.
POOL_SECTIONS = "ABCDEFGHI"
# Execution order inside a child, which is not the table order. D runs in children of its own
# (see run_cold_starts); were it asked of a child with others, it goes first, so that "cold
# start" really is the first pool this interpreter builds. E next, before sections A-C have
# grown the heap with tens of thousands of futures; F last, since a crash may leave a pool
# half-broken.
EXEC_ORDER = "DEABCIGHMPQRF"

# Sizes. QUICK keeps the whole run (4-5 pools) under a minute; FULL under six.
QUICK: dict[str, Any] = {
    "a_tasks": 5_000, "b_tasks": 20, "c_tasks": 1_000, "e_tasks": 500, "f_tasks": 200,
    "h_tasks": 50, "i_items": 50_000, "reps": 1, "d_reps": 1, "warmup": False,
    "p_delayed": 5_000, "r_tasks": 10_000,
    "child_timeout": 45.0, "stop_timeout": 10.0,
}
FULL: dict[str, Any] = {
    "a_tasks": 20_000, "b_tasks": 40, "c_tasks": 2_000, "e_tasks": 1_000, "f_tasks": 200,
    "h_tasks": 50, "i_items": 200_000, "reps": 3, "d_reps": 7, "warmup": True,
    "p_delayed": 100_000, "r_tasks": 10_000,
    "child_timeout": 150.0, "stop_timeout": 30.0,
}
CPU_TASK_S = 0.050          # section B: target duration of one CPU task
WARM_TASK_S = 0.005         # warm-up: each task holds its worker this long
C_SLEEP_S = 0.001           # section C: each task sleeps this long, so the backlog builds up
F_CRASH_INDEX = 49          # section F: the 50th task submitted kills its worker
F_TASK_S = 0.002            # section F: innocent tasks sleep this long
F_DEADLINE_S = 10.0         # section F: total wait for the 199 innocent tasks
F_CRASHED_WAIT_S = 1.0      # section F: extra wait for the crashed task's own future
M_PAIRS = 10                # section M: pairs of blocks (metrics off, on) of A's N / M_PAIRS
PROBE_WAIT_S = 5.0          # "is the pool still usable": wait for one echo task
G_TIMEOUT_S = 0.5           # section G: the per-task timeout
G_HANG_S = 60.0             # section G: how long the hung task would sleep if left alone
G_GRACE_S = 10.0            # section G: give up waiting this long after the timeout
H_TASK_S = 0.005            # section H: each task sleeps this long
NOISE_NOTE = 0.20           # a section whose noise exceeds 20% of a core gets a note
NOISE_MIN_WALL_S = 0.5      # CPU times move in 10 ms ticks: shorter sections give no figure
