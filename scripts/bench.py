#!/usr/bin/env python3
"""Benchmark taskorch against the process pools it means to beat (DESIGN.md, "Figures to beat").

Two roles, one file:

  parent (default)    calibrates the CPU task and times the serial baseline, then runs one
                      fresh interpreter per pool (``bench.py --child POOL ...``), one after the
                      other, each under a deadline; gathers their JSON into a markdown table,
                      ratio lines, and optionally ``--json FILE`` and ``--chart FILE.png``.
  child (--child)     builds the pool (a fresh one for every repetition of every section), runs
                      the sections and rewrites its JSON file after each one, so that a child
                      killed at its deadline still hands back what it measured.

Pools, 2 workers each (``--workers``): taskorch, cf (concurrent.futures.ProcessPoolExecutor),
loky (loky.ProcessPoolExecutor, not the reusable one), mp (multiprocessing.Pool.apply_async),
pebble (pebble.ProcessPool). Each uses its library's default start method (shown in the table).

Sections:
  A  no-op throughput: N tasks submitted one by one, all results collected; tasks/s
  B  CPU-bound speedup: N tasks of ~50 ms pure Python vs the same run serially in the parent
  C  producer latency: each submit call timed while the workers are busy; p50 / p99 in us
  D  cold start: constructor to the first result of a no-op, in a fresh interpreter whose
     library is already imported (the import is timed apart and shown with it); ms
  E  memory: RSS of the process that owns the pool, USS of each worker; MiB
  F  crash: 200 tasks, one calls os._exit(1); how many of the 199 others succeed; still usable?
  G  hard timeout: a hung task with a 0.5 s per-task timeout; how late its failure is seen; ms
  H  drain: from the last of 50 short tasks completing to stop()/shutdown() returning; ms
  I  bulk map: N tiny items through the bulk API (taskorch map(), automatic chunk size;
     multiprocessing.Pool.imap and the executors' map with Pool.map's default chunk size)
  M  metrics overhead (taskorch only): A's no-op throughput with the per-task figures off
     and on (``taskorch.metrics``) on one pool, alternating blocks; the median on/off ratio
  noise: CPU that processes outside the pool's tree used during each section, % of one core

Never asserts speed: every number is a measurement, not a verdict, and the exit status does
not depend on them. Noise on these machines is ~25% on throughput: compare the ratios of one
run, not absolute numbers across runs.

Top-level imports are kept to cheap stdlib modules on purpose: loky-style workers re-import
the main module (this file) as ``__mp_main__``, and that cost would land in their cold start
and memory. Everything heavier (psutil, argparse, subprocess, the pool libraries) is imported
where it is used.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time
from typing import Any, Callable, Sequence

SCRIPT_DIR = os.path.dirname(os.path.abspath(__file__))
if SCRIPT_DIR not in sys.path:
    sys.path.insert(0, SCRIPT_DIR)

import _bench_tasks as T  # noqa: E402  (importable only once SCRIPT_DIR is on sys.path)

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
ALL_SECTIONS = "ABCDEFGHIM"
# Sections every pool runs; M (metrics overhead) is taskorch's alone.
POOL_SECTIONS = "ABCDEFGHI"
# Execution order inside a child, which is not the table order. D runs in children of its own
# (see run_cold_starts); were it asked of a child with others, it goes first, so that "cold
# start" really is the first pool this interpreter builds. E next, before sections A-C have
# grown the heap with tens of thousands of futures; F last, since a crash may leave a pool
# half-broken.
EXEC_ORDER = "DEABCIGHMF"

# Sizes. QUICK keeps the whole run (4-5 pools) under a minute; FULL under six.
QUICK: dict[str, Any] = {
    "a_tasks": 5_000, "b_tasks": 20, "c_tasks": 1_000, "e_tasks": 500, "f_tasks": 200,
    "h_tasks": 50, "i_items": 50_000, "reps": 1, "d_reps": 1, "warmup": False,
    "child_timeout": 45.0, "stop_timeout": 10.0,
}
FULL: dict[str, Any] = {
    "a_tasks": 20_000, "b_tasks": 40, "c_tasks": 2_000, "e_tasks": 1_000, "f_tasks": 200,
    "h_tasks": 50, "i_items": 200_000, "reps": 3, "d_reps": 7, "warmup": True,
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


class SectionError(Exception):
    """A section could not produce its measurement; its cell shows ``error: <message>``."""


# --------------------------------------------------------------------------------------------
# Small helpers (both roles)
# --------------------------------------------------------------------------------------------

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


def is_helper_process(proc: Any) -> bool:
    """A resource tracker or fork server: a pool's helper, not one of its workers."""
    try:
        cmdline = " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 (gone, zombie, or denied: not a worker we can measure)
        return True
    return any(s in cmdline for s in ("resource_tracker", "semaphore_tracker", "forkserver"))


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


# --------------------------------------------------------------------------------------------
# Pool adapters (child side): one small class per library, the same five verbs for each
# --------------------------------------------------------------------------------------------

