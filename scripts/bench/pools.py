"""Child side: one adapter per pool library, the same few verbs for each.

Runs in the child interpreter (``--child POOL``), never in the parent. Each adapter imports
its library inside its methods (``preload`` first, timed apart as D's import), so that this
module stays cheap for the workers that re-import the main module.

Verbs: ``preload`` (import, version), ``create`` (the timed constructor), ``submit`` and
``submit_with_timeout`` (a handle), ``outcome`` / ``get`` (wait for a handle), ``map`` (the bulk
API, section I), ``stop`` (a graceful drain), ``kill`` (bounded, whatever the state),
``worker_pids`` and ``start_method``.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable

from .config import POOL_SECTIONS, SCRIPTS_DIR
from .harness import SectionError, is_helper_process, taskorch_root


def bulk_chunksize(n: int, workers: int) -> int:
    """The anchors' chunk size for section I: multiprocessing.Pool.map's own default
    (4 chunks per worker), the best fixed choice for uniform tiny items."""
    return max(1, -(-n // (4 * workers)))


class PoolAdapter:
    """One pool instance. ``create`` is the timed constructor; ``stop`` is a graceful drain."""

    sections = POOL_SECTIONS  # the sections this pool runs
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
    sections = POOL_SECTIONS + "MPQR"

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
    # A huge backlog bound, as for the local pool: the bound never throttles section A.
    backlog_args: tuple[str, ...] = ("--backlog", "1000000")

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
            p for p in (SCRIPTS_DIR, os.environ.get("PYTHONPATH")) if p))  # bench.tasks
        with open(log, "wb") as err:
            self.server = subprocess.Popen(
                [sys.executable, "-m", "taskorch", "serve", "--socket", sock, "--authkey-file",
                 key, "--workers", str(self.workers), *self.backlog_args, *journal],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env,
                cwd=taskorch_root())  # (the same taskorch as this process's)
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
