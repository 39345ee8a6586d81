"""``taskorch serve`` and ``taskorch.connect()``: a real server process, real clients.

Each test starts ``python -m taskorch serve`` as a subprocess (its stderr goes to a file) and
waits for its ready line. Ordering comes from the gates in ``_tasks`` (a task announces its
start, then waits for a release), from answers on the connection, and from polling the
server's log or stats to a deadline; never from sleeps. The fixture stops every server with
SIGTERM and checks that it exits 143 (drained), so each test also exercises the drain. One
test needs the server in this process, to stretch a wait of its own: it uses
``test_service_admission``'s in-process ``Server``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import pickle
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from typing import Any, Callable, Iterator

import _tasks as t
import pytest
from _tasks import scaled, sigstop, wait_until
from test_executor import held
from test_service_admission import KEY, make_server  # noqa: F401 - a fixture

from taskorch import (
    Client,
    OrchestratorClosedError,
    Policy,
    QueueFullError,
    RemoteTaskError,
    RemoteTraceback,
    SerializationError,
    ServerUnavailableError,
    WorkerCrashedError,
    connect,
)
from taskorch._parent import intake
from taskorch._service.client.requests import Request, new_future, payload
from taskorch._service.protocol import (
    C_STATS,
    S_ACCEPTED,
    S_CREDIT,
    S_HELLO,
    S_STATS,
    SERVICE_MAX_FRAME,
    submit_frame,
)
from taskorch._service.server import connection

R = scaled(30)  # deadline for any one result: only catches deadlocks
TESTS_DIR = str(Path(__file__).resolve().parent)


class Server:
    """A ``taskorch serve`` subprocess and what it printed."""

    def __init__(
        self, proc: subprocess.Popen[bytes], log: Path, address: Any, authkey_file: Path
    ) -> None:
        self.proc = proc
        self.log = log
        self.address = address  # a socket path, or (host, port)
        self.authkey_file = authkey_file
        self.expected_exit = 143  # what the fixture expects at the end (SIGTERM, drained)

    def stderr(self) -> str:
        return self.log.read_text()

    def wait_logged(self, text: str) -> None:
        wait_until(lambda: text in self.stderr(), what=f"{text!r} in the server's stderr")

    def connect(self) -> Client:
        return connect(self.address, authkey_file=self.authkey_file)

    def stop(self) -> int:
        return t.stop_on_sigterm(self.proc, self.stderr)


def _env(state: Path | None = None) -> dict[str, str]:
    # The server's workers import task functions by name (``_tasks``), like an application's
    # modules: the server needs them on its path. ``state``: where default journals go.
    env = dict(os.environ)
    if state is not None:
        env["XDG_STATE_HOME"] = str(state)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, env.get("PYTHONPATH")) if p)
    return env


def _taskorch(*args: str, **kwargs: Any) -> list[str]:
    return [sys.executable, "-m", "taskorch", *args]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="to-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def start_server(short_dir: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(*options: str, tcp: bool = False, preexec_fn: Callable[[], None] | None = None,
              like: Server | None = None) -> Server:
        """``like``: a server to replace, on its address and with its key."""
        n = len(servers)
        log = short_dir / f"serve{n}.log"
        key = short_dir / f"key{n}" if like is None else like.authkey_file
        if like is not None:
            where = ["--socket", str(like.address)]
        else:
            where = (["--tcp", "127.0.0.1:0"] if tcp
                     else ["--socket", str(short_dir / f"run{n}" / "s.sock")])
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                _taskorch("serve", *where, "--authkey-file", str(key), *options),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                env=_env(short_dir / "state"), preexec_fn=preexec_fn)
        server = Server(proc, log, None, key)
        servers.append(server)

        def ready() -> re.Match[str] | None:
            if proc.poll() is not None:
                raise AssertionError(
                    f"the server exited with {proc.returncode}:\n{server.stderr()}"
                )
            return re.search(r"taskorch serve: listening on (unix|tcp):(\S+) ", server.stderr())

        match = wait_until(ready, what="the server's ready line")
        if match.group(1) == "unix":
            server.address = match.group(2)
        else:
            host, port = match.group(2).rsplit(":", 1)
            server.address = (host, int(port))
        return server

    yield start
    failures = []
    for server in servers:
        code = server.stop()
        if code != server.expected_exit:
            failures.append(f"server exited with {code}:\n{server.stderr()}")
    assert not failures, "\n".join(failures)


# -- round trips -----------------------------------------------------------------------------------


def test_round_trip_with_a_lambda_a_module_function_and_run_async(start_server, short_dir) -> None:
    server = start_server()
    key = server.authkey_file.read_bytes()
    assert len(key) == 32 and server.authkey_file.stat().st_mode & 0o777 == 0o600
    assert (Path(server.address).parent.stat().st_mode & 0o777) == 0o700
    with server.connect() as client:
        f = client.run(lambda x: x + 1, 41)  # travels by value
        assert f is not None and f.result(R) == 42
        assert f.attempts == 1 and f.seconds is not None and f.task_id >= 1
        g = client.run(t.add, 2, 3, policy="kw")  # by reference: the server's workers import _tasks
        assert g is not None and g.result(R) == (5, "kw")
        h = client.with_policy(Policy(retries=2, backoff_initial=0, backoff_max=0)).run(
            t.fail_until, str(short_dir / "counter"), 3)
        assert h is not None and h.result(R) == 3 and h.attempts == 3
        assert not f.cancel()  # a remote task is not cancellable from the client

        async def submit() -> Any:
            fut = await client.run_async(t.square, 9)
            return await asyncio.wrap_future(fut)

        assert asyncio.run(submit()) == 81
        assert client.server_info["workers"] == 2
    # Closed: a closed client refuses new work.
    with pytest.raises(OrchestratorClosedError):
        client.run(t.square, 1)


def test_task_exceptions_cross_with_their_type(start_server) -> None:
    server = start_server()
    with server.connect() as client:
        with pytest.raises(ValueError, match="boom") as info:
            client.run(t.raise_value_error, "boom").result(R)
        assert isinstance(info.value.__cause__, RemoteTraceback)
        assert "raise_value_error" in info.value.__cause__.tb
        with pytest.raises(RemoteTaskError, match="NeedsTwoArgs"):
            client.run(t.raise_unpicklable).result(R)
        with pytest.raises(WorkerCrashedError) as crash:  # a taskorch error, pickled across
            client.run(t.crash_os_exit, 7).result(R)
        assert crash.value.exitcode == 7 and crash.value.pid
        # Nothing is sent for a call that does not pickle, or is over the frame limit.
        before = client.stats().submitted
        with pytest.raises(SerializationError):
            client.run(t.takes, threading.Lock())
        with pytest.raises(SerializationError, match="frame limit"):
            client.run(t.takes, b"x" * (SERVICE_MAX_FRAME + 1))
        assert client.stats().submitted == before


def test_stats_via_the_client_and_taskorch_status(start_server) -> None:
    server = start_server()
    with server.connect() as client:
        assert [client.run(t.square, i).result(R) for i in range(3)] == [0, 1, 4]
        with pytest.raises(ValueError):
            client.run(t.raise_value_error, "x").result(R)
        stats = client.stats()
    assert (stats.submitted, stats.succeeded, stats.failed, stats.workers) == (4, 3, 1, 2)
    status = ["status", "--socket", server.address, "--authkey-file", str(server.authkey_file)]
    out = subprocess.run(_taskorch(*status, "--json"), capture_output=True, text=True, timeout=R,
                         env=_env())
    assert out.returncode == 0, out.stderr
    fields = json.loads(out.stdout)
    assert (fields["submitted"], fields["succeeded"], fields["failed"]) == (4, 3, 1)
    out = subprocess.run(_taskorch(*status), capture_output=True, text=True, timeout=R, env=_env())
    assert out.returncode == 0 and re.search(r"succeeded\s+3", out.stdout), out


def test_tcp_on_loopback_and_refusing_other_addresses(start_server, short_dir) -> None:
    server = start_server(tcp=True)
    host, port = server.address
    with connect(f"{host}:{port}", authkey_file=server.authkey_file) as client:
        assert client.run(t.square, 5).result(R) == 25
    refused = subprocess.run(
        _taskorch("serve", "--tcp", "0.0.0.0:0", "--authkey-file", str(short_dir / "k")),
        capture_output=True, text=True, timeout=R, env=_env())
    assert refused.returncode == 2 and "--allow-remote" in refused.stderr, refused.stderr


# -- back-pressure -------------------------------------------------------------------------------


def test_a_full_backlog_raises_queue_full_in_the_client_and_run_async_waits(
    start_server, gates
) -> None:
    server = start_server("--workers", "1", "--backlog", "2")
    running, queued = gates("running"), gates("queued")
    with server.connect() as client:
        first = client.run(t.blocker, str(running.started), str(running.release_fifo))
        running.wait_started()  # the only worker is busy: everything else queues
        second = client.run(t.blocker, str(queued.started), str(queued.release_fifo))
        third = client.run(t.square, 3)
        with pytest.raises(QueueFullError):
            client.run(t.square, 4)
        assert client.stats().rejected == 1

        async def withdrawn() -> None:
            task = asyncio.ensure_future(client.run_async(t.square, 4))
            await asyncio.sleep(0)  # one step of the task: it has sent its C_SUBMIT frame
            client.stats()  # frames are read in order: the server has the submit, waiting for room
            task.cancel()  # sends C_WITHDRAW
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(withdrawn())

        loop = asyncio.new_event_loop()
        waiting = asyncio.run_coroutine_threadsafe(client.run_async(t.square, 5), loop)
        thread = threading.Thread(target=loop.run_forever, name="test-loop")
        thread.start()
        try:
            running.release()
            queued.wait_started()
            queued.release()
            assert [f.result(R) for f in (first, second, third)] == ["go", "go", 9]
            assert waiting.result(R).result(R) == 25
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
        stats = client.stats()  # the withdrawn request was never enqueued
        assert (stats.submitted, stats.succeeded, stats.rejected) == (4, 4, 1)


def test_with_wait_waits_for_room_and_raises_queue_full_only_past_its_seconds(
    start_server, gates
) -> None:
    server = start_server("--workers", "1", "--backlog", "1")
    running = gates("running")
    with server.connect() as client:
        first = client.run(t.blocker, str(running.started), str(running.release_fifo))
        running.wait_started()
        queued = client.run(t.square, 2)  # the backlog is full now
        with pytest.raises(QueueFullError):
            client.run(t.square, 3)
        started = time.monotonic()
        with pytest.raises(QueueFullError):
            client.with_wait(0.3).run(t.square, 4)
        assert time.monotonic() - started >= 0.3  # it waited its seconds, not less
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(lambda: client.with_wait(R).run(t.square, 5))
            running.release()  # (before or after the request reaches the server: both wait)
            assert waiting.result(R).result(R) == 25
        assert first.result(R) == "go" and queued.result(R) == 4
        s = client.stats()  # one refusal (run()), none for the waits; the timed-out one: nothing
        assert (s.submitted, s.succeeded, s.rejected) == (3, 3, 1)


def test_a_withdraws_cancel_waits_for_its_recall_off_the_loop_that_serves_run_async(
    make_server, gates, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    # A withdraw that comes just as its task was accepted cancels the task, and that cancel
    # waits (up to intake.RECALL_WAIT) for a worker holding the call to hand it back. The
    # server's asyncio loop serves every connection's run_async(): the wait must not hold it.
    # In this process, so that the wait lasts until the test lets it end: the worker holding
    # the call is stopped (SIGSTOP), and RECALL_WAIT is only a deadlock guard.
    monkeypatch.setattr(intake, "RECALL_WAIT", 10 * R)
    server = make_server()
    o = server.orchestrator
    withdrawn = server.registry.withdrawn
    cancelling = threading.Event()

    def cancel_and_tell(task_id: int, *watcher: Any) -> None:
        cancelling.set()
        withdrawn(task_id, *watcher)

    monkeypatch.setattr(server.registry, "withdrawn", cancel_and_tell)
    g = gates("busy")
    withdrawing = connect(server.listener.address, authkey=KEY)
    other = connect(server.listener.address, authkey=KEY)
    stopped: int | None = None
    released = False
    try:
        assert withdrawing.run(t.square, 1).result(R) == 1  # a first duration: prefetch deeper
        busy = withdrawing.run(t.blocker, str(g.started), str(g.release_fifo))
        worker = g.wait_started()
        # A submission accepted, and held by the busy worker (taken ahead, not started).
        session = withdrawing._session
        request = Request(new_future(lambda build, what: {"answer": False}))
        req = session._start(request, lambda req: submit_frame(
            req, payload(t.square, (2,), {}), None, wait=False, client=session.token, retry=False,
            credit=False))
        assert request.event is not None and request.event.wait(R)
        assert request.answer is not None and request.answer[0] == S_ACCEPTED
        wait_until(lambda: held(o) == 2, what="the worker to take the call ahead")
        stopped = worker
        sigstop(worker)
        session._withdraw(req)  # its cancel now waits for the stopped worker to answer
        assert cancelling.wait(R)
        try:
            accepted = asyncio.run(asyncio.wait_for(other.run_async(t.square, 5), R))
        except TimeoutError:
            pytest.fail("another connection's run_async() was not served while a withdraw's "
                        "cancel waited for its recall: the cancel holds the server's loop")
        os.kill(worker, signal.SIGCONT)
        stopped = None
        wait_until(lambda: o.stats().cancelled == 1, what="the recall to cancel the task")
        g.release()
        released = True
        assert busy.result(R) == "go" and accepted.result(R) == 25
        s = o.stats()
        assert (s.submitted, s.succeeded, s.cancelled) == (4, 3, 1)
    finally:
        if stopped is not None:
            os.kill(stopped, signal.SIGCONT)
        if not released:
            g.release()
        other.close()
        withdrawing.close()


def test_a_run_async_cancelled_while_its_record_is_committed_enqueues_nothing(
    make_server, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    # The race behind (5, 5, 1) != (4, 4, 1) above on a busy machine: a run_async() that got
    # its slot, whose record the journal was committing when its withdraw arrived. The
    # withdraw found the request neither waiting for room nor accepted, and the task ran.
    # Forced here: the record reaches the journal only once the server handled the withdraw.
    server = make_server()
    journal = server.registry.journal
    submit, withdraw = journal.submit, connection.ServedConnection._withdraw
    held, withdrawn = threading.Event(), threading.Event()
    late: list[threading.Thread] = []

    def submit_after_the_withdraw(*args: Any) -> None:  # (on the server's asyncio thread)
        late.append(threading.Thread(target=lambda: withdrawn.wait(R) and submit(*args),
                                     name="test-late-journal-submit"))
        late[-1].start()
        held.set()

    def withdraw_and_tell(self: Any, req: int) -> None:
        withdraw(self, req)
        withdrawn.set()

    monkeypatch.setattr(journal, "submit", submit_after_the_withdraw)
    monkeypatch.setattr(connection.ServedConnection, "_withdraw", withdraw_and_tell)
    client = connect(server.listener.address, authkey=KEY)
    try:
        async def cancel_while_committing() -> None:
            task = asyncio.ensure_future(client.run_async(t.square, 4))
            await asyncio.get_running_loop().run_in_executor(None, held.wait, R)
            task.cancel()  # the server holds the slot; the record is on its way: withdraw
            with pytest.raises(asyncio.CancelledError):
                await task

        asyncio.run(cancel_while_committing())
        assert withdrawn.wait(R) and held.is_set()
        late[0].join(R)
        monkeypatch.setattr(journal, "submit", submit)
        assert journal.flush(R)  # the withdrawn record's commit and its callback have run
        assert client.run(t.square, 5).result(R) == 25
        s = server.orchestrator.stats()
        assert (s.submitted, s.succeeded, s.cancelled, s.queued) == (1, 1, 0, 0)
    finally:
        withdrawn.set()
        client.close()


def test_drop_mode_returns_none_across_the_connection(start_server, gates) -> None:
    server = start_server("--workers", "1", "--backlog", "1", "--drop")
    g = gates("busy")
    with server.connect() as client:
        busy = client.run(t.blocker, str(g.started), str(g.release_fifo))
        g.wait_started()
        queued = client.run(t.square, 2)
        assert client.run(t.square, 3) is None
        assert client.stats().dropped == 1
        g.release()
        assert busy.result(R) == "go" and queued.result(R) == 4
    server.wait_logged("dropped task from connection")


# -- bad clients ---------------------------------------------------------------------------------


def test_a_wrong_key_is_refused_and_the_server_serves_others(start_server) -> None:
    server = start_server()
    with pytest.raises(AuthenticationError):
        connect(server.address, authkey=b"not the key")
    server.wait_logged("failed to authenticate")
    with server.connect() as client:
        assert client.run(t.square, 6).result(R) == 36


def _raw_socket(server: Server) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(server.address)
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(R)
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            return True
        if not data:
            return True


def _authenticated(server: Server) -> tuple[socket.socket, Connection[Any, Any]]:
    sock = _raw_socket(server)
    conn: Connection[Any, Any] = Connection(os.dup(sock.fileno()))
    key = server.authkey_file.read_bytes()
    answer_challenge(conn, key)
    deliver_challenge(conn, key)
    assert pickle.loads(conn.recv_bytes())[0] == S_HELLO
    assert pickle.loads(conn.recv_bytes())[0] == S_CREDIT  # (the backlog has room: credits)
    return sock, conn


def test_garbage_oversized_and_malicious_frames_close_only_their_connection(start_server) -> None:
    server = start_server()
    with server.connect() as bystander:
        # Garbage before authenticating: never reaches pickle.
        sock = _raw_socket(server)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _closed_by_server(sock)
        sock.close()
        server.wait_logged("failed to authenticate")

        # Authenticated, then a frame announcing 1 GiB: refused from its length alone.
        sock, conn = _authenticated(server)
        sock.sendall(struct.pack("!i", 2**30))
        assert _closed_by_server(sock)
        conn.close()
        sock.close()
        server.wait_logged("a frame over the 64 MiB limit")

        # Authenticated, then a pickle that names a global: the server imports nothing.
        sock, conn = _authenticated(server)
        conn.send_bytes(pickle.dumps((C_STATS, os.system)))
        assert _closed_by_server(sock)
        conn.close()
        sock.close()
        server.wait_logged("may not reference posix.system")

        # Authenticated, then bytes that are not a pickle at all.
        sock, conn = _authenticated(server)
        conn.send_bytes(b"\x80\x05garbage")
        assert _closed_by_server(sock)
        conn.close()
        sock.close()

        # A well-formed frame on a raw connection still works; so does the other client.
        sock, conn = _authenticated(server)
        conn.send_bytes(pickle.dumps((C_STATS, 7)))
        tag, req, fields = pickle.loads(conn.recv_bytes())
        assert (tag, req) == (S_STATS, 7) and fields["workers"] == 2
        conn.close()
        sock.close()
        assert bystander.run(t.square, 8).result(R) == 64


def test_a_client_that_leaves_mid_task_does_not_stop_the_task(start_server, gates) -> None:
    server = start_server()
    g = gates("orphan")
    leaving = server.connect()
    orphan = leaving.run(t.blocker, str(g.started), str(g.release_fifo))
    g.wait_started()
    leaving.close(timeout=0)  # disconnects with the task running
    with pytest.raises(OrchestratorClosedError):
        orphan.result(R)
    server.wait_logged("with 1 task(s) accepted and not finished")
    g.release()
    with server.connect() as other:
        wait_until(lambda: other.stats().succeeded == 1, what="the orphaned task to finish")
        assert other.run(t.square, 2).result(R) == 4


# -- stopping ------------------------------------------------------------------------------------


def test_sigterm_stops_accepting_drains_and_exits_143(start_server, gates) -> None:
    server = start_server("--backlog", "1000")
    g = gates("inflight")
    client = server.connect()
    try:
        inflight = client.run(t.blocker, str(g.started), str(g.release_fifo))
        g.wait_started()
        server.proc.send_signal(signal.SIGTERM)
        server.wait_logged("SIGTERM: stopping")

        def intake_closed() -> bool:  # the connection stays open while the server drains
            try:
                client.run(t.square, 1)
            except OrchestratorClosedError:
                return True
            return False

        wait_until(intake_closed, what="the server to close its intake")
        assert not os.path.exists(server.address)  # no new connections
        g.release()
        assert inflight.result(R) == "go"  # the outcome still reaches its client
        assert server.proc.wait(R) == 143
        assert "taskorch serve: stopped (drained" in server.stderr()
        with pytest.raises(ServerUnavailableError):  # gone: the client tries to reconnect
            client.run(t.square, 1)
    finally:
        client.close()


def test_sigint_drains_and_exits_130(start_server, gates) -> None:
    server = start_server()
    server.expected_exit = 130
    g = gates("inflight")
    with server.connect() as client:
        inflight = client.run(t.blocker, str(g.started), str(g.release_fifo))
        g.wait_started()
        server.proc.send_signal(signal.SIGINT)
        server.wait_logged("SIGINT: stopping")
        g.release()
        assert inflight.result(R) == "go"
    assert server.proc.wait(R) == 130
    assert "taskorch serve: stopped (drained: 1 succeeded" in server.stderr()


_GC_ON_THE_CLOCK = r"""
import gc, json, os, signal, sys, threading, weakref
from taskorch import TaskOrchestrator
from taskorch._service.server import serving
from taskorch._service.server.listener import bind_unix

