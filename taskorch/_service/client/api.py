"""``taskorch.connect()``: submit to a ``taskorch serve`` pool from another process (client side).

Runs in the application's process, in the caller's threads (or event loops): ``connect()``
opens the connection (``handshake``), ``Client`` is the submitting API, and a ``Session``
(``session``) owns the connection (its ``link``) and its reader thread (its ``inbox``,
"taskorch-client-reader-N"), where futures are resolved. ``fetch_status()`` is ``taskorch
status`` without the printing.

``run()`` costs one round trip, so that a full backlog raises ``QueueFullError`` in the caller,
as with a local orchestrator; the outcome arrives later on the same connection. The protocol
is described in ``taskorch._service.protocol``.

What a remote future cannot do: ``cancel()`` returns False (the task belongs to the server
once accepted; the server's own stop may still cancel it, and the future then ends
cancelled), and ``running()`` stays False until it is done.

A lost connection is re-established by the session (with backoff, for ``reconnect_for``
seconds); meanwhile ``run()`` raises ``ServerUnavailableError`` at once, submissions that were
sent and not answered are sent again (the server's journal recognizes them by the client's
token and their number: never accepted twice), and futures still pending are re-attached by
task id and resolve from the journal. Only when the session gives up do unresolved futures
fail with ``OrchestratorBrokenError`` (the task may have run) and calls raise
``OrchestratorClosedError``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import sys
import threading
import time
import weakref
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator

from taskorch._errors import OrchestratorClosedError
from taskorch._options import Duration, Moment, Timing
from taskorch._parent.task import TaskFuture
from taskorch._policy import Policy, check_number
from taskorch._service.addressing import (
    Address,
    default_authkey_path,
    describe_address,
    normalize_address,
    read_authkey,
)
from taskorch._service.client.options import RemotePolicyOverride
from taskorch._service.client.requests import operate, payload
from taskorch._service.client.session import Session
from taskorch._service.handshake import client_handshake, configure_socket
from taskorch._service.protocol import trigger_request_frame
from taskorch._stats import TaskInfo

if TYPE_CHECKING:
    from datetime import datetime

    from taskorch._stats import Stats

log = logging.getLogger("taskorch")

#: ``connect()``'s default limit for connecting, the HMAC handshake and the server's hello.
CONNECT_TIMEOUT = 10.0
#: Default limit on any wait for the server's answer, and on any send: long enough for a
#: loaded server and a group commit on a slow disk, short enough that a stopped server does
#: not look like a hung application.
REQUEST_TIMEOUT = 30.0
#: Default time a client keeps trying to reconnect: a server restarted by systemd is back in
#: seconds; a deploy may take a minute or two.
RECONNECT_FOR = 120.0


def connect(
    address: Address,
    authkey: bytes | None = None,
    authkey_file: str | os.PathLike[str] | None = None,
    *,
    timeout: float = CONNECT_TIMEOUT,
    request_timeout: float = REQUEST_TIMEOUT,
    reconnect_for: float = RECONNECT_FOR,
) -> Client:
    """Connect to a ``taskorch serve`` pool; returns a ``Client``.

    ``address``: the server's Unix socket path, ``(host, port)`` or ``"host:port"``. The key is
    ``authkey``, else the contents of ``authkey_file``, else of the server's default key file
    (``PATH.authkey`` next to a socket; ``~/.config/taskorch/authkey`` for TCP). ``timeout``
    bounds the whole of connecting, the handshake and the server's hello (each reconnection
    too). ``request_timeout`` bounds every wait for the server's answer (``run()``,
    ``stats()``) and every send: a stuck server makes them raise ``ServerTimeoutError``.
    ``reconnect_for``: after losing the connection, how long the client tries to reconnect
    (with backoff) before it gives up (0: never). Raises ``OSError``
    when no server answers in time (``ConnectionRefusedError``, ``FileNotFoundError``,
    ``TimeoutError``...), ``ConnectionRefusedError`` with the server's reason when it refuses
    the connection (too many connections, stopping), and ``multiprocessing.AuthenticationError``
    when the server refuses the key (or proves it does not know it).
    """
    target = normalize_address(address)
    where = describe_address(target)
    if authkey is not None and authkey_file is not None:
        raise ValueError("pass authkey or authkey_file, not both")
    if authkey is not None and (not isinstance(authkey, bytes) or not authkey):
        raise ValueError("authkey must be non-empty bytes")
    open_session = functools.partial(_open_session, target, where, authkey, authkey_file,
                                     timeout, request_timeout, reconnect_for)
    return Client(open_session(), open_session)


def _open_session(
    target: str | tuple[str, int], where: str, authkey: bytes | None,
    authkey_file: str | os.PathLike[str] | None, timeout: float, request_timeout: float,
    reconnect_for: float,
) -> Session:
    """A new ``Session`` (``connect()``, and a forked child's first use of a client it
    inherited)."""
    dial = functools.partial(_dial, target, where, authkey, authkey_file)
    sock, conn, info = dial(timeout)
    return Session(sock, conn, where, info, dial=dial, connect_timeout=timeout,
                   request_timeout=request_timeout, reconnect_for=reconnect_for)


def _dial(
    target: str | tuple[str, int], where: str, authkey: bytes | None,
    authkey_file: str | os.PathLike[str] | None, timeout: float,
) -> tuple[socket.socket, Connection[Any, Any], dict[str, Any]]:
    """Connect, authenticate and read the hello within ``timeout`` (a new session, and the
    session's reconnections)."""
    deadline = time.monotonic() + timeout
    if isinstance(target, tuple):
        sock = socket.create_connection(target, timeout=timeout)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(target)
        except BaseException:
            sock.close()
            raise
    conn: Connection[Any, Any] | None = None
    try:
        if authkey is None:  # read once a server is there: else "no server" is the news
            authkey = _read_key(target, where, authkey_file)
        sock.settimeout(None)  # Connection reads the fd with os.read: it must be blocking
        configure_socket(sock)
        conn = Connection(os.dup(sock.fileno()))
        info = client_handshake(sock, conn, authkey, where, deadline, timeout)
        server_python = info.get("python")
        here = f"{sys.version_info[0]}.{sys.version_info[1]}"
        if server_python != here:
            log.warning(
                "taskorch.connect(%s): the server runs Python %s, this process %s: lambdas and "
                "functions of __main__ (pickled by value) may fail to load there", where,
                server_python, here)
    except BaseException:
        if conn is not None:
            conn.close()
        sock.close()
        raise
    return sock, conn, info


def _read_key(
    target: str | tuple[str, int], where: str, authkey_file: str | os.PathLike[str] | None
) -> bytes:
    key_path = Path(authkey_file) if authkey_file is not None else default_authkey_path(target)
    try:
        return read_authkey(key_path)
    except OSError as exc:
        exc.add_note(
            f"taskorch.connect({where}): cannot read the authkey file {str(key_path)!r}; "
            "pass authkey_file= (the server prints where its key is)"
        )
        raise


def fetch_status(address: Address, authkey_file: str | os.PathLike[str] | None = None, *,
                 timeout: float = CONNECT_TIMEOUT) -> tuple[dict[str, Any], dict[str, Any], str]:
    """A server's status fields (``values.encode_status``), what it said about itself, and
    its address as shown: one connection, one round trip. Raises what ``connect()`` and
    ``Client.stats()`` raise."""
    with connect(address, authkey_file=authkey_file, timeout=timeout) as client:
        return client._session.status(), client.server_info, client.address


def trigger_schedule(address: Address, name: str,
                     authkey_file: str | os.PathLike[str] | None = None, *,
                     timeout: float = CONNECT_TIMEOUT) -> bool:
    """Run the schedule ``name`` of a ``taskorch serve`` now: True if its run was submitted,
    False if the server's backlog was full (the run is dropped). ValueError: no such
    schedule. Raises what ``connect()`` raises."""
    with connect(address, authkey_file=authkey_file, timeout=timeout, reconnect_for=0) as client:
        return bool(client._session.ask(
            lambda req: trigger_request_frame(req, name), "trigger()")["submitted"])


class Client:
    """A connection to a ``taskorch serve`` pool, with the submitting API of ``TaskOrchestrator``.

    ``run()`` raises ``QueueFullError`` when the server's backlog is full (or returns None
    when the server runs with ``--drop``), ``SerializationError`` when the call does not
    pickle or is larger than the 64 MiB frame limit (nothing sent), and
    ``OrchestratorClosedError`` once the server stops or the connection is closed. Futures
    are ``TaskFuture``s with ``attempts`` and ``seconds`` as the server saw them; they are
    resolved (and their callbacks run) in this client's reader thread. Thread-safe; one
    client can serve a whole process. Make it with ``taskorch.connect()``; close it with
    ``close()``, ``with`` or ``async with``.
    """

    def __init__(self, session: Session, reopen: Callable[[], Session] | None = None) -> None:
        self._session = session
        self._reopen = reopen  # a new connection to the same server, with the same key
        # Fork (see _after_fork_in_child): the fork generation the session belongs to; a
        # forked child that uses this client opens its own connection (`_here`).
        self._generation = _fork_generation
        self._fork_lock = threading.Lock()
        self._pid = os.getpid()
        # Not a bound method: the finalizer must not keep self alive. A client dropped without
        # close() disconnects; the server still runs what it accepted.
        self._finalizer = weakref.finalize(self, session.abandon)
        _live.add(self)

    def _here(self) -> Session:
        """This process's session: in a forked child, a new connection on first use (the
        parent's socket is the parent's: the child never reads, writes or shuts it down)."""
        if self._generation != _fork_generation:
            with self._fork_lock:
                if self._generation != _fork_generation:
                    if self._reopen is None:
                        raise OrchestratorClosedError(
                            "this taskorch.Client was opened in the process this one was forked "
                            "from, and cannot reconnect; call taskorch.connect() here")
                    parent, self._pid = self._pid, os.getpid()
                    log.info("a taskorch.Client opened in process %d is used in process %d, "
                             "forked from it: opening its own connection to %s", parent,
                             self._pid, self._session.where)
                    session = self._reopen()
                    self._session = session
                    self._finalizer = weakref.finalize(self, session.abandon)
                    self._generation = _fork_generation
        return self._session

    def _left_behind_in_child(self) -> None:
        """In a forked child, at the fork (one thread): let go of the parent's connection
        without touching it; the parent's futures fail here (see ``Session``)."""
        self._fork_lock = threading.Lock()
        self._finalizer.detach()  # abandon() would cut the parent's connection
        self._session.forget_in_forked_child()

    @property
    def address(self) -> str:
        """The server, as ``unix:PATH`` or ``tcp:HOST:PORT``."""
        return self._session.where  # (the same after a fork)

    @property
    def server_info(self) -> dict[str, Any]:
        """What the server said about itself on connecting: pid, taskorch version, workers,
        max_backlog, drop."""
        return dict(self._here().info)

    def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture | None:
        """Submit ``fn(*args, **kwargs)`` to the server's backlog; one round trip, no waiting
        for room. Same contract as ``TaskOrchestrator.run``."""
        return self._here().submit(None, fn, args, kwargs)

    async def run_async(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Submit, waiting without blocking the loop until the server's backlog has room.

        Cancelling the wait withdraws the request: nothing is enqueued if the server was still
        waiting for room; if it had accepted the task at that moment, the task is cancelled if
        it has not started, and otherwise runs with its outcome discarded.
        """
        return await self._here().submit_async(None, fn, args, kwargs)

    def with_policy(self, policy: Policy) -> RemotePolicyOverride:
        """``client.with_policy(Policy(retries=5)).run(fn, x)``: ``options(policy=policy)``."""
        if not isinstance(policy, Policy):
            raise ValueError(f"policy must be a taskorch.Policy, got {policy!r}")
        return RemotePolicyOverride(self._here, policy)

    def options(self, *, priority: int | None = None, delay: Duration | None = None,
                at: Moment | None = None, expires: Duration | datetime | None = None,
                policy: Policy | None = None, key: str | None = None,
                after: Iterable[TaskFuture | int] | None = None) -> RemotePolicyOverride:
        """``TaskOrchestrator.options`` on the server: the times are resolved here, at each
        run(); ``key`` dedups across every client of the server; ``after`` takes futures of
        this client or task ids (an id the server does not know: ValueError from run()).
        The server's journal keeps them all: a restart keeps them (see the README)."""
        return RemotePolicyOverride(self._here, policy, Timing(priority, delay, at, expires),
                                    key, after)

    def with_wait(self, seconds: float | None) -> WaitingClient:
        """``client.with_wait(30).run(fn, x)``: sync back-pressure. ``run()`` of this view
        waits up to ``seconds`` (None: without limit) for room in the server's backlog, and
        rides out a lost connection (a server restart: the request is sent again once
        reconnected), raising ``QueueFullError`` (full) or ``ServerUnavailableError``
        (down) only when ``seconds`` pass; nothing is enqueued then. Like ``run()``, it
        spends the credits the server grants (slots held for this client: no round trip);
        out of them, the server waits for room (one round trip, whose answer brings more
        credits when there is room)."""
        if seconds is not None:
            check_number("seconds", seconds, allow_zero=True)
        return WaitingClient(self, seconds)

    def map(
        self, fn: Callable[..., Any], /, *iterables: Iterable[Any], chunksize: int | None = None,
        return_exceptions: bool = False,
    ) -> Iterator[Any]:
        """``TaskOrchestrator.map`` on the server: results in order, items in chunks (one
        task each), the input read lazily with a few chunks in flight; each chunk waits for
        room in the server's backlog. Closing the iterator early stops submitting (the
        chunks sent run on the server, their outcomes discarded)."""
        from taskorch._parent.map import map_chunks

        session = self._here()
        workers = session.info.get("workers")
        return map_chunks(
            functools.partial(session.submit_payload_waiting, None),
            workers if isinstance(workers, int) and workers > 0 else 2,
            fn, iterables, chunksize, return_exceptions)

    def accepted(self, future: TaskFuture, timeout: float | None = None) -> int:
        """Wait until the server has committed ``future``'s task to its journal; its task id.

        ``run()`` returns before that when it spends a credit (no round trip): the task lives
        in this process until the server's commit, a few ms later (``future.task_id`` is 0 until
        then). Once accepted, it survives the server's crash or restart: answer "202 Accepted"
        after this. ``future`` is one this client's ``run()`` or ``run_async()`` returned.
        Raises what refused the task (``JournalError``: the server could not write it;
        ``OrchestratorClosedError``: stopping), ``TimeoutError`` after ``timeout`` seconds
        (None: no limit; the connection's own ``request_timeout`` does not apply: the server
        may be reconnecting), ``OrchestratorClosedError`` if this client closes first, and
        ``ValueError`` for a future it did not return.
        """
        return self._here().accepted(future, timeout)

    def result(self, task_id: int, timeout: float | None = None) -> Any:
        """Wait up to ``timeout`` seconds (None: no limit) for the outcome of the task with
        id ``task_id`` (``future.task_id``), submitted by any client of this server, before
        or after a reconnect or a server restart: its return value, or its exception raised
        here. Outcomes stay on the server for ``--result-ttl`` seconds after the task ends.

        Raises ``TaskNotFoundError`` for an id the server does not know (or pruned),
        ``TimeoutError`` when the task has not ended in time (it goes on); ``timeout=0``
        asks without waiting (one round trip)."""
        return self._here().result(task_id, timeout)

    def stats(self) -> Stats:
        """The server's ``stats()`` (every client's tasks), one round trip."""
        return self._here().stats()

    # -- operating: the server's task records (issue 25; ``_service.operations``) -----------

    def tasks(self, state: str | Iterable[str] | None = None, name: str | None = None,
              limit: int = 100, before_id: int | None = None) -> list[TaskInfo]:
        """The server's task records, newest first: at most ``limit`` (up to 1000), of ids
        below ``before_id`` (the next page: the last id of this one), of ``state`` (one or
        several of ``TaskInfo``'s states) and ``name``. Finished ones stay for the server's
        ``--result-ttl``."""
        states = (state,) if isinstance(state, str) else tuple(state or ())
        found = operate(self._here().ask, "tasks", {"states": states, "name": name,
                                               "limit": limit, "before_id": before_id})
        return [TaskInfo.from_dict(fields) for fields in found]

    def task(self, task_id: int) -> TaskInfo:
        """Task ``task_id``'s record; ``TaskNotFoundError`` if the server knows none."""
        return TaskInfo.from_dict(operate(self._here().ask, "task", {"id": task_id}))

    def cancel(self, task_id: int, terminate: bool = False) -> bool:
        """Cancel task ``task_id``: True if it was queued or waiting (it never runs, and that
        is committed: it stays cancelled across a restart); False if it had ended, or started
        and ``terminate`` is False (it runs on). With ``terminate``, a running attempt is
        killed (SIGTERM, then SIGKILL: a task stuck in C code too), the task ends cancelled
        and its worker is replaced (on ``serve --dask``: the Dask worker process running it
        is restarted by its nanny, and the other attempts running there run again, not
        charged; without a nanny it cannot be: the task runs on, and this answers False).
        A future of
        the task that this client holds resolves cancelled when its outcome frame arrives,
        which may be just after this returns. ``TaskNotFoundError`` for an unknown id."""
        return bool(operate(self._here().ask, "cancel", {"id": task_id, "terminate": terminate}))

    def retry(self, task_id: int) -> int:
        """Submit a task that ended failed, cancelled, abandoned or expired again, as a new
        task (its record names the old in ``retry_of``): the new id. It keeps the task's
        policy, priority and key, not its times nor its dependencies (it runs without
        waiting for them); while an unfinished task has its key, it joins that task (whose
        id it returns). ValueError for a task in another state; ``TaskNotFoundError`` for an
        unknown id."""
        return int(operate(self._here().ask, "retry", {"id": task_id}))

    def purge(self, name: str | None = None) -> int:
        """Cancel every queued or waiting task (or those named ``name``): how many."""
        return int(operate(self._here().ask, "purge", {"name": name}))

    def close(self, timeout: float = 30.0) -> None:
        """Stop submitting, wait up to ``timeout`` s for outstanding futures, disconnect.

        Futures still unresolved then fail with ``OrchestratorClosedError``; their tasks keep
        running on the server (and count in its stats). Idempotent. Called from a future's
        callback (the reader thread), it disconnects without waiting.
        """
        if self._generation != _fork_generation:  # a forked child that never used it
            self._generation = _fork_generation  # (its session is closed: calls now raise)
            return
        self._session.close(timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)

    def __repr__(self) -> str:
        state = "closed" if self._session.closed_reason is not None else "open"
        return f"<taskorch.Client {state} {self._session.where}>"


class WaitingClient:
    """``run()`` of a ``Client`` that waits for room and for the connection (see
    ``Client.with_wait``)."""

    def __init__(self, client: Client, seconds: float | None) -> None:
        self._client = client
        self._seconds = seconds

    def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Submit ``fn(*args, **kwargs)``, waiting for room up to the view's seconds."""
        return self._client._here().submit_payload_waiting(
            None, payload(fn, args, kwargs), self._seconds, "with_wait().run()")

    def __repr__(self) -> str:
        return f"<WaitingClient {self._client.address} wait={self._seconds}>"


# -- fork --------------------------------------------------------------------------------------
# A forked child has a copy of every client, its socket included, but not its reader thread.
# `_fork_generation` goes up in each child at the fork; a client of an older generation opens
# its own connection on first use (Client._here).

_fork_generation = 0
_live: weakref.WeakSet[Client] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1
    for client in list(_live):
        try:
            client._left_behind_in_child()
        except BaseException:  # noqa: BLE001 - never let a fork hook fail the child's start
            log.exception("taskorch: could not leave a client behind in a forked child")


os.register_at_fork(after_in_child=_after_fork_in_child)
