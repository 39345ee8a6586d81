"""Processes the driver starts (workers, servers, redis-server): stdlib only.

Runs in the driver, in either venv. Every process starts in a process group of its own, and
its group id is written to the driver's JSON at once (``Started.on_start``), so that the
orchestrator can kill what a driver killed at its deadline left behind: by group id, never by
name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import Callable

REDIS_SERVER = "redis-server"


class Started:
    """The processes one driver started; ``on_start(pgid)`` records each one."""

    def __init__(self, on_start: Callable[[int], None]) -> None:
        self.on_start = on_start

    def popen(self, cmd: list[str], env: dict[str, str], log_path: str) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env=env, process_group=0)
        self.on_start(proc.pid)
        return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM (a graceful stop), then SIGKILL to its whole group past *timeout*."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    kill_group(proc.pid)
    proc.wait()


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             proc: subprocess.Popen[bytes] | None = None, log_path: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            tail = ""
            if log_path and os.path.exists(log_path):
                with open(log_path, "rb") as f:
                    tail = f.read()[-300:].decode("utf-8", "replace")
            raise RuntimeError(f"{what} did not start: {tail.strip()}")
        time.sleep(0.01)


class RedisServer:
    """Debian's redis-server on a Unix socket in *tmp* (no TCP port), no RDB snapshots, and an
    append-only file (fsync every second, Redis's default for AOF) when *aof*."""

    def __init__(self, started: Started, tmp: str, aof: bool) -> None:
        self.started = started
        self.tmp = tmp
        self.aof = aof
        self.sock = os.path.join(tmp, "redis.sock")
        self.log = os.path.join(tmp, "redis.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [REDIS_SERVER, "--port", "0", "--unixsocket", self.sock, "--unixsocketperm", "700",
               "--dir", self.tmp, "--save", "", "--daemonize", "no", "--logfile", ""]
        if self.aof:
            cmd += ["--appendonly", "yes", "--appendfsync", "everysec"]
        self.proc = self.started.popen(cmd, dict(os.environ), self.log)
        wait_for(self.answers_ping, 15.0, "redis-server", self.proc, self.log)

    def answers_ping(self) -> bool:
        import socket

        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(1.0)
                s.connect(self.sock)
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc, 5.0)


def redis_version() -> str | None:
    """redis-server's version, or None if it is not installed."""
    try:
        out = subprocess.run([REDIS_SERVER, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for word in out.split():
        if word.startswith("v="):
            return word[2:]
    return out.strip() or None