def bulk_chunksize(n: int, workers: int) -> int:
    """The anchors' chunk size for section I: multiprocessing.Pool.map's own default
    (4 chunks per worker), the best fixed choice for uniform tiny items."""
    return max(1, -(-n // (4 * workers)))


class PoolAdapter:
    sections = POOL_SECTIONS  # the sections this pool runs
    """One pool instance. ``create`` is the timed constructor; ``stop`` is a graceful drain."""

    name = ""
    has_task_timeout = False

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.pool: Any = None
        self.stopped = False

    @staticmethod
    def preload() -> str:
        """Import the library before anything is timed; return its version."""
        raise NotImplementedError

    def create(self) -> None:
        raise NotImplementedError

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        raise NotImplementedError

    def submit_with_timeout(self, fn: Callable[..., Any], args: tuple[Any, ...],
                            timeout: float) -> Any:
        raise NotImplementedError

    def outcome(self, handle: Any, timeout: float) -> tuple[str, Any]:
        """Wait up to *timeout* s: ("ok", value), ("error", exception) or ("pending", None)."""
        import concurrent.futures as cf

        done, _ = cf.wait([handle], timeout=max(0.0, timeout))
        if not done:
            return "pending", None
        exc = handle.exception()
        return ("error", exc) if exc is not None else ("ok", handle.result())

    def get(self, handle: Any, timeout: float) -> Any:
        """The fast path for bulk collection: the library's own result call."""
        return handle.result(timeout=max(0.0, timeout))

    def map(self, fn: Callable[..., Any], items: list[Any]) -> list[Any]:
        """Section I: the library's bulk API, results in order."""
        raise NotImplementedError

    def stop(self, timeout: float) -> None:
        raise NotImplementedError

    def kill(self, timeout: float) -> None:
        raise NotImplementedError

    def worker_pids(self) -> list[int]:
        import psutil

        return [p.pid for p in psutil.Process().children(recursive=False)
                if not is_helper_process(p)]

    def start_method(self) -> str:
        import multiprocessing

        return multiprocessing.get_start_method(allow_none=False)


class TaskorchAdapter(PoolAdapter):
    name = "taskorch"
    has_task_timeout = True
    sections = POOL_SECTIONS + "M"

    @staticmethod
    def preload() -> str:
        import taskorch

        # The constructor imports the local backend (and loky, which it is built on) on first
        # use; import it here, as every other adapter imports its whole library here, so that
        # D times starting a pool in each, not importing modules. The import is timed apart.
        import taskorch._parent.local  # noqa: F401
        from taskorch import Policy, TaskOrchestrator  # noqa: F401 (lazy names: import now)

        return str(getattr(taskorch, "__version__", "?"))

    def create(self) -> None:
        from taskorch import Policy, TaskOrchestrator

        # A huge backlog bound, so that the bound never throttles sections A-C.
        self.pool = TaskOrchestrator(worker_count=self.workers, max_backlog=1_000_000,
                                     policy=Policy())

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        return self.dropped_is_error(self.pool.run(fn, *args))

    def submit_with_timeout(self, fn: Callable[..., Any], args: tuple[Any, ...],
                            timeout: float) -> Any:
        from taskorch import Policy

        return self.dropped_is_error(self.pool.with_policy(Policy(timeout=timeout)).run(fn, *args))

    @staticmethod
    def dropped_is_error(future: Any) -> Any:
        # run() returns None when it drops a task (Features.ALLOW_SYNC_TASK_DROP, not set here).
        if future is None:
            raise SectionError("run() dropped the task (returned None)")
        return future

    def map(self, fn: Callable[..., Any], items: list[Any]) -> list[Any]:
        return list(self.pool.map(fn, items))  # automatic chunk size

    def stop(self, timeout: float) -> None:
        self.pool.stop(timeout=timeout)

    def kill(self, timeout: float) -> None:
        self.pool.stop(timeout=min(timeout, 2.0))

    def worker_pids(self) -> list[int]:
        return list(self.pool.worker_pids())

    def start_method(self) -> str:
        return "loky"


class CfAdapter(PoolAdapter):
    name = "cf"

    @staticmethod
    def preload() -> str:
        import concurrent.futures.process  # noqa: F401

        return sys.version.split()[0]

    def create(self) -> None:
        from concurrent.futures import ProcessPoolExecutor

        self.pool = ProcessPoolExecutor(max_workers=self.workers)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        return self.pool.submit(fn, *args)

    def map(self, fn: Callable[..., Any], items: list[Any]) -> list[Any]:
        return list(self.pool.map(fn, items, chunksize=bulk_chunksize(len(items), self.workers)))

    def stop(self, timeout: float) -> None:
        self.pool.shutdown(wait=True)

    def kill(self, timeout: float) -> None:
        import psutil

        self.pool.shutdown(wait=False, cancel_futures=True)
        # cf has no "kill the workers" call: a hung worker would make shutdown(wait=True)
        # wait forever. _processes is private, so fall back to our children if it changes.
        procs = getattr(self.pool, "_processes", None) or {}
        pids = list(procs) or self.worker_pids()
        for pid in pids:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
        self.pool.shutdown(wait=True)

    def start_method(self) -> str:
        ctx = getattr(self.pool, "_mp_context", None)
        return ctx.get_start_method() if ctx is not None else super().start_method()


class LokyAdapter(PoolAdapter):
    name = "loky"

    @staticmethod
    def preload() -> str:
        import loky

        return str(loky.__version__)

    def create(self) -> None:
        import loky

        self.pool = loky.ProcessPoolExecutor(max_workers=self.workers)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        return self.pool.submit(fn, *args)

    def map(self, fn: Callable[..., Any], items: list[Any]) -> list[Any]:
        return list(self.pool.map(fn, items, chunksize=bulk_chunksize(len(items), self.workers)))

    def stop(self, timeout: float) -> None:
        self.pool.shutdown(wait=True)

    def kill(self, timeout: float) -> None:
        self.pool.shutdown(wait=True, kill_workers=True)

    def start_method(self) -> str:
        return "loky"


class MpAdapter(PoolAdapter):
    name = "mp"

    @staticmethod
    def preload() -> str:
        import multiprocessing.pool  # noqa: F401

        return sys.version.split()[0]

    def create(self) -> None:
        import multiprocessing

        self.pool = multiprocessing.Pool(self.workers)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        return self.pool.apply_async(fn, args)

    def map(self, fn: Callable[..., Any], items: list[Any]) -> list[Any]:
        return list(self.pool.imap(fn, items, chunksize=bulk_chunksize(len(items), self.workers)))

    def outcome(self, handle: Any, timeout: float) -> tuple[str, Any]:
        handle.wait(max(0.0, timeout))
        if not handle.ready():
            return "pending", None
        try:
            return "ok", handle.get(0)
        except Exception as exc:  # noqa: BLE001 (the task's own exception)
            return "error", exc

    def get(self, handle: Any, timeout: float) -> Any:
        return handle.get(max(0.0, timeout))

    def stop(self, timeout: float) -> None:
        # close()+join() waits for every task, and hangs forever if a worker died holding one
        # (python/cpython#96061); callers bound it with call_bounded.
        self.pool.close()
        self.pool.join()

    def kill(self, timeout: float) -> None:
        self.pool.terminate()
        self.pool.join()


class PebbleAdapter(PoolAdapter):
    name = "pebble"
    has_task_timeout = True

    @staticmethod
    def preload() -> str:
        import pebble

        return str(getattr(pebble, "__version__", "?"))

    def create(self) -> None:
        import pebble

        self.pool = pebble.ProcessPool(max_workers=self.workers)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        return self.pool.schedule(fn, args=args)

    def map(self, fn: Callable[..., Any], items: list[Any]) -> list[Any]:
        chunksize = bulk_chunksize(len(items), self.workers)
        return list(self.pool.map(fn, items, chunksize=chunksize).result())

    def submit_with_timeout(self, fn: Callable[..., Any], args: tuple[Any, ...],
                            timeout: float) -> Any:
        return self.pool.schedule(fn, args=args, timeout=timeout)

    def stop(self, timeout: float) -> None:
        self.pool.close()
        self.pool.join()

    def kill(self, timeout: float) -> None:
        self.pool.stop()
        self.pool.join(timeout=timeout)


class _LocalCluster:
    """A 2-worker distributed.LocalCluster (processes, one thread each) and its Client."""

    def __init__(self, workers: int) -> None:
        import importlib

        distributed: Any = importlib.import_module("distributed")  # untyped library
        self.cluster: Any = distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)
        self.client: Any = distributed.Client(self.cluster, set_as_default=False)

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


class DaskAdapter(PoolAdapter):
    name = "dask"
    sections = "AB"

    @staticmethod
    def preload() -> str:
        import distributed

        return str(getattr(distributed, "__version__", "?"))

    def create(self) -> None:
        self.local = _LocalCluster(self.workers)
        self.pool = self.local.client

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        return self.pool.submit(fn, *args, pure=False)

    def stop(self, timeout: float) -> None:
        self.local.close()

    def kill(self, timeout: float) -> None:
        self.local.close()

    def start_method(self) -> str:
        return "dask"


class TaskorchDaskAdapter(TaskorchAdapter):
    name = "taskorch-dask"
    sections = "AB"

    @staticmethod
    def preload() -> str:
        import distributed

        from taskorch.dask import DaskBackend  # noqa: F401

        return str(getattr(distributed, "__version__", "?"))

    def create(self) -> None:
        from taskorch import Policy, TaskOrchestrator
        from taskorch.dask import DaskBackend

        self.local = _LocalCluster(self.workers)
        self.pool = TaskOrchestrator(backend=DaskBackend(self.local.client),
                                     max_backlog=1_000_000, policy=Policy())

    def stop(self, timeout: float) -> None:
        self.pool.stop(timeout=timeout)
        self.local.close()

    def kill(self, timeout: float) -> None:
        self.pool.stop(timeout=min(timeout, 2.0))
        self.local.close()

    def start_method(self) -> str:
        return "dask"


class TaskorchRemoteAdapter(PoolAdapter):
    """``taskorch serve`` (a subprocess, Unix socket) and ``taskorch.connect()``: run() spends
    the credits the server grants (no round trip per task) and each submission is committed to
    the journal (WAL, group commit, synchronous=FULL) before the server enqueues it."""

    name = "taskorch-remote"
    sections = "A"
    journal = True

    @staticmethod
    def preload() -> str:
        import taskorch
        from taskorch import connect  # noqa: F401 (a lazy name: import now)

        return str(getattr(taskorch, "__version__", "?"))

    def create(self) -> None:
        import subprocess
        import tempfile

        from taskorch import connect

        self.tmp = tempfile.mkdtemp(prefix="tob-")
        sock, key, log = (os.path.join(self.tmp, name) for name in ("s.sock", "key", "log"))
        journal = (["--journal", os.path.join(self.tmp, "journal.sqlite3")] if self.journal
                   else ["--no-journal"])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (SCRIPT_DIR, os.environ.get("PYTHONPATH")) if p))  # workers import T
        with open(log, "wb") as err:
            self.server = subprocess.Popen(
                [sys.executable, "-m", "taskorch", "serve", "--socket", sock, "--authkey-file",
                 key, "--workers", str(self.workers), "--backlog", "1000000", *journal],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env)
        deadline = time.monotonic() + 30.0
        while "listening on" not in open(log).read():
            if self.server.poll() is not None or time.monotonic() > deadline:
                raise SectionError(f"taskorch serve did not start: {open(log).read()[-300:]}")
            time.sleep(0.01)
        self.pool = connect(sock, authkey_file=key)

    def submit(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        return TaskorchAdapter.dropped_is_error(self.pool.run(fn, *args))

    def stop(self, timeout: float) -> None:
        import signal

        self.pool.close(timeout)
        self.server.send_signal(signal.SIGTERM)
        self.server.wait(timeout)
        self._cleanup()

    def kill(self, timeout: float) -> None:
        self.pool.close(0)
        self.server.kill()
        self.server.wait(timeout)
        self._cleanup()

    def _cleanup(self) -> None:
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)

    def worker_pids(self) -> list[int]:
        import psutil

        return [p.pid for p in psutil.Process(self.server.pid).children(recursive=False)
                if not is_helper_process(p)]

    def start_method(self) -> str:
        return "loky (server)"


