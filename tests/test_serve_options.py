"""``taskorch serve``'s operator options (``--path``, ``--pidfile``, ``--socket-mode``,
``--socket-group``), ``taskorch status`` (workers, the oldest queued task, its errors), and a
SIGTERM sent the way timeout(1) sends it. A real server process each time; ordering from the
gates of ``_tasks`` and the server's ready line, never from sleeps."""

from __future__ import annotations

import grp
import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import _tasks as t
import pytest
import test_service
from _tasks import scaled, wait_until

from taskorch import connect

R = scaled(30)
TESTS_DIR = str(Path(__file__).resolve().parent)


short_dir = test_service.short_dir  # (a fixture, used by name)


def taskorch_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "taskorch", *args]


class Serve:
    """A ``taskorch serve`` subprocess (its own session, as under a service manager) with
    ``--path`` to the tests' modules instead of PYTHONPATH."""

    def __init__(self, directory: Path, *options: str, prefix: tuple[str, ...] = ()) -> None:
        self.socket = str(directory / "run" / "s.sock")
        self.key = directory / "key"
        self.log = directory / "serve.log"
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(
                [*prefix, *taskorch_argv("serve", "--socket", self.socket, "--authkey-file",
                                         str(self.key), "--path", TESTS_DIR, *options)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env,
                start_new_session=True)
        wait_until(self._ready, what="the server's ready line")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.stderr()}")
        return "taskorch serve: listening on" in self.stderr()

    def stderr(self) -> str:
        return self.log.read_text()

    def status(self, *options: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs}
        return subprocess.run(  # type: ignore[call-overload]
            taskorch_argv("status", "--socket", self.socket, "--authkey-file", str(self.key),
                          *options), text=True, timeout=R, **kwargs)

    def stop(self) -> int:
        return t.stop_on_sigterm(self.proc, self.stderr)


@pytest.fixture
def serve(short_dir: Path) -> Iterator[type[Serve]]:
    started: list[Serve] = []

    def start(*options: str, prefix: tuple[str, ...] = ()) -> Serve:
        server = Serve(short_dir, *options, prefix=prefix)
        started.append(server)
        return server

    yield start  # type: ignore[misc]
    for server in started:
        code = server.stop()
        assert code == 143, f"serve exited with {code}:\n{server.stderr()}"


def test_status_lists_workers_what_they_run_and_the_oldest_queued_task(serve, gates) -> None:
    server = serve("--workers", "1")
    g = gates("busy")
    with connect(server.socket, authkey_file=server.key) as client:
        busy = client.run(t.blocker, str(g.started), str(g.release_fifo))
        worker_pid = g.wait_started()
        waiting = client.run(t.square, 7)  # found by a module on --path, in the worker
        out = server.status("--json")
        assert out.returncode == 0, out.stderr
        fields = json.loads(out.stdout)
        assert fields["running"] == 1 and fields["queued"] == 1
        [worker] = fields["worker_details"]
        assert worker["pid"] == worker_pid and worker["tasks"] == 0
        assert worker["running"]["task_id"] == busy.task_id and worker["running"]["attempt"] == 1
        assert worker["running"]["seconds"] >= 0 and worker["rss_mib"] > 0
        assert fields["oldest_queued_seconds"] >= 0
        table = server.status().stdout
        assert re.search(rf"pid {worker_pid}\s+rss [\d.]+ MiB\s+tasks run 0\s+prefetched \d\s+"
                         rf"running task {busy.task_id} \(attempt 1, [\d.]+ s\)", table), table
        assert re.search(r"oldest queued\s+[\d.]+ s ago", table), table
        g.release()
        assert busy.result(R) == "go" and waiting.result(R) == 49
    fields = json.loads(server.status("--json").stdout)
    assert fields["worker_details"][0]["running"] is None
    assert fields["worker_details"][0]["tasks"] == 2 and fields["oldest_queued_seconds"] is None
    assert "none queued" in server.status().stdout