serving.GC_INTERVAL = 0.05
ready, collected, seen = threading.Event(), threading.Event(), {}

class Cycle:
    pass

def check():
    ready.wait()
    seen["enabled_while_serving"] = gc.isenabled()
    cycle = Cycle()
    cycle.me = cycle  # garbage only a cyclic collection frees
    weakref.finalize(cycle, collected.set)
    del cycle
    seen["collected"] = collected.wait(60)  # (a deadlock guard: the clock runs every 0.05 s)
    os.kill(os.getpid(), signal.SIGTERM)

threading.Thread(target=check).start()
serving.serve(TaskOrchestrator(1), bind_unix(sys.argv[1]), b"k" * 32,
              say=lambda line: ready.set() if line.startswith("listening on") else None)
seen["enabled_after"] = gc.isenabled()
print(json.dumps(seen))
"""


def test_the_server_collects_cyclic_garbage_on_a_clock_not_by_allocations(short_dir) -> None:
    # serve() turns the allocation-driven collector off (it walked every queued task again and
    # again) and collects on a clock instead; an idle server allocates nothing, so only the
    # clock can free this cycle.
    out = subprocess.run(
        [sys.executable, "-c", _GC_ON_THE_CLOCK, str(short_dir / "s.sock")],
        capture_output=True, text=True, env=_env(), timeout=R, check=True)
    assert json.loads(out.stdout) == {
        "enabled_while_serving": False, "collected": True, "enabled_after": True}


_COMMIT_HELD_DURING_THE_DRAIN = r"""
import json, os, signal, sys, threading
from pathlib import Path

