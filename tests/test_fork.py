"""Fork safety: an orchestrator or a ``connect()`` client made in a process and used in a child
forked after it (``os.fork()``, gunicorn ``--preload``) starts afresh there, and the parent's
object, workers and connection are untouched.

The in-process tests fork pytest itself; the child reports through a pipe and leaves with
``os._exit``. The others run a script in a subprocess, whose children exit the normal way
(atexit hooks, finalizers), which is where the old hangs and disturbances were. Deadlines only
catch deadlocks; the exit hook's own wait is raised to 600 s in the scripts, so that a child
that waited for the parent's dispatcher would hang past them instead of passing slowly.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import _tasks as t
import psutil
import pytest
from _tasks import scaled, wait_until
from test_service import Server, short_dir, start_server  # noqa: F401 - fixtures

from taskorch import OrchestratorBrokenError

R = scaled(30)
TESTS_DIR = str(Path(__file__).resolve().parent)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (TESTS_DIR, os.environ.get("PYTHONPATH")) if p))


def _in_forked_child(body: Callable[[], Any]) -> Any:
    """Run ``body`` in a forked child (which never returns into pytest) and return what it
    returned, through a pipe as JSON; the child's traceback fails the test."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.write(w, json.dumps(body()).encode())
            code = 0
        except BaseException:
            os.write(w, traceback.format_exc().encode())
        finally:
            os._exit(code)
    os.close(w)
    try:
        output = _read_all(r)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output.decode()
    return json.loads(output)


def _read_all(fd: int, timeout: float = 60) -> bytes:
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"the child wrote nothing for {timeout} s (deadlock?)")
        chunk = os.read(fd, 65536)
        if not chunk:
            return data
        data += chunk


def test_an_orchestrator_starts_afresh_in_a_forked_child(make_orchestrator, gates) -> None:
    o = make_orchestrator(worker_count=1)
    gate = gates("b")
    blocked = o.run(t.blocker, str(gate.started), str(gate.release_fifo))
    gate.wait_started()
    queued = o.run(t.square, 3)  # the parent's: runs in the parent, once
    parent_workers = o.worker_pids()
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("taskorch")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    def child() -> dict[str, Any]:
        report: dict[str, Any] = {}
        error = queued.exception(timeout=scaled(5))  # at once: it is the parent's
        report["inherited"] = [type(error).__name__, str(error)]
        report["square"] = o.run(t.square, 4).result(R)
        report["workers"] = o.worker_pids()
        report["submitted"] = o.stats().submitted
        report["logged"] = [rec.getMessage() for rec in records]
        report["stop"] = o.stop(timeout=R).drained
        return report

    try:
        report = _in_forked_child(child)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert report["inherited"][0] == OrchestratorBrokenError.__name__
    assert "forked" in report["inherited"][1]
    assert report["square"] == 16 and report["submitted"] == 1 and report["stop"] is True
    assert report["workers"] and not set(report["workers"]) & set(parent_workers)
    assert any("starting its own workers here" in m for m in report["logged"])
    # The parent: untouched. Its queued task runs here, once; its workers are the same.
    assert o.worker_pids() == parent_workers
    gate.release()
    assert blocked.result(R) == "go" and queued.result(R) == 9
    assert o.stats().submitted == 2 and o.stats().succeeded == 2


ORCHESTRATOR_SCRIPT = """if 1:
    import logging, os, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    import _tasks as t
    import taskorch
    import taskorch._parent.orchestrator as orchestrator_module
    orchestrator_module.EXIT_TIMEOUT = 600.0  # a child waiting for the parent's would hang

    o = taskorch.TaskOrchestrator(worker_count=1, policy=taskorch.Policy())
    assert o.run(t.square, 2).result(30) == 4
    workers = o.worker_pids()
    executor = taskorch.Executor(1, policy=taskorch.Policy())
    assert executor.submit(t.square, 3).result(30) == 9

    def child(use):
        pid = os.fork()
        if pid == 0:
            if use:
                assert o.run(t.square, 5).result(30) == 25
                assert o.worker_pids() and not set(o.worker_pids()) & set(workers)
                assert list(executor.map(t.square, range(5))) == [0, 1, 4, 9, 16]
                executor.shutdown()
            sys.exit(0)  # the interpreter's exit: atexit hooks and finalizers run
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status

    child(use=False)
    child(use=True)
    child(use=True)
    assert o.worker_pids() == workers, (o.worker_pids(), workers)
    assert o.run(t.square, 3).result(30) == 9
    s = o.stats()
    assert (s.submitted, s.succeeded, s.worker_restarts, s.crashes) == (2, 2, 0, 0), s
    assert executor.submit(t.square, 4).result(30) == 16
    executor.shutdown()
    print("ok", flush=True)
"""


def test_children_that_exit_leave_the_parents_workers_alone() -> None:
    done = subprocess.run([sys.executable, "-c", ORCHESTRATOR_SCRIPT], capture_output=True,
                          env=_env(), timeout=scaled(120))
    err = done.stderr.decode()
    assert done.returncode == 0 and done.stdout.decode() == "ok\n", err
    assert err.count("starting its own workers here") == 4, err  # 2 children x 2 pools
    assert "Traceback" not in err and "WARNING" not in err, err