def test_status_into_a_closed_pipe_exits_3_without_a_traceback(serve) -> None:
    server = serve()
    read_end, write_end = os.pipe()
    os.close(read_end)  # `taskorch status | head -1`, once head has gone
    try:
        out = server.status(stdout=write_end, stderr=subprocess.PIPE)
    finally:
        os.close(write_end)
    assert out.returncode == 3 and out.stderr == "", out.stderr


def test_status_says_no_server_is_there(short_dir: Path) -> None:
    def status(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(taskorch_argv("status", *args), capture_output=True, text=True,
                              timeout=R)

    out = status("--socket", str(short_dir / "nonexistent.sock"))
    assert out.returncode == 1 and "no server is there: the socket does not exist" in out.stderr
    assert "authkey" not in out.stderr
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # left by a server that died
    stale.bind(str(short_dir / "stale.sock"))
    stale.close()
    out = status("--socket", str(short_dir / "stale.sock"))
    assert out.returncode == 1 and "no server is listening there" in out.stderr
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a socket but no key file
    live.bind(str(short_dir / "live.sock"))
    live.listen()
    try:
        out = status("--socket", str(short_dir / "live.sock"))
    finally:
        live.close()
    assert out.returncode == 1 and "cannot read the authkey file" in out.stderr
    assert "pass --authkey-file" in out.stderr and "authkey_file=" not in out.stderr


def test_sigterm_to_the_whole_process_group_as_timeout_sends_it(short_dir: Path) -> None:
    # timeout(1) signals the server, then its whole process group (the server again): one
    # stop, not a "second signal" that cuts the drain short, and no warning about workers.
    timeout = shutil.which("timeout")
    server = Serve(short_dir, "--log-level", "INFO",
                   prefix=(timeout, "600") if timeout else ())
    if timeout:
        os.kill(server.proc.pid, signal.SIGTERM)  # timeout(1) passes it on as it would its own
    else:
        os.kill(server.proc.pid, signal.SIGTERM)
        os.killpg(server.proc.pid, signal.SIGTERM)
    code = server.proc.wait(R)
    log = server.stderr()
    assert code == 143 if not timeout else code in (124, 143), log
    assert "SIGTERM: stopping" in log and "stopped (drained" in log
    assert "second signal" not in log and "WARNING" not in log, log


def test_pidfile_holds_the_servers_pid_while_it_runs(serve, short_dir: Path) -> None:
    pidfile = short_dir / "serve.pid"
    server = serve("--pidfile", str(pidfile))
    assert int(pidfile.read_text()) == server.proc.pid
    refused = subprocess.run(
        taskorch_argv("serve", "--socket", str(short_dir / "other.sock"), "--pidfile",
                      str(pidfile)), capture_output=True, text=True, timeout=R)
    assert refused.returncode == 2
    assert f"process {server.proc.pid} is running and holds it" in refused.stderr
    assert not (short_dir / "other.sock").exists()
    assert server.stop() == 143
    assert not pidfile.exists()


def test_socket_mode_and_group_let_a_group_connect(serve) -> None:
    group = grp.getgrgid(os.getgid()).gr_name
    server = serve("--socket-mode", "660", "--socket-group", group)
    sock = os.stat(server.socket)
    assert stat.S_IMODE(sock.st_mode) == 0o660 and sock.st_gid == os.getgid()
    directory = os.stat(os.path.dirname(server.socket))
    assert stat.S_IMODE(directory.st_mode) == 0o710 and directory.st_gid == os.getgid()
    key = os.stat(server.key)
    assert stat.S_IMODE(key.st_mode) == 0o640 and key.st_gid == os.getgid()
    assert server.status().returncode == 0


def test_socket_options_are_checked(short_dir: Path) -> None:
    def serve_fails(*options: str) -> str:
        out = subprocess.run(taskorch_argv("serve", *options), capture_output=True, text=True,
                             timeout=R)
        assert out.returncode == 2, out
        return out.stderr

    assert "octal" in serve_fails("--socket", str(short_dir / "s"), "--socket-mode", "rw")
    assert "no group" in serve_fails("--socket", str(short_dir / "s"), "--socket-group",
                                     "no-such-group-here")
    assert "apply to --socket" in serve_fails("--tcp", "127.0.0.1:0", "--socket-mode", "660")