class TaskorchRemoteNoJournalAdapter(TaskorchRemoteAdapter):
    name = "taskorch-remote-nj"
    journal = False


ADAPTERS: dict[str, type[PoolAdapter]] = {
    a.name: a for a in (TaskorchAdapter, CfAdapter, LokyAdapter, MpAdapter, PebbleAdapter,
                        TaskorchDaskAdapter, DaskAdapter, TaskorchRemoteAdapter,
                        TaskorchRemoteNoJournalAdapter)
}


# --------------------------------------------------------------------------------------------
# Child: pool lifecycle, sections, and the JSON it writes
# --------------------------------------------------------------------------------------------

class Child:
    """The state of one ``--child POOL`` run: parameters, results so far, processes seen."""

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
        self.rss_bare = 0  # RSS before the pool library is imported, set in main()
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

    # -- sections: each function is one repetition, on its own fresh pool --------------------

    def sec_A(self) -> dict[str, Any]:
        n = (min(self.p["a_tasks"], DASK_A_TASKS) if self.pool_name in DASK_POOLS
             else self.p["a_tasks"])
        pool = self.new_pool()
        try:
            self.warm(pool)
            self.remember_tree()
            gc.collect()
            submit, noop = pool.submit, T.noop
            t0 = time.perf_counter()
            handles = [submit(noop, ()) for _ in range(n)]
            self.wait_all(pool, handles, max(30.0, n / 200), "collect")
            elapsed = time.perf_counter() - t0
            return {"tasks_per_s": n / elapsed, "seconds": elapsed, "tasks": n}
        finally:
            self.close(pool, graceful=True)

    def sec_M(self) -> dict[str, Any]:
        """A's no-op throughput with metrics off and on, on ONE pool, in M_PAIRS pairs of
        blocks of N / M_PAIRS tasks, the order alternating (off-on, on-off, ...); the median of
        the pairs' on/off ratios, by wall time and by the parent's CPU time (which the other
        processes of a shared machine disturb less). Successive blocks, and successive pools in
        one interpreter, get slower (seen on main as well): comparing separate pools, or
        blocks far apart, would measure that drift, not the metrics."""
        from taskorch._parent import figures

        n = max(200, self.p["a_tasks"] // M_PAIRS)
        pool = self.new_pool()
        wall: dict[bool, list[float]] = {False: [], True: []}
        cpu: dict[bool, list[float]] = {False: [], True: []}
        try:
            self.warm(pool)
            backlog = pool.pool._backlog
            submit, noop = pool.submit, T.noop
            for pair in range(M_PAIRS):
                for metrics in ((False, True) if pair % 2 == 0 else (True, False)):
                    recorder = figures.enable(backlog) if metrics else None
                    if not metrics:
                        figures.disable(backlog)
                    t0, c0 = time.perf_counter(), time.process_time()
                    handles = [submit(noop, ()) for _ in range(n)]
                    self.wait_all(pool, handles, max(30.0, n / 200), "collect")
                    wall[metrics].append(n / (time.perf_counter() - t0))
                    cpu[metrics].append(n / max(1e-9, time.process_time() - c0))
                    if recorder is not None:  # the figures did count the block's tasks
                        counted = sum(sum(f.run.counts) for f in recorder.by_name.values())
                        if counted < n:
                            raise SectionError(f"metrics counted {counted} of {n} tasks")
        finally:
            self.close(pool, graceful=True)
        return {
            "off_tasks_per_s": median(wall[False]), "on_tasks_per_s": median(wall[True]),
            "on_vs_off": median([on / off for on, off in zip(wall[True], wall[False])]),
            "cpu_on_vs_off": median([on / off for on, off in zip(cpu[True], cpu[False])]),
            "tasks": n * M_PAIRS * 2,
        }

    def sec_B(self) -> dict[str, Any]:
        n = self.p["b_tasks"]
        pool = self.new_pool()
        try:
            self.warm(pool)
            gc.collect()
            t0 = time.perf_counter()
            handles = [pool.submit(T.cpu, (self.cpu_loops,)) for _ in range(n)]
            self.wait_all(pool, handles, 60.0, "collect")
            elapsed = time.perf_counter() - t0
            return {"speedup": self.serial_s / elapsed, "parallel_s": elapsed,
                    "serial_s": self.serial_s, "tasks": n}
        finally:
            self.close(pool, graceful=True)

    def sec_C(self) -> dict[str, Any]:
        n = self.p["c_tasks"]
        pool = self.new_pool()
        try:
            self.warm(pool)
            gc.collect()
            clock, submit, task, args = time.perf_counter_ns, pool.submit, T.sleep_s, (C_SLEEP_S,)
            handles: list[Any] = []
            lat_ns: list[int] = []
            for _ in range(n):
                t0 = clock()
                handle = submit(task, args)
                lat_ns.append(clock() - t0)
                handles.append(handle)
            self.wait_all(pool, handles, 60.0, "collect")
            lat_ns.sort()
            return {"p50_us": percentile(lat_ns, 50) / 1e3, "p99_us": percentile(lat_ns, 99) / 1e3,
                    "max_us": lat_ns[-1] / 1e3, "tasks": n}
        finally:
            self.close(pool, graceful=True)

    def sec_I(self) -> dict[str, Any]:
        n = self.p["i_items"]
        pool = self.new_pool()
        try:
            self.warm(pool)
            items = list(range(n))
            gc.collect()
            t0 = time.perf_counter()
            results = pool.map(T.echo, items)
            elapsed = time.perf_counter() - t0
            if results != items:
                raise SectionError("map() returned wrong or misordered results")
            return {"items_per_s": n / elapsed, "seconds": elapsed, "items": n}
        finally:
            self.close(pool, graceful=True)

    def sec_D(self) -> dict[str, Any]:
        pool = self.cls(self.workers)
        gc.collect()
        t0 = time.perf_counter()
        try:
            pool.create()
            value = pool.get(pool.submit(T.echo, (7,)), 30.0)
            elapsed = time.perf_counter() - t0
            self.note_start_method(pool)
            if value != 7:
                raise SectionError(f"first result was {value!r}, expected 7")
            return {"cold_ms": elapsed * 1e3}
        finally:
            self.close(pool, graceful=True)

    def sec_E(self) -> dict[str, Any]:
        import psutil

        gc.collect()
        me = psutil.Process()
        rss_before = me.memory_info().rss
        pool = self.new_pool()
        try:
            self.warm(pool)
            handles = [pool.submit(T.noop, ()) for _ in range(self.p["e_tasks"])]
            self.wait_all(pool, handles, 30.0, "collect")
            deadline = time.monotonic() + 5.0
            pids = pool.worker_pids()
            while len(pids) < self.workers and time.monotonic() < deadline:
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
            self.remember_tree()
            return {"parent_rss_mib": rss / MIB, "parent_rss_delta_mib": (rss - rss_before) / MIB,
                    "parent_rss_over_bare_mib": (rss - self.rss_bare) / MIB,
                    "worker_uss_mib": sum(uss) / len(uss) / MIB,
                    "worker_uss_each_mib": [u / MIB for u in uss], "workers_found": len(uss)}
        finally:
            self.close(pool, graceful=True)

    def sec_F(self) -> dict[str, Any]:
        n = self.p["f_tasks"]
        pool = self.new_pool()
        try:
            self.warm(pool)
            self.remember_tree()
            handles: list[Any] = []
            submit_errors: dict[int, str] = {}
            for i in range(n):
                try:
                    handles.append(pool.submit(T.crash_or_sleep, (i, F_CRASH_INDEX, F_TASK_S)))
                except Exception as exc:  # noqa: BLE001 (the pool broke while we submitted)
                    handles.append(None)
                    submit_errors[i] = describe(exc)
            deadline = time.perf_counter() + F_DEADLINE_S
            ok = 0
            pending: list[int] = []      # indices of innocent tasks unresolved at the deadline
            errors: dict[str, int] = {}  # full description -> count (JSON, notes)
            kinds: dict[str, int] = {}   # exception type name -> count (table cell)
            for i, handle in enumerate(handles):
                if i == F_CRASH_INDEX:
                    continue
                if handle is None:
                    key = f"submit raised {submit_errors[i]}"
                    errors[key] = errors.get(key, 0) + 1
                    kinds["submit raised"] = kinds.get("submit raised", 0) + 1
                    continue
                status, value = pool.outcome(handle, deadline - time.perf_counter())
                if status == "ok" and value == i:
                    ok += 1
                elif status == "pending":
                    pending.append(i)
                else:
                    key = describe(value) if status == "error" else f"wrong result {value!r}"
                    errors[key] = errors.get(key, 0) + 1
                    kind = type(value).__name__ if status == "error" else "wrong result"
                    kinds[kind] = kinds.get(kind, 0) + 1
            crashed = handles[F_CRASH_INDEX]
            if crashed is None:
                crashed_outcome = f"submit raised {submit_errors[F_CRASH_INDEX]}"
            else:
                status, value = pool.outcome(crashed, F_CRASHED_WAIT_S)
                crashed_outcome = {"ok": f"returned {value!r}", "pending":
                                   f"never resolved (still pending {F_CRASHED_WAIT_S:g} s "
                                   "after the others were done)"}.get(status) or describe(value)
            usable, usable_detail = self.probe(pool)
            self.remember_tree()
            # "Nothing is lost silently": once the pool is stopped, are the futures that never
            # resolved resolved now (cancelled, abandoned, failed), or still pending forever?
            self.close(pool, graceful=False)
            after_stop: dict[str, int] = {}
            for i in pending + ([F_CRASH_INDEX] if crashed is not None else []):
                status, value = pool.outcome(handles[i], 0.5)
                kind = type(value).__name__ if status == "error" else status
                after_stop[kind] = after_stop.get(kind, 0) + 1
            return {"ok": ok, "innocent": n - 1, "lost_pending": len(pending),
                    "lost_pending_indices": pending, "lost_errors": errors, "lost_kinds": kinds,
                    "crashed_task": crashed_outcome, "unresolved_after_stop": after_stop,
                    "usable": usable, "usable_detail": usable_detail}
        finally:
            # Never graceful here: multiprocessing.Pool's close()+join() waits forever for the
            # crashed task. kill() is bounded and then reap_leftovers() cleans up.
            self.close(pool, graceful=False)

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

    def sec_G(self) -> dict[str, Any]:
        import tempfile

        if not self.cls.has_task_timeout:
            return {"supported": False}
        pool = self.new_pool()
        fd, start_file = tempfile.mkstemp(prefix="bench-hang-")
        os.close(fd)
        os.unlink(start_file)  # the task recreates it when it starts
        graceful = False
        try:
            self.warm(pool)
            t_submit = time.monotonic_ns()
            handle = pool.submit_with_timeout(T.hang, (start_file, G_HANG_S), G_TIMEOUT_S)
            status, value = pool.outcome(handle, G_TIMEOUT_S + G_GRACE_S)
            t_seen = time.monotonic_ns()
            if status == "pending":
                raise SectionError(f"the hung task was not failed {G_GRACE_S:g} s after its "
                                   f"{G_TIMEOUT_S:g} s timeout")
            if status == "ok":
                raise SectionError(f"the hung task returned {value!r}")
            try:
                with open(start_file, encoding="ascii") as f:
                    t_start = int(f.read())
            except (OSError, ValueError):
                t_start = None  # failed before it started: report from submit only
            timeout_ns = G_TIMEOUT_S * 1e9
            usable, usable_detail = self.probe(pool)
            graceful = usable
            return {
                "supported": True,
                "late_ms": ((t_seen - t_start - timeout_ns) / 1e6 if t_start is not None
                            else (t_seen - t_submit - timeout_ns) / 1e6),
                "late_from_submit_ms": (t_seen - t_submit - timeout_ns) / 1e6,
                "start_delay_ms": (t_start - t_submit) / 1e6 if t_start is not None else None,
                "failure": describe(value), "usable": usable, "usable_detail": usable_detail,
            }
        finally:
            self.close(pool, graceful=graceful)
            try:
                os.unlink(start_file)
            except OSError:
                pass

    def sec_H(self) -> dict[str, Any]:
        n = self.p["h_tasks"]
        pool = self.new_pool()
        try:
            self.warm(pool)
            handles = [pool.submit(T.sleep_s, (H_TASK_S,)) for _ in range(n)]
            self.wait_all(pool, handles, 30.0, "collect")
            self.remember_tree()
            timeout = self.p["stop_timeout"]
            t0 = time.perf_counter()
            call_bounded(lambda: pool.stop(timeout), timeout + 2.0, "stop")
            elapsed = time.perf_counter() - t0
            pool.stopped = True
            return {"drain_ms": elapsed * 1e3}
        finally:
            self.close(pool, graceful=False)  # only reached unstopped if stop() failed

    # -- driver ----------------------------------------------------------------------------------

    def run_section(self, key: str) -> dict[str, Any]:
        """Warm-up (full mode), then the repetitions; medians of the numeric fields."""
        body: Callable[[], dict[str, Any]] = getattr(self, f"sec_{key}")
        reps = self.p["reps"]
        # D's first run is the measurement ("cold" = first pool of this interpreter), so it
        # has no warm-up; in full mode its further runs are reported as "restart".
        warmup = self.p["warmup"] and key not in "DF"
        if warmup:
            body()
        runs = [body() for _ in range(reps)]
        out: dict[str, Any] = {"reps": runs}
        for field, first in runs[0].items():
            values = [r[field] for r in runs if isinstance(r.get(field), (int, float))]
            if isinstance(first, bool):
                out[field] = all(r[field] for r in runs)
            elif isinstance(first, (int, float)) and len(values) == len(runs):
                out[field] = median(values)
            else:
                out[field] = first
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
            out["import_ms"] = self.result.get("import_ms")
        return out

    def main(self) -> int:
        import psutil

        self.rss_bare = psutil.Process().memory_info().rss
        try:
            t0 = time.perf_counter()
            self.result["version"] = self.cls.preload()
            self.result["import_ms"] = (time.perf_counter() - t0) * 1e3
        except BaseException as exc:  # noqa: BLE001 (e.g. taskorch not importable yet)
            self.result["import_error"] = describe(exc)
            self.write()
            return 0
        self.result["start_method"] = "?"
        self.write()
        meter, overall = NoiseMeter(), NoiseMeter()
        overall.start()
        for key in EXEC_ORDER:
            if key not in self.sections or key not in self.cls.sections:
                continue
            self.result["current"] = key
            self.write()
            gc.collect()
            meter.start()
            try:
                self.result["sections"][key] = self.run_section(key)
            except BaseException as exc:  # noqa: BLE001 (one section's failure ends only it)
                if isinstance(exc, KeyboardInterrupt):
                    raise
                self.result["sections"][key] = {"error": describe(exc)}
            self.result["noise"][key] = meter.stop()
            self.reap_leftovers(key)
            self.write()
        self.result["current"] = None
        self.result["noise_overall"] = overall.stop()
        self.remember_tree()
        self.write()
        return 0


# --------------------------------------------------------------------------------------------
# Parent: calibration, running the children, the report
# --------------------------------------------------------------------------------------------

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


def run_child(pool: str, args: Any, p: dict[str, Any], cpu_loops: int,
              serial_s: float, sections: str | None = None,
              reps: int | None = None) -> dict[str, Any]:
    """Run one pool in a fresh interpreter under a deadline; return its (maybe partial) JSON.
    ``sections`` and ``reps`` override the command line's."""
    import subprocess
    import tempfile

    import psutil

    timeout = args.child_timeout or p["child_timeout"]
    with tempfile.TemporaryDirectory(prefix=f"bench-{pool}-") as tmp:
        out_path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--child", pool, "--child-out", out_path,
               "--workers", str(args.workers), "--sections", sections or args.sections,
               "--cpu-loops", str(cpu_loops), "--serial-s", repr(serial_s)]
        if args.quick:
            cmd.append("--quick")
        if (reps or args.reps) is not None:
            cmd += ["--reps", str(reps or args.reps)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [SCRIPT_DIR, env.get("PYTHONPATH")]))
        with open(os.path.join(tmp, "stderr"), "w+b") as err:
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
        try:
            with open(out_path, encoding="utf-8") as f:
                result: dict[str, Any] = json.load(f)
        except (OSError, ValueError):
            result = {"pool": pool, "sections": {}, "noise": {}, "notes": [], "seen_pids": {}}
    result["elapsed_s"] = elapsed
    result["returncode"] = proc.returncode
    if killed_at is not None:
        result["killed"] = (f"child killed after its {timeout:g} s deadline"
                            + (f" during section {result['current']}" if result.get("current")
                               else ""))
    elif proc.returncode != 0:
        last = stderr_tail.strip().splitlines()[-1:] or ["no stderr"]
        result["killed"] = f"child exited with status {proc.returncode}: {last[0][:120]}"
    if proc.returncode != 0 or killed_at is not None:
        result["stderr_tail"] = stderr_tail
    # Processes the child started and left behind (e.g. a pool's workers after the child was
    # killed). Trackers exit on their own once their pipe closes: give them a moment first.
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
    return result


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