CLIENT_SCRIPT = """if 1:
    import logging, os, sys
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    import _tasks as t
    import taskorch

    client = taskorch.connect(sys.argv[1], authkey_file=sys.argv[2])
    assert client.run(t.square, 2).result(30) == 4

    pid = os.fork()
    if pid == 0:
        assert client.run(t.square, 6).result(30) == 36
        assert list(client.map(t.square, range(10))) == [i * i for i in range(10)]
        sys.exit(0)  # the client's finalizer runs here: it must not cut the parent's socket
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    pid = os.fork()
    if pid == 0:
        client.close()  # a child that closes it without using it: nothing to close here
        sys.exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    assert client.run(t.square, 3).result(30) == 9  # the parent's connection still works
    assert list(client.map(t.add, [1, 2], [3, 4], chunksize=1)) == [(4, ""), (6, "")]
    client.close()
    print("ok", flush=True)
"""


def test_a_client_opens_its_own_connection_in_a_forked_child(start_server) -> None:  # noqa: F811
    server: Server = start_server()
    done = subprocess.run(
        [sys.executable, "-c", CLIENT_SCRIPT, str(server.address), str(server.authkey_file)],
        capture_output=True, env=_env(), timeout=scaled(120))
    err = done.stderr.decode()
    assert done.returncode == 0 and done.stdout.decode() == "ok\n", err
    assert err.count("opening its own connection") == 1, err
    assert "Traceback" not in err, err


def test_result_by_id_is_a_forked_childs_first_use_of_a_client(start_server) -> None:  # noqa: F811
    # result() must open the child's own connection like run() does; on the parent's session
    # (forgotten at the fork) it would raise OrchestratorClosedError.
    server: Server = start_server()
    with server.connect() as client:
        done = client.run(t.square, 7)
        assert done is not None and done.result(R) == 49
        def child() -> Any:
            value = client.result(done.task_id, timeout=R)  # its first use here
            client.close()
            return value

        assert _in_forked_child(child) == 49
        assert client.result(done.task_id, timeout=R) == 49  # the parent's connection: intact
        assert client.run(t.square, 3).result(R) == 9


GUNICORN_APP = """
import json
import os

import _tasks as t
import taskorch

# Made at import: gunicorn --preload imports this in the master, then forks the web workers.
orchestrator = taskorch.TaskOrchestrator(worker_count=1, policy=taskorch.Policy())
client = taskorch.connect(os.environ["TEST_SERVER"], authkey_file=os.environ["TEST_AUTHKEY"])


def app(environ, start_response):
    body = json.dumps({
        "pid": os.getpid(),
        "local": orchestrator.run(t.square, 7).result(30),
        "workers": orchestrator.worker_pids(),
        "remote": client.run(t.square, 8).result(30),
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"),
                              ("Content-Length", str(len(body)))])
    return [body]
"""


def _get(sock_path: str) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(R)
        sock.connect(sock_path)
        sock.sendall(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200"), data
    return dict(json.loads(body))


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def test_gunicorn_preload_with_an_orchestrator_and_a_client_made_at_import(
        start_server, short_dir: Path) -> None:  # noqa: F811
    pytest.importorskip("gunicorn")
    server: Server = start_server()
    app_dir = short_dir / "app"
    app_dir.mkdir()
    (app_dir / "fork_app.py").write_text(GUNICORN_APP)
    sock_path = str(short_dir / "http.sock")
    log_path = short_dir / "gunicorn.log"
    env = _env()
    env.update(TEST_SERVER=str(server.address), TEST_AUTHKEY=str(server.authkey_file),
               PYTHONPATH=os.pathsep.join((str(app_dir), env["PYTHONPATH"])))
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--preload", "--workers", "2",
             "--bind", f"unix:{sock_path}", "--graceful-timeout", "60", "--log-level", "info",
             "fork_app:app"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        def serving() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"gunicorn exited:\n{log_path.read_text()}")
            try:
                _get(sock_path)
                return True
            except OSError:
                return False

        wait_until(serving, what="gunicorn to serve")
        answers = [_get(sock_path) for _ in range(6)]
        for answer in answers:
            assert answer["local"] == 49 and answer["remote"] == 64, answer
            for worker in answer["workers"]:  # the web worker's own, not the master's
                assert psutil.Process(worker).ppid() == answer["pid"], answer
        everything = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(scaled(60))  # graceful-timeout 60: a hung web worker fails here
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"gunicorn did not stop:\n{log_path.read_text()}") from None
    text = log_path.read_text()
    assert code == 0, text
    assert "SIGKILL" not in text and "Traceback" not in text, text
    wait_until(lambda: not _alive(everything), timeout=10, what="every process to be gone")


def test_a_stopped_orchestrator_closes_none_of_the_childs_fds_at_the_fork(
        make_orchestrator) -> None:
    o = make_orchestrator(worker_count=1)
    o.start()  # (an orchestrator stopped before it started has no pipes to close)
    o.stop()
    dispatcher = o._dispatcher.pool
    freed = {dispatcher._wake_r, dispatcher._wake_w}  # closed by stop(): free for reuse
    pipes: list[tuple[int, int]] = []
    try:
        while not freed <= {fd for pipe in pipes for fd in pipe} and len(pipes) < 256:
            pipes.append(os.pipe())  # the lowest free numbers first: the wake pipe's again
        assert freed <= {fd for pipe in pipes for fd in pipe}
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for pipe in pipes:
                    for fd in pipe:
                        os.fstat(fd)  # still open: the fork hook closed nothing of ours
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        for pipe in pipes:
            for fd in pipe:
                os.close(fd)