import _tasks as t
from taskorch import TaskOrchestrator, connect
from taskorch._service.server import journal, serving
from taskorch._service.server.listener import bind_unix
from taskorch._service.server.server import Server

# A slow disk, by a handshake: once the server drains, a COMMIT waits until the server either
# asks its journal for what is pending (Journal.flush: the order that delivers the outcome)
# or has closed its connections (the order that loses it). 60 s only catches a deadlock.
draining, may_commit = threading.Event(), threading.Event()
commit = journal.Transaction.__exit__
def held_commit(self, *exc):
    if draining.is_set():
        may_commit.wait(t.scaled(60))
    return commit(self, *exc)
journal.Transaction.__exit__ = held_commit
flush = journal.Journal.flush
def flush_then_commit(self, timeout):
    may_commit.set()
    return flush(self, timeout)
journal.Journal.flush = flush_then_commit
close_connections = Server.close_connections
def close_then_commit(self):
    close_connections(self)
    may_commit.set()
Server.close_connections = close_then_commit

where = Path(sys.argv[1])
key = where / "key"
key.write_bytes(b"k" * 32)
gate = t.Gate(where, "task")
ready, seen = threading.Event(), {}

def say(line):
    if line.startswith("listening on"):
        ready.set()
    if "stopping; draining" in line:
        draining.set()