# -- formatting ---------------------------------------------------------------------------------

ROWS: list[tuple[str, str]] = [  # (section, row title); a section may have several rows
    ("A", "A no-op throughput, tasks/s"),
    ("B", "B CPU-bound speedup vs serial"),
    ("C", "C submit latency while busy, p50 / p99 us"),
    ("D", "D cold start to first result, ms"),
    ("E", "E parent RSS, MiB (+ library and pool)"),
    ("E2", "E worker USS, MiB (mean of N)"),
    ("F", "F crash: innocent tasks ok; usable after"),
    ("G", "G hard timeout: failure seen late by, ms"),
    ("H", "H drain: last result to stop() returned, ms"),
    ("I", "I bulk map, items/s"),
    ("M", "M metrics overhead: no-op tasks/s, metrics off / on (on vs off)"),
]


def short(text: str, width: int = 60) -> str:
    text = " ".join(str(text).split()).replace("|", "/")
    return text if len(text) <= width else text[: width - 1] + "…"


def fmt_cell(row: str, res: dict[str, Any] | None) -> str:
    section = row[0]
    if res is None:
        return "—"
    if "error" in res:
        return "error: " + short(res["error"])
    if section == "A":
        return f"{res['tasks_per_s']:,.0f}"
    if section == "M":
        return (f"{res['off_tasks_per_s']:,.0f} / {res['on_tasks_per_s']:,.0f} "
                f"({res['on_vs_off']:.3f}x; by parent CPU {res['cpu_on_vs_off']:.3f}x)")
    if section == "B":
        return f"{res['speedup']:.2f}x"
    if section == "C":
        return f"{res['p50_us']:.1f} / {res['p99_us']:.1f}"
    if section == "D":
        extra = [f"import {res['import_ms']:.0f}"] if res.get("import_ms") is not None else []
        if "restart_ms" in res:
            extra.append(f"restart {res['restart_ms']:.0f}")
        return f"{res['cold_ms']:.0f}" + (f" ({'; '.join(extra)})" if extra else "")
    if row == "E":
        return f"{res['parent_rss_mib']:.1f} (+{res['parent_rss_over_bare_mib']:.1f})"
    if row == "E2":
        return f"{res['worker_uss_mib']:.1f} (N={res['workers_found']})"
    if section == "F":
        lost = []
        if res.get("lost_pending"):
            lost.append(f"{res['lost_pending']:g} never resolved")
        lost += [f"{count} {kind}" for kind, count in res["lost_kinds"].items()]
        text = f"{res['ok']:g}/{res['innocent']}, usable: {'yes' if res['usable'] else 'no'}"
        each = res.get("ok_each") or []
        if len(set(each)) > 1:
            text += f" (worst rep; reps: {', '.join(str(n) for n in each)})"
        return text + (f" (lost: {'; '.join(lost)})" if lost else "")
    if section == "G":
        if not res.get("supported"):
            return "none"
        return f"+{res['late_ms']:.0f}" + ("" if res.get("usable") else ", then unusable")
    if section == "H":
        return f"{res['drain_ms']:.1f}"
    if section == "I":
        return f"{res['items_per_s']:,.0f}"
    return "?"


