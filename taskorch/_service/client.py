"""``taskorch.connect()``: submit to a ``taskorch serve`` pool from another process (client side).

Runs in the application's process: ``run()``, ``run_async()`` and ``stats()`` in the caller's
threads (or event loops), plus one reader thread per ``Client`` ("taskorch-client-reader-N").
Also ``taskorch status`` (main thread of the CLI).

    caller's thread                         "taskorch-client-reader-N"           server
    ---------------                         --------------------------           ------
    cloudpickle the call (SerializationError here, nothing sent)
    register request ``req`` (``_lock``)
    C_SUBMIT frame --------------(``_send_lock``)----------------------------------->
    wait for the answer (Event / asyncio future)                 <-- S_ACCEPTED / S_DROPPED / S_REJECTED
                                            answer the caller
                                                                 <-- S_DONE (any time later)
                                            resolve the TaskFuture (user callbacks run here)

``run()`` costs one round trip, so that a full backlog raises ``QueueFullError`` in the caller,
as with a local orchestrator; the outcome arrives later on the same connection. The protocol
is described in ``taskorch._service.protocol``.

Hazards: ``run()`` and ``stats()`` wait for the reader thread, so calling them from a future's
callback (which runs in that thread) would deadlock: they raise RuntimeError there instead.
``run_async()`` writes its frame from the event loop's thread: a call with large arguments
blocks the loop while it streams to the server (a few microseconds for a small call).

What a remote future cannot do: ``cancel()`` returns False (the task belongs to the server
once accepted; the server's own stop may still cancel it, and the future then ends
cancelled), and ``running()`` stays False until it is done. If the connection is lost, every
unresolved future fails with ``OrchestratorBrokenError`` (the task may have run: the outcome
is unknown) and later calls raise ``OrchestratorClosedError``; connect again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import pickle
import socket
import struct
import sys
import threading
import weakref
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Callable, Union

from taskorch._errors import (
    OrchestratorBrokenError,
    OrchestratorClosedError,
    SerializationError,
)
from taskorch._parent.task import TaskFuture
from taskorch._policy import Policy
from taskorch._service.protocol import (
    C_STATS,
    C_SUBMIT,
    C_WITHDRAW,
    O_CANCELLED,
    O_ERROR,
    O_RAISED,
    O_RESULT,
    S_ACCEPTED,
    S_DONE,
    S_DROPPED,
    S_HELLO,
    S_REJECTED,
    S_STATS,
    SERVICE_MAX_FRAME,
    SERVICE_VERSION,
    WirePolicy,
    decode_server_frame,
    decode_service_error,
    decode_stats,
    encode_service_frame,
    encode_service_policy,
    encode_stats,
)
from taskorch._wire import decode_exception, encode_call

if TYPE_CHECKING:
    import argparse

    from taskorch._stats import Stats

log = logging.getLogger("taskorch")

#: ``connect()``'s default limit for connecting, the HMAC handshake and the server's hello.
CONNECT_TIMEOUT = 10.0

#: An address: a Unix socket path, ``(host, port)``, or ``"host:port"``.
Address = Union[str, "os.PathLike[str]", tuple[str, int]]

_client_numbers = itertools.count(1)


# -- addresses and keys (shared with the server) ------------------------------------------------


def parse_tcp_address(text: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``; ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT (e.g. 127.0.0.1:8765), got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port)


def normalize_address(address: Address) -> str | tuple[str, int]:
    """A socket path (str) or ``(host, port)``. A str is ``host:port`` when it has no ``/``
    and ends with ``:digits``; anything else is a path (``./pool.sock`` for a relative one)."""
    if isinstance(address, tuple):
        host, port = address
        if not isinstance(host, str) or isinstance(port, bool) or not isinstance(port, int):
            raise ValueError(f"a TCP address is (host: str, port: int), got {address!r}")
        return host, port
    text = os.fspath(address)
    if not isinstance(text, str) or not text:
        raise ValueError(f"an address is a socket path, (host, port) or 'host:port', got {address!r}")
    if "/" not in text and ":" in text:
        try:
            return parse_tcp_address(text)
        except ValueError:
            pass
    return os.path.abspath(text)


def describe_address(address: str | tuple[str, int]) -> str:
    if isinstance(address, tuple):
        host, port = address
        return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"
    return f"unix:{address}"


def default_authkey_path(address: str | tuple[str, int]) -> Path:
    """Where the key lives when none is named: next to a Unix socket (``PATH.authkey``, in the
    socket's private directory), or one per user for TCP (``~/.config/taskorch/authkey``)."""
    if isinstance(address, str):
        return Path(address + ".authkey")
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config, "taskorch", "authkey")


