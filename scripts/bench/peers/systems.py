"""One adapter per system of the peers section, the same verbs for each.

Runs in the driver: the taskorch adapters in taskorch's venv, the peers' in the peers' venv
(each imports its library only inside its methods). Verbs: ``start`` (broker or server, then
the workers), ``enqueue(kind, *args)`` (a handle), ``result(handle, timeout)`` (wait for a
W2 result through the system's own API), ``kill_broker`` (SIGKILL) and ``restart_broker``,
``revive_workers`` (restart worker processes that exited, as a supervisor would), ``stop``.

Settings: each system's defaults, except 2 worker processes of one thread each, quiet logs,
Redis over a Unix socket without RDB snapshots, and taskorch serve's backlog bound raised to
1,000,000 (the peers' queues are unbounded). taskorch serve runs three ways: its journal as by
default (an fsync per group commit), its journal with ``--journal-sync normal`` (no fsync per
commit: about the Redis peers' durability), and ``--no-journal``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from ..config import SCRIPTS_DIR
from . import work
from .procs import RedisServer, Started, stop, wait_for

TASKORCH_SYSTEMS = ("taskorch", "taskorch-normal", "taskorch-nj")
LABELS = {
    "taskorch": "taskorch serve, journal",
    "taskorch-normal": "taskorch serve, journal, --journal-sync normal",
    "taskorch-nj": "taskorch serve, --no-journal",
    "huey-sqlite": "Huey, SQLite storage",
    "huey-redis": "Huey, Redis",
    "rq": "RQ, Redis",
    "dramatiq": "Dramatiq, Redis",
    "celery": "Celery, Redis",
}
# What the peers' venv installs (the peers' venv only: never taskorch's).
# packaging: Celery 5.7 imports it without requiring it.
PEER_PACKAGES = ("celery", "packaging", "redis", "rq", "huey", "dramatiq[redis]")


def load_app(name: str) -> Any:
    """Import a peer's app module, or import it afresh: it reads its broker's address (which
    changes between phases) from the environment at import."""
    import importlib

    module = f"{__package__}.{name}"
    if module in sys.modules:
        return importlib.reload(sys.modules[module])
    return importlib.import_module(module)


class System:
    name = ""
    package = ""          # the distribution whose version the table shows
    needs_redis = True
    durable = True        # W4 runs only on a durable setting

    def __init__(self, started: Started, tmp: str, workers: int, aof: bool) -> None:
        self.started = started
        self.tmp = tmp
        self.workers = workers
        self.redis = RedisServer(started, tmp, aof) if self.needs_redis else None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (SCRIPTS_DIR, os.environ.get("PYTHONPATH")) if p)
        if self.redis is not None:
            self.env["PEER_REDIS_SOCK"] = self.redis.sock
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("PEER_")})

    def version(self) -> str:
        from importlib.metadata import version

        return version(self.package)

    def start(self) -> None:
        if self.redis is not None:
            self.redis.start()
        self.connect()
        for cmd in self.worker_commands():
            self.procs.append(self.started.popen(cmd, self.env, self.log_path()))

    def log_path(self) -> str:
        return os.path.join(self.tmp, "workers.log")

    def bin(self, script: str) -> str:
        return os.path.join(os.path.dirname(sys.executable), script)

    def connect(self) -> None:
        raise NotImplementedError

    def worker_commands(self) -> list[list[str]]:
        raise NotImplementedError

    def enqueue(self, kind: str, *args: Any) -> Any:
        raise NotImplementedError

    def result(self, handle: Any, timeout: float) -> Any:
        raise NotImplementedError

    def kill_broker(self) -> None:
        assert self.redis is not None
        self.redis.kill()

    def restart_broker(self) -> None:
        assert self.redis is not None
        self.redis.start()

    def revive_workers(self) -> int:
        revived = 0
        cmds = self.worker_commands()
        for k, proc in enumerate(self.procs):
            if proc.poll() is not None:
                self.procs[k] = self.started.popen(cmds[k], self.env, self.log_path())
                revived += 1
        return revived

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(15)
        for proc in self.procs:
            stop(proc, 10.0)
        if self.redis is not None:
            self.redis.stop()


class Taskorch(System):
    name = "taskorch"
    package = "taskorch"
    needs_redis = False
    journal = True
    sync: tuple[str, ...] = ()  # serve's default: --journal-sync full

    def start(self) -> None:
        self.sock = os.path.join(self.tmp, "s.sock")
        self.key = os.path.join(self.tmp, "key")
        self.start_server()
        self.connect()

    def start_server(self) -> None:
        journal = (["--journal", os.path.join(self.tmp, "journal.sqlite3"), *self.sync]
                   if self.journal else ["--no-journal"])
        log = os.path.join(self.tmp, f"serve{len(self.procs)}.log")
        server = self.started.popen(
            [sys.executable, "-m", "taskorch", "serve", "--socket", self.sock, "--authkey-file",
             self.key, "--workers", str(self.workers), "--backlog", "1000000", *journal],
            self.env, log)
        self.procs.append(server)

        def listening() -> bool:
            with open(log, encoding="utf-8", errors="replace") as f:
                return "listening on" in f.read()
        wait_for(listening, 30.0, "taskorch serve", server, log)

    def connect(self) -> None:
        from taskorch import connect

        self.client = connect(self.sock, authkey_file=self.key)

    def enqueue(self, kind: str, *args: Any) -> Any:
        return self.client.run(getattr(work, kind), *args)

    def result(self, handle: Any, timeout: float) -> Any:
        return handle.result(timeout)

    def server_pid(self) -> int:
        return self.procs[-1].pid

    def kill_broker(self) -> None:
        """SIGKILL the server (its workers then find their pipes closed)."""
        self.procs[-1].kill()
        self.procs[-1].wait()
        try:
            self.client.close(0)
        except Exception:  # noqa: BLE001 (the server is gone: closing may complain)
            pass

    def restart_broker(self) -> None:
        if os.path.exists(self.sock):
            os.unlink(self.sock)
        self.start_server()
        self.connect()

    def revive_workers(self) -> int:
        return 0  # serve restarts its own workers

    def stop(self) -> None:
        try:
            self.client.close(10.0)
        except Exception:  # noqa: BLE001 (after W4 the old client may be broken)
            pass
        for proc in self.procs:
            stop(proc, 15.0)


class TaskorchNormal(Taskorch):
    """The journal without an fsync per commit: a commit survives the server's SIGKILL (W4), as
    the Redis peers' AOF does (``appendfsync everysec``), not a power loss (Redis loses up to a
    second's writes to one). The round trip at about the peers' durability."""

    name = "taskorch-normal"
    sync = ("--journal-sync", "normal")


class TaskorchNoJournal(Taskorch):
    name = "taskorch-nj"
    journal = False
    durable = False


class HueySqlite(System):
    name = "huey-sqlite"
    package = "huey"
    needs_redis = False

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.env["PEER_HUEY_SQLITE"] = os.environ["PEER_HUEY_SQLITE"] = os.path.join(
            self.tmp, "huey.sqlite3")

    def connect(self) -> None:
        self.app = load_app("app_huey")

    def worker_commands(self) -> list[list[str]]:
        return [[sys.executable, "-m", "huey.bin.huey_consumer", "bench.peers.app_huey.huey",
                 "-w", str(self.workers), "-k", "process", "-q"]]

    def enqueue(self, kind: str, *args: Any) -> Any:
        return getattr(self.app, kind)(*args)

    def result(self, handle: Any, timeout: float) -> Any:
        return handle.get(blocking=True, timeout=timeout)

    def kill_broker(self) -> None:
        """No broker: SQLite is a file. Kill the consumer instead (the closest crash)."""
        for proc in self.procs:
            proc.kill()
            proc.wait()

    def restart_broker(self) -> None:
        pass  # revive_workers starts the consumer again


class HueyRedis(HueySqlite):
    name = "huey-redis"
    needs_redis = True

    def __init__(self, *args: Any) -> None:
        System.__init__(self, *args)
        os.environ.pop("PEER_HUEY_SQLITE", None)
        self.env.pop("PEER_HUEY_SQLITE", None)

    kill_broker = System.kill_broker
    restart_broker = System.restart_broker


class Rq(System):
    name = "rq"
    package = "rq"

    def connect(self) -> None:
        from redis import Redis
        from rq import Queue

        self.queue = Queue("default", connection=Redis(unix_socket_path=self.redis.sock))

    def worker_commands(self) -> list[list[str]]:
        return [[self.bin("rq"), "worker", "--url", "unix://" + self.redis.sock, "-q", "default"]
                for _ in range(self.workers)]

    def enqueue(self, kind: str, *args: Any) -> Any:
        return self.queue.enqueue(getattr(work, kind), *args)

    def result(self, handle: Any, timeout: float) -> Any:
        res = handle.latest_result(timeout=max(1, int(timeout)))
        if res is None:
            raise TimeoutError("no RQ result")
        return res.return_value


class Dramatiq(System):
    name = "dramatiq"
    package = "dramatiq"

    def connect(self) -> None:
        self.app = load_app("app_dramatiq")

    def worker_commands(self) -> list[list[str]]:
        return [[self.bin("dramatiq"), "bench.peers.app_dramatiq", "-p", str(self.workers),
                 "-t", "1"]]

    def enqueue(self, kind: str, *args: Any) -> Any:
        return getattr(self.app, kind).send(*args)

    def result(self, handle: Any, timeout: float) -> Any:
        return handle.get_result(block=True, timeout=int(timeout * 1000))


class Celery(System):
    name = "celery"
    package = "celery"

    def connect(self) -> None:
        self.app = load_app("app_celery")

    def worker_commands(self) -> list[list[str]]:
        return [[self.bin("celery"), "-A", "bench.peers.app_celery", "worker", "-c",
                 str(self.workers), "-P", "prefork", "-l", "WARNING"]]

    def enqueue(self, kind: str, *args: Any) -> Any:
        return getattr(self.app, kind).delay(*args)

    def result(self, handle: Any, timeout: float) -> Any:
        return handle.get(timeout=timeout)


ADAPTERS: dict[str, type[System]] = {
    a.name: a for a in (Taskorch, TaskorchNormal, TaskorchNoJournal, HueySqlite, HueyRedis, Rq,
                        Dramatiq, Celery)
}