def pool_cell(row: str, child: dict[str, Any]) -> str:
    if "import_error" in child:
        return "error: import failed: " + short(child["import_error"], 50)
    res = child.get("sections", {}).get(row[0])
    if res is None and child.get("killed"):
        current = child.get("current")
        if current and current != row[0]:
            return f"not run (child killed during {current})"
        return "error: " + short(child["killed"])
    return fmt_cell(row, res)


def noise_cell(child: dict[str, Any]) -> str:
    overall = (child.get("noise_overall") or {}).get("cores")
    text = "—" if overall is None else f"{overall * 100:.0f}%"
    noise = {k: v["cores"] for k, v in (child.get("noise") or {}).items()
             if v.get("cores") is not None}
    if noise:
        worst = max(noise, key=lambda k: noise[k])
        text += f" (max {noise[worst] * 100:.0f}% in {worst})"
    return text


# (section, field, label, higher_is_better) for the ratio lines
RATIOS = [
    ("A", "tasks_per_s", "A no-op tasks/s", True),
    ("B", "speedup", "B CPU speedup", True),
    ("C", "p50_us", "C submit p50", False),
    ("C", "p99_us", "C submit p99", False),
    ("D", "cold_ms", "D cold start", False),
    ("E", "parent_rss_mib", "E parent RSS", False),
    ("E", "worker_uss_mib", "E worker USS", False),
    ("G", "late_ms", "G timeout lateness", False),
    ("H", "drain_ms", "H drain", False),
    ("I", "items_per_s", "I bulk map items/s", True),
]