def client_side():
    ready.wait()
    with connect(str(where / "s.sock"), authkey_file=str(key), reconnect_for=0) as client:
        future = client.run(t.blocker, str(gate.started), str(gate.release_fifo))
        gate.wait_started()
        os.kill(os.getpid(), signal.SIGTERM)
        draining.wait(t.scaled(60))  # (a deadlock guard)
        gate.release()
        try:
            seen["result"] = future.result(60)
        except Exception as exc:
            seen["result"] = f"{type(exc).__name__}: {exc}"

thread = threading.Thread(target=client_side)
thread.start()
outcome = serving.serve(TaskOrchestrator(1), bind_unix(str(where / "s.sock")), key.read_bytes(),
                        journal=journal.Journal(str(where / "j.sqlite3")), say=say)
thread.join()
seen["drained"] = outcome.drained
print(json.dumps(seen))
"""


def test_an_outcome_committed_during_the_drain_still_reaches_its_client(short_dir) -> None:
    # The server publishes an outcome once the journal has committed it; at the end of the
    # drain it must wait for those commits before it closes the connections.
    out = subprocess.run(
        [sys.executable, "-c", _COMMIT_HELD_DURING_THE_DRAIN, str(short_dir)],
        capture_output=True, text=True, env=_env(), timeout=2 * R)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"result": "go", "drained": True}, out.stderr