def read_authkey(path: Path) -> bytes:
    """The key file's bytes, as they are (no stripping: both sides read the same file)."""
    key = path.read_bytes()
    if not key:
        raise ValueError(f"the authkey file {str(path)!r} is empty")
    return key


def set_receive_timeout(sock: socket.socket, seconds: float | None) -> None:
    """SO_RCVTIMEO: a kernel timeout on reads, which ``Connection`` (plain ``os.read`` on the
    fd) honours as BlockingIOError. None: wait forever. Used around the HMAC handshake, whose
    stdlib functions take no timeout."""
    whole = int(seconds or 0)
    micros = int(((seconds or 0) - whole) * 1_000_000)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", whole, micros))


# -- the client ---------------------------------------------------------------------------------


def connect(
    address: Address, authkey: bytes | None = None, authkey_file: str | os.PathLike[str] | None = None,
    *, timeout: float = CONNECT_TIMEOUT,
) -> Client:
    """Connect to a ``taskorch serve`` pool; returns a ``Client``.

    ``address``: the server's Unix socket path, ``(host, port)`` or ``"host:port"``. The key is
    ``authkey``, else the contents of ``authkey_file``, else of the server's default key file
    (``PATH.authkey`` next to a socket; ``~/.config/taskorch/authkey`` for TCP). Raises
    ``OSError`` (``ConnectionRefusedError``, ``FileNotFoundError``, ``TimeoutError``...) when
    no server answers within ``timeout`` seconds, and ``multiprocessing.AuthenticationError``
    when the server refuses the key (or proves it does not know it).
    """
    target = normalize_address(address)
    where = describe_address(target)
    if authkey is not None and authkey_file is not None:
        raise ValueError("pass authkey or authkey_file, not both")
    if authkey is None:
        key_path = Path(authkey_file) if authkey_file is not None else default_authkey_path(target)
        try:
            authkey = read_authkey(key_path)
        except OSError as exc:
            exc.add_note(f"taskorch.connect({where}): cannot read the authkey file {str(key_path)!r}; "
                         "pass authkey_file= (the server prints where its key is)")
            raise
    elif not isinstance(authkey, bytes) or not authkey:
        raise ValueError("authkey must be non-empty bytes")

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
        sock.settimeout(None)  # Connection reads the fd with os.read: it must be blocking
        set_receive_timeout(sock, timeout)
        conn = Connection(os.dup(sock.fileno()))
        try:
            answer_challenge(conn, authkey)
            deliver_challenge(conn, authkey)
            hello = decode_server_frame(conn.recv_bytes(SERVICE_MAX_FRAME))
        except AuthenticationError as exc:
            raise AuthenticationError(
                f"taskorch serve at {where} refused the authkey ({exc}): use the key file the "
                "server printed when it started"
            ) from exc
        except BlockingIOError as exc:  # SO_RCVTIMEO expired
            raise TimeoutError(
                f"taskorch serve at {where} did not complete the handshake within {timeout:g} s"
            ) from exc
        if len(hello) != 3 or hello[0] != S_HELLO or hello[1] != SERVICE_VERSION:
            raise ConnectionError(
                f"{where} does not speak taskorch's service protocol version {SERVICE_VERSION} "
                f"(got {hello[:2]!r}); upgrade the older side"
            )
        set_receive_timeout(sock, None)
        server_python = hello[2].get("python")
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
    return Client(_Session(sock, conn, where, dict(hello[2])))


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

    def __init__(self, session: _Session) -> None:
        self._session = session
        # Not a bound method: the finalizer must not keep self alive. A client dropped without
        # close() disconnects; the server still runs what it accepted.
        weakref.finalize(self, session.shut_down)

    @property
    def address(self) -> str:
        """The server, as ``unix:PATH`` or ``tcp:HOST:PORT``."""
        return self._session.where

    @property
    def server_info(self) -> dict[str, Any]:
        """What the server said about itself on connecting: pid, taskorch version, workers,
        max_backlog, drop."""
        return dict(self._session.info)

    def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture | None:
        """Submit ``fn(*args, **kwargs)`` to the server's backlog; one round trip, no waiting
        for room. Same contract as ``TaskOrchestrator.run``."""
        return self._session.submit(None, fn, args, kwargs)

    async def run_async(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        """Submit, waiting without blocking the loop until the server's backlog has room.

        Cancelling the wait withdraws the request: nothing is enqueued if the server was still
        waiting for room; if it had accepted the task at that moment, the task is cancelled if
        it has not started, and otherwise runs with its outcome discarded.
        """
        return await self._session.submit_async(None, fn, args, kwargs)

    def with_policy(self, policy: Policy) -> RemotePolicyOverride:
        """``client.with_policy(Policy(retries=5)).run(fn, x)``: one task's own policy."""
        if not isinstance(policy, Policy):
            raise ValueError(f"policy must be a taskorch.Policy, got {policy!r}")
        return RemotePolicyOverride(self._session, policy)

    def stats(self) -> Stats:
        """The server's ``stats()`` (every client's tasks), one round trip."""
        return self._session.stats()

    def close(self, timeout: float = 30.0) -> None:
        """Stop submitting, wait up to ``timeout`` s for outstanding futures, disconnect.

        Futures still unresolved then fail with ``OrchestratorClosedError``; their tasks keep
        running on the server (and count in its stats). Idempotent. Called from a future's
        callback (the reader thread), it disconnects without waiting.
        """
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


class RemotePolicyOverride:
    """``run``/``run_async`` of a ``Client`` with another policy (see ``Client.with_policy``)."""

    def __init__(self, session: _Session, policy: Policy) -> None:
        self._session = session
        self._wire_policy = encode_service_policy(policy)  # SerializationError here

    def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture | None:
        return self._session.submit(self._wire_policy, fn, args, kwargs)

    async def run_async(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        return await self._session.submit_async(self._wire_policy, fn, args, kwargs)


class _Request:
    """One request waiting for its answer (and, once accepted, for its outcome)."""

    __slots__ = ("future", "answered", "event", "loop", "waiter", "answer")

    def __init__(
        self, future: TaskFuture | None, loop: asyncio.AbstractEventLoop | None = None,
        waiter: asyncio.Future[Any] | None = None,
    ) -> None:
        self.future = future  # None for a stats request
        self.answered = False  # the answer was handed to the caller (reader thread only)
        # How the caller waits: a threading.Event (run(), stats()) or an asyncio future.
        self.event = threading.Event() if waiter is None else None
        self.loop = loop
        self.waiter = waiter
        self.answer: tuple[Any, ...] | BaseException | None = None


class _Session:
    """The connection and its request table, shared by the callers and the reader thread."""

    def __init__(self, sock: socket.socket, conn: Connection[Any, Any], where: str, info: dict[str, Any]) -> None:
        self.where = where
        self.info = info
        # Two fds for one socket: `conn` frames messages, `_sock` is for shutdown(). Both are
        # closed by the reader thread when it ends, under `_send_lock` and `_lock`, so that a
        # concurrent send or shut_down() never acts on a closed (possibly reused) fd number.
        self._sock = sock
        self._conn = conn
        # Guards the frames on the wire: concurrent callers' frames must not interleave.
        # Held only for one send_bytes(); never taken by the reader thread, never held while
        # waiting for an answer. A send blocks only while the server does not read, and a
        # shut_down() makes it fail.
        self._send_lock = threading.Lock()
        # Guards `_requests`, `_closing`, `closed_reason` and the lifetime of `_sock`/`_conn`.
        # Never held while sending, waiting, or resolving a future (user callbacks).
        self._lock = threading.Lock()
        self._requests: dict[int, _Request] = {}
        self._req_ids = itertools.count(1)
        self._closing = False  # close() was called: no new requests
        self.closed_reason: str | None = None  # set when the connection is gone
        # The reader: the only thread that receives. Blocks in recv_bytes(); its wakeups are a
        # frame, EOF (the server closed, or shut_down() here) and errors. Exits at EOF or on
        # any error, after failing every request left. A daemon: a client never closed must
        # not keep the interpreter from exiting (the server runs what it accepted anyway).
        self.reader = threading.Thread(
            target=self._read_guarded, name=f"taskorch-client-reader-{next(_client_numbers)}", daemon=True)
        self.reader.start()

    # -- callers' side -----------------------------------------------------------------------

    def submit(
        self, wire_policy: WirePolicy | None, fn: Callable[..., Any], args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> TaskFuture | None:
        self._check_not_reader("run()")
        request = _Request(_new_future())
        answer = self._call(request, lambda req: (C_SUBMIT, req, _payload(fn, args, kwargs), wire_policy, False))
        return self._accepted(request, answer)

    async def submit_async(
        self, wire_policy: WirePolicy | None, fn: Callable[..., Any], args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> TaskFuture:
        loop = asyncio.get_running_loop()
        request = _Request(_new_future(), loop, loop.create_future())
        assert request.waiter is not None
        req = self._start(request, lambda req: (C_SUBMIT, req, _payload(fn, args, kwargs), wire_policy, True))
        try:
            answer = await request.waiter
        except asyncio.CancelledError:
            with self._lock:
                self._requests.pop(req, None)
            try:
                self._send(encode_service_frame((C_WITHDRAW, req)))
            except OrchestratorClosedError:
                pass
            raise
        future = self._accepted(request, answer)
        assert future is not None  # the server never drops a waiting request
        return future

    def stats(self) -> Stats:
        self._check_not_reader("stats()")
        answer = self._call(_Request(None), lambda req: (C_STATS, req))
        if isinstance(answer, BaseException):
            raise answer
        return decode_stats(answer[2])

    def _call(self, request: _Request, build: Callable[[int], tuple[Any, ...]]) -> tuple[Any, ...] | BaseException:
        self._start(request, build)
        assert request.event is not None
        request.event.wait()  # set by the reader on the answer, or when the connection ends
        assert request.answer is not None
        return request.answer

    def _start(self, request: _Request, build: Callable[[int], tuple[Any, ...]]) -> int:
        """Register ``request`` and send its frame; raises (nothing sent) on a bad call."""
        with self._lock:
            self._check_open_locked()
            req = next(self._req_ids)
        frame = encode_service_frame(build(req))  # SerializationError from encode_call
        if len(frame) > SERVICE_MAX_FRAME:
            raise SerializationError(
                f"the call is {len(frame) / 2**20:.1f} MiB pickled, over taskorch serve's "
                f"{SERVICE_MAX_FRAME // 2**20} MiB frame limit; nothing was sent. Pass large data "
                "as a file path"
            )
        with self._lock:
            self._check_open_locked()
            self._requests[req] = request  # before sending: the answer may come at once
        try:
            self._send(frame)
        except BaseException:
            with self._lock:
                self._requests.pop(req, None)
            raise
        return req

    def _accepted(self, request: _Request, answer: tuple[Any, ...] | BaseException) -> TaskFuture | None:
        if isinstance(answer, BaseException):
            raise answer
        tag = answer[0]
        if tag == S_ACCEPTED:
            return request.future
        if tag == S_DROPPED:
            return None
        assert tag == S_REJECTED, answer
        raise decode_service_error(answer[2])

    def _send(self, frame: bytes) -> None:
        try:
            with self._send_lock:
                self._conn.send_bytes(frame)
        except (OSError, ValueError) as exc:  # ValueError: the reader closed the Connection
            raise OrchestratorClosedError(
                f"the connection to taskorch serve at {self.where} is closed "
                f"({self.closed_reason or exc}); connect again"
            ) from exc

    def _check_open_locked(self) -> None:
        if self._closing:
            raise OrchestratorClosedError("this taskorch.Client was closed; connect again")
        if self.closed_reason is not None:
            raise OrchestratorClosedError(
                f"the connection to taskorch serve at {self.where} is closed "
                f"({self.closed_reason}); connect again")

    def _check_not_reader(self, what: str) -> None:
        if threading.current_thread() is self.reader:
            raise RuntimeError(
                f"Client.{what} was called from a future's callback, which runs in the client's "
                "reader thread: waiting there for the server's answer would deadlock. Submit "
                "from another thread, or use run_async() in an event loop"
            )

    # -- closing -----------------------------------------------------------------------------

    def close(self, timeout: float) -> None:
        with self._lock:
            already = self._closing
            self._closing = True
            futures = [r.future for r in self._requests.values() if r.future is not None]
        in_reader = threading.current_thread() is self.reader
        if not already and futures and not in_reader:
            concurrent.futures.wait(futures, timeout)
        self.shut_down()
        if not in_reader:
            self.reader.join()

    def shut_down(self) -> None:
        """Wake the reader with EOF (it then fails what is left and closes the fds)."""
        with self._lock:
            if self._sock.fileno() == -1:
                return
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already disconnected
                pass

    # -- reader thread -----------------------------------------------------------------------

    def _read_guarded(self) -> None:
        reason = "closed by the server"
        try:
            self._read()
        except EOFError:
            if self._closing:
                reason = "closed by this client"
        except Exception as exc:
            if self._closing:
                reason = "closed by this client"
            else:
                reason = f"{type(exc).__name__}: {exc}"
                log.warning("taskorch.Client: lost the connection to %s: %s", self.where, reason,
                            exc_info=not isinstance(exc, OSError))
        finally:
            self._end(reason)

    def _read(self) -> None:
        while True:
            message = decode_server_frame(self._conn.recv_bytes(SERVICE_MAX_FRAME))
            tag = message[0]
            if tag == S_DONE:
                _, req, outcome, attempts, seconds, data = message
                with self._lock:
                    request = self._requests.pop(req, None)
                if request is None or request.future is None:
                    continue  # withdrawn
                if not request.answered:  # cannot happen (ACCEPTED comes first); be safe
                    self._answer(request, (S_ACCEPTED, req, 0))
                _resolve(request.future, outcome, attempts, seconds, data)
            elif tag in (S_ACCEPTED, S_DROPPED, S_REJECTED, S_STATS):
                req = message[1]
                with self._lock:
                    request = self._requests.get(req) if tag == S_ACCEPTED else self._requests.pop(req, None)
                if request is None:
                    continue  # withdrawn
                if tag == S_ACCEPTED and request.future is not None:
                    request.future.task_id = message[2]
                self._answer(request, message)
            else:
                raise ValueError(f"unexpected frame from the server (tag {tag!r})")

    def _answer(self, request: _Request, answer: tuple[Any, ...] | BaseException) -> None:
        request.answered = True
        request.answer = answer
        if request.event is not None:
            request.event.set()
        else:
            assert request.loop is not None and request.waiter is not None
            try:
                request.loop.call_soon_threadsafe(_deliver, request.waiter, answer)
            except RuntimeError:  # that loop is closed: its caller is gone
                pass

    def _end(self, reason: str) -> None:
        self.shut_down()  # a sender blocked in send_bytes() fails now, releasing `_send_lock`
        with self._send_lock, self._lock:  # lock order: _send_lock, then _lock
            self.closed_reason = reason
            requests = list(self._requests.values())
            self._requests.clear()
            self._conn.close()
            self._sock.close()
        closing = self._closing
        for request in requests:
            if not request.answered:
                self._answer(request, OrchestratorClosedError(
                    f"the connection to taskorch serve at {self.where} closed ({reason}) before it "
                    "answered; the task was probably not accepted"))
            elif request.future is not None and not request.future.done():
                if closing:
                    error: Exception = OrchestratorClosedError(
                        "the taskorch.Client was closed before this task's outcome arrived; the "
                        "task still runs on the server")
                else:
                    error = OrchestratorBrokenError(
                        f"lost the connection to taskorch serve at {self.where} ({reason}) before "
                        "this task's outcome arrived: it may or may not have run")
                request.future.set_exception(error)


def _payload(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    if not callable(fn):
        raise TypeError(f"the task must be callable, got {type(fn).__qualname__}")
    return encode_call(fn, args, kwargs)


def _new_future() -> TaskFuture:
    future = TaskFuture()
    future._cancel_hook = _cannot_cancel  # a remote task cannot be cancelled from here
    return future


def _cannot_cancel(future: TaskFuture) -> bool:
    return False


def _deliver(waiter: asyncio.Future[Any], answer: Any) -> None:
    if not waiter.done():
        if isinstance(answer, BaseException):
            waiter.set_exception(answer)
        else:
            waiter.set_result(answer)


def _resolve(future: TaskFuture, outcome: int, attempts: int, seconds: float | None, data: Any) -> None:
    """Resolve a client future from S_DONE (reader thread; runs the future's callbacks)."""
    future.attempts = attempts
    future.seconds = seconds
    if outcome == O_RESULT:
        try:
            value = pickle.loads(data)
        except Exception as exc:
            err = SerializationError(
                f"the task's result could not be unpickled in this client: {type(exc).__name__}: "
                f"{exc} (is the module defining it importable here?)")
            err.__cause__ = exc
            future.set_exception(err)
        else:
            future.set_result(value)
    elif outcome == O_RAISED:
        future.set_exception(decode_exception(*data))
    elif outcome == O_ERROR:
        future.set_exception(decode_service_error(data))
    elif outcome == O_CANCELLED:
        future._cancel_now()
    else:
        raise ValueError(f"unknown outcome {outcome!r}")


# -- taskorch status ----------------------------------------------------------------------------


def add_status_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "status", help="print a server's statistics",
        description="Connect to a taskorch serve pool and print its statistics. Exit status: 0, "
                    "or 1 when the server cannot be reached or refuses the key.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH", help="the server's Unix socket")
    where.add_argument("--tcp", metavar="HOST:PORT", help="the server's TCP address")
    p.add_argument("--authkey-file", metavar="PATH",
                   help="the key (default: PATH.authkey next to the socket; ~/.config/taskorch/authkey for TCP)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    p.add_argument("--timeout", type=float, default=CONNECT_TIMEOUT, metavar="SECONDS",
                   help=f"give up connecting after SECONDS (default: {CONNECT_TIMEOUT:g})")
    p.set_defaults(handler=status_main)


def status_main(args: argparse.Namespace) -> int:
    import json

    from taskorch.cli.main import EXIT_FAILED, EXIT_OK, UsageError

    address: Address
    if args.tcp is not None:
        try:
            address = parse_tcp_address(args.tcp)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    else:
        address = args.socket
    try:
        with connect(address, authkey_file=args.authkey_file, timeout=args.timeout) as client:
            stats = client.stats()
            info = client.server_info
            where = client.address
    except (OSError, AuthenticationError, OrchestratorClosedError) as exc:
        notes = "".join(f"; {note}" for note in getattr(exc, "__notes__", ()))
        print(f"taskorch status: cannot get the statistics of {address}: {type(exc).__name__}: {exc}{notes}",
              file=sys.stderr)
        return EXIT_FAILED
    fields = encode_stats(stats)
    if args.json:
        print(json.dumps(fields))
        return EXIT_OK
    print(f"taskorch serve at {where} (pid {info.get('pid')}, taskorch {info.get('taskorch')}, "
          f"{info.get('workers')} workers, backlog {info.get('max_backlog')}"
          f"{', --drop' if info.get('drop') else ''})")
    width = max(len(name) for name in fields)
    for name, value in fields.items():
        print(f"  {name:<{width}}  {value}")
    return EXIT_OK