def number(children: dict[str, Any], pool: str, section: str, field: str) -> float | None:
    res = children.get(pool, {}).get("sections", {}).get(section) or {}
    value = res.get(field)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def noisy(children: dict[str, Any], pool: str, section: str) -> bool:
    cores = ((children.get(pool, {}).get("noise") or {}).get(section) or {}).get("cores")
    return cores is not None and cores > NOISE_NOTE


def ratio_lines(children: dict[str, Any], pools: list[str]) -> list[str]:
    lines = dask_ratio_lines(children, pools) + remote_ratio_lines(children, pools)
    on_vs_off = number(children, "taskorch", "M", "on_vs_off")
    if on_vs_off is not None:
        cpu = number(children, "taskorch", "M", "cpu_on_vs_off") or 0.0
        lines.append(f"M taskorch no-op throughput with metrics on: {on_vs_off:.3f}x of metrics "
                     f"off (same pool, alternating blocks; by the parent's CPU time "
                     f"{cpu:.3f}x; target >= 0.95)"
                     + (" (noisy)" if noisy(children, "taskorch", "M") else ""))
    pools = [p for p in pools if p not in DASK_POOLS and p not in REMOTE_POOLS]
    anchors = [a for a in pools if a != "taskorch"]
    if "taskorch" not in pools or not anchors:
        return lines or ["(ratio lines compare taskorch with the anchors: include taskorch and "
                         "at least one anchor in --pools)"]
    for section, field, label, higher in RATIOS:
        mine = number(children, "taskorch", section, field)
        if section not in children.get("taskorch", {}).get("sections", {}):
            continue
        parts = []
        for anchor in anchors:
            theirs = number(children, anchor, section, field)
            if mine is None or theirs is None:
                why = "none" if section == "G" and theirs is None else "n/a"
                parts.append(f"taskorch/{anchor} = {why}")
            elif section == "G" or theirs <= 0 or mine <= 0:
                # A lateness can be ~0 ms: a ratio of two such numbers means nothing.
                parts.append(f"taskorch {mine:+.0f} ms vs {anchor} {theirs:+.0f} ms")
            else:
                parts.append(f"taskorch/{anchor} = {mine / theirs:.2f}x")
            if noisy(children, "taskorch", section) or noisy(children, anchor, section):
                parts[-1] += " (noisy)"
        better = "higher is better" if higher else "lower is better"
        lines.append(f"{label} ({better}): " + ", ".join(parts))
    mine_f = children.get("taskorch", {}).get("sections", {}).get("F")
    if mine_f and "ok" in mine_f:
        parts = [f"{pool} {fmt_cell('F', children.get(pool, {}).get('sections', {}).get('F'))}"
                 for pool in anchors]
        lines.append(f"F crash (more is better): taskorch {fmt_cell('F', mine_f)}; "
                     + "; ".join(parts))
    return lines


def remote_ratio_lines(children: dict[str, Any], pools: list[str]) -> list[str]:
    """Remote run() through taskorch serve against a local TaskOrchestrator (section A)."""
    figures = {p: number(children, p, "A", "tasks_per_s")
               for p in ("taskorch", *REMOTE_POOLS) if p in pools}
    local, on, off = (figures.get(p) for p in ("taskorch", *REMOTE_POOLS))
    parts = []
    if on and local:
        parts.append(f"journal on/local = {on / local:.2f}x (target >= 0.5x)")
    if off and local:
        parts.append(f"journal off/local = {off / local:.2f}x")
    if on and off:
        parts.append(f"journal on/off = {on / off:.2f}x (target >= 0.8x)")
    if any(noisy(children, p, "A") for p in figures):
        parts.append("(noisy)")
    return ["A no-op tasks/s, remote run() through connect() (higher is better): "
            + ", ".join(parts)] if parts else []


def dask_ratio_lines(children: dict[str, Any], pools: list[str]) -> list[str]:
    """taskorch on Dask against plain Client.submit on the same kind of cluster."""
    if not all(p in pools for p in DASK_POOLS):
        return []
    parts = []
    for section, field, label in (("A", "tasks_per_s", "A no-op tasks/s"),
                                  ("B", "speedup", "B CPU speedup")):
        mine = number(children, "taskorch-dask", section, field)
        theirs = number(children, "dask", section, field)
        if mine is not None and theirs is not None and theirs > 0:
            noisy_mark = " (noisy)" if noisy(children, "taskorch-dask", section) or \
                noisy(children, "dask", section) else ""
            parts.append(f"{label} taskorch-dask/dask = {mine / theirs:.2f}x{noisy_mark}")
    return [f"Dask LocalCluster, 2 workers x 1 thread ({DASK_A_TASKS:,} no-op tasks): "
            + "; ".join(parts)] if parts else []


def render(children: dict[str, Any], pools: list[str], meta: dict[str, Any]) -> str:
    sections = meta["sections"]
    head = ["section"] + pools
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| start method | " + " | ".join(
        str(children[p].get("start_method", "?")) for p in pools) + " |")
    for row, title in ROWS:
        if row[0] not in sections:
            continue
        if row[0] == "B":
            title += f" ({meta['b_tasks']} x {CPU_TASK_S * 1e3:.0f} ms; serial " \
                     f"{meta['serial']['serial_s']:.2f} s)"
        if row[0] == "A":
            title += f" ({meta['a_tasks']:,} tasks"
            title += (f"; Dask pools {DASK_A_TASKS:,})" if any(p in pools for p in DASK_POOLS)
                      else ")")
        if row[0] == "I":
            title += (f" ({meta['i_items']:,} items; taskorch map(), automatic chunks; others "
                      "map/imap with Pool.map's chunksize)")
        lines.append(f"| {title} | " + " | ".join(pool_cell(row, children[p]) for p in pools)
                     + " |")
    lines.append("| noise: other processes' CPU, % of a core: whole run (worst section) | "
                 + " | ".join(noise_cell(children[p]) for p in pools) + " |")
    return "\n".join(lines)


def notes_for(children: dict[str, Any], pools: list[str], meta: dict[str, Any]) -> list[str]:
    notes = []
    serial_noise = meta["serial"]["noise"]["cores"]
    if serial_noise is not None and serial_noise > NOISE_NOTE:
        notes.append(f"noise: {serial_noise * 100:.0f}% of a core used by other processes "
                     "during the serial baseline: B's speedups are less reliable")
    for pool in pools:
        child = children[pool]
        noisy = [f"{key} {noise['cores'] * 100:.0f}%"
                 for key, noise in sorted((child.get("noise") or {}).items())
                 if noise["cores"] is not None and noise["cores"] > NOISE_NOTE]
        if noisy:
            notes.append(f"noise: {pool}: other processes used more than "
                         f"{NOISE_NOTE * 100:.0f}% of a core during " + ", ".join(noisy)
                         + ": those figures are less reliable")
        if child.get("killed"):
            notes.append(f"{pool}: {child['killed']}")
        for note in child.get("notes", []):
            notes.append(f"{pool}: {note}")
        f_res = child.get("sections", {}).get("F") or {}
        if "crashed_task" in f_res:
            notes.append(f"{pool}: F: the crashed task itself: {short(f_res['crashed_task'], 80)};"
                         f" after it: {short(f_res['usable_detail'], 80)}")
            if f_res.get("lost_pending"):
                after = f_res.get("unresolved_after_stop") or {}
                notes.append(f"{pool}: F: task(s) {f_res['lost_pending_indices']} never resolved "
                             f"within {F_DEADLINE_S:g} s (worst rep); once the pool was stopped, "
                             "the unresolved futures (incl. the crashed one) were: "
                             + ", ".join(f"{n} {k}" for k, n in after.items()))
    return notes


def write_chart(path: str, children: dict[str, Any], pools: list[str]) -> str | None:
    """One small bar chart per measured figure; returns why not, if it was not written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        return f"matplotlib not importable ({describe(exc)}); pip install matplotlib"
    figures = [(s, f, label + (" (higher is better)" if hi else " (lower is better)"))
               for s, f, label, hi in RATIOS]
    figures = [fig for fig in figures
               if any(number(children, p, fig[0], fig[1]) is not None for p in pools)]
    if not figures:
        return "no numeric results to chart"
    cols = 3
    rows = -(-len(figures) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (section, field, label) in zip(axes.flat, figures):
        values = [number(children, p, section, field) for p in pools]
        ax.bar(pools, [v or 0.0 for v in values],
               color=["tab:red" if p == "taskorch" else "tab:gray" for p in pools])
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=8)
        for i, v in enumerate(values):
            text = ("none" if section == "G" else "n/a") if v is None else \
                f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
            ax.text(i, v or 0.0, text, ha="center", va="bottom", fontsize=7)
    for ax in list(axes.flat)[len(figures):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def parse_args(argv: list[str] | None) -> Any:
    import argparse

    parser = argparse.ArgumentParser(
        description="Benchmark taskorch against concurrent.futures, loky, multiprocessing.Pool "
                    "and pebble (each pool in a fresh interpreter).",
        epilog="Sections: " + "; ".join(f"{row[0]} {title[2:]}" for row, title in
                                        ((r, t) for r, t in ROWS if len(r) == 1)))
    parser.add_argument("--quick", action="store_true",
                        help="fewer tasks, 1 repetition, no warm-up (whole run under a minute)")
    parser.add_argument("--pools", default=",".join(ALL_POOLS),
                        help=f"comma-separated subset of {','.join(ALL_POOLS)} (default: all)")
    parser.add_argument("--sections", default=ALL_SECTIONS,
                        help=f"letters of the sections to run (default: {ALL_SECTIONS})")
    parser.add_argument("--workers", type=int, default=2, help="workers per pool (default: 2)")
    parser.add_argument("--reps", type=int, default=None,
                        help="repetitions per section (default: 1 with --quick, else 3)")
    parser.add_argument("--child-timeout", type=float, default=None,
                        help="kill a pool's interpreter after this many seconds "
                             f"(default: {QUICK['child_timeout']:g} quick, "
                             f"{FULL['child_timeout']:g} full)")
    parser.add_argument("--json", metavar="FILE", help="also write all results as JSON")
    parser.add_argument("--chart", metavar="FILE.png",
                        help="also draw a bar chart (only if matplotlib imports)")
    # The child role: internal.
    parser.add_argument("--child", choices=ALL_POOLS, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--cpu-loops", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--serial-s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    pools = [p.strip() for p in args.pools.split(",") if p.strip()]
    unknown = [p for p in pools if p not in ALL_POOLS]
    if unknown or not pools:
        parser.error(f"--pools: unknown {unknown}; choose from {','.join(ALL_POOLS)}")
    args.pool_list = list(dict.fromkeys(pools))
    args.sections = "".join(s for s in ALL_SECTIONS if s in args.sections.upper())
    if not args.sections:
        parser.error(f"--sections: choose letters from {ALL_SECTIONS}")
    if args.workers < 1 or (args.reps is not None and args.reps < 1):
        parser.error("--workers and --reps must be at least 1")
    if args.child and not args.child_out:
        parser.error("--child needs --child-out")
    return args


def compile_bytecode() -> list[str]:
    """Write the .pyc files of taskorch and of this directory, as ``pip install`` does for a
    package (and did for every anchor library in site-packages).

    Hazard, measured here: taskorch is installed editable, and with PYTHONDONTWRITEBYTECODE set
    (as in this workplace's shells) no import ever writes a .pyc, so every fresh interpreter
    (each child, each worker) compiled taskorch from source: ~5 ms more in each worker's boot
    and more in the parent, all of it charged to taskorch's cold start (D) and none to the
    anchors. Returns the directories that could not be compiled (read-only, say)."""
    import compileall
    import importlib.util

    spec = importlib.util.find_spec("taskorch")
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    dirs.append(os.path.dirname(os.path.abspath(__file__)))
    return [d for d in dirs if not compileall.compile_dir(d, quiet=1)]


def parent_main(args: Any) -> int:
    import platform

    p = dict(QUICK if args.quick else FULL)
    reps = args.reps or p["reps"]
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

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
    children: dict[str, Any] = {}
    cold_pools = [pool for pool in args.pool_list
                  if pool not in DASK_POOLS and pool not in REMOTE_POOLS]
    cold = run_cold_starts(cold_pools, args, p, log) if "D" in args.sections and cold_pools else {}
    rest = args.sections.replace("D", "")
    for pool in args.pool_list:
        if rest:
            log(f"bench: {pool} ...")
            children[pool] = run_child(pool, args, p, cpu_loops, serial["serial_s"],
                                       sections=rest)
            state = children[pool].get("killed") or children[pool].get("import_error") or "done"
            log(f"bench: {pool}: {state} in {children[pool]['elapsed_s']:.1f} s")
        else:
            children[pool] = {"pool": pool, "sections": {}, "noise": {}, "notes": [],
                              "elapsed_s": sum(r["elapsed_s"] for r in cold.get(pool, []))}
        if pool in cold:
            merge_cold_starts(children[pool], cold[pool])
    meta = {
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
    if reps == 1:
        how = "1 repetition" + (" after a warm-up" if p["warmup"] else ", no warm-up")
    else:
        how = f"medians of {reps}" + (" after a warm-up" if p["warmup"] else "")
    print(f"## taskorch benchmark ({meta['mode']}: {args.workers} workers per pool, {how}; "
          f"Python {meta['python']}, {meta['cpu_count']} CPUs)\n")
    print(render(children, args.pool_list, meta))
    print()
    print("Pools: " + "; ".join(f"{p} = {POOL_LABELS[p]}"
                                + (f" {children[p]['version']}" if children[p].get("version")
                                   and p in ("loky", "pebble", "taskorch") else "")
                                for p in args.pool_list) + ".")
    print("C times each submit call alone (perf_counter_ns) while "
          f"{meta['c_tasks']:,} tasks of {C_SLEEP_S * 1e3:g} ms keep the workers busy. "
          f"D is the first pool built in a fresh interpreter that has imported the library "
          f"(the import is timed apart), median over {args.reps or p['d_reps']} such "
          f"interpreter(s) per pool, no warm-up ('restart' = a second pool in the same "
          f"interpreter). E: RSS of the interpreter that owns the pool (+ what importing the "
          f"library and running the pool added); USS of each worker. F: {meta['f_tasks']} "
          f"tasks, the 50th calls os._exit(1); the worst repetition is shown, and a future "
          f"unresolved after {F_DEADLINE_S:g} s counts as lost. "
          f"G: {G_TIMEOUT_S:g} s per-task timeout, lateness from the task's "
          f"start; 'none' = no per-task timeout. H: {meta['h_tasks']} tasks of "
          f"{H_TASK_S * 1e3:g} ms.\n")
    print("Ratios (one run; compare ratios, not absolute numbers across runs; '(noisy)': other "
          f"processes used more than {NOISE_NOTE * 100:.0f}% of a core during that section):")
    for line in ratio_lines(children, args.pool_list):
        print("- " + line)
    notes = notes_for(children, args.pool_list, meta)
    if notes:
        print("\nNotes:")
        for note in notes:
            print("- " + note)
    print(f"\n(total {meta['elapsed_s']:.1f} s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "pools": children}, f, indent=2, default=str)
        log(f"bench: wrote {args.json}")
    if args.chart:
        why_not = write_chart(args.chart, children, args.pool_list)
        log(f"bench: skipped the chart: {why_not}" if why_not else f"bench: wrote {args.chart}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return Child(args).main()
    return parent_main(args)


if __name__ == "__main__":
    sys.exit(main())
