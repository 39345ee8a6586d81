"""``taskorch serve``: a long-running pool that other processes submit to (the server process).

One ``TaskOrchestrator`` serves every client. The server never unpickles a user object: a
call arrives as ``encode_call()`` bytes and goes to a worker unopened (a "raw" item), and its
outcome comes back still pickled (``RawOutcome``) and is forwarded as is. Client frames are
decoded with an unpickler that accepts builtins only (see ``taskorch._service.protocol``). The
workers import the module functions that clients send by name (cloudpickle's rule), so the server needs the application's modules on its path, and the same
Python minor version as its clients for what travels by value.

Threads of the server process:

    main                        parses, binds, starts the pool and the threads below, prints
                                the ready line, then blocks reading the wake pipe (SIGTERM,
                                SIGINT through ``signal.set_wakeup_fd``, or a thread that
                                died); then shuts down (below)
    "taskorch-serve-accept"     accepts connections, starts a reader for each
    "taskorch-serve-conn-N"     per connection: the HMAC handshake, then reads frames and
                                submits; ``run()`` semantics (``o._offer``) never block, and
                                ``run_async()`` ones are handed to the asyncio thread
    "taskorch-serve-send-N"     per connection, once authenticated: writes the frames queued
                                in its outbox (answers, outcomes, stats)
    "taskorch-serve-async"      an asyncio loop for submits that wait for room
                                (``await o._offer_async``), cancellable by a withdraw
    "taskorch-serve-drain"      runs ``o.stop()`` at shutdown, so that the main thread can
                                take a second signal and shorten the drain
    "taskorch-dispatcher"       the orchestrator's: resolves TaskFutures; their callbacks only
                                queue an S_DONE frame to the connection's outbox (never block)

A slow or hostile client can only hold its own two threads: it is read by its own thread,
written by its own thread, and its handshake must complete within HANDSHAKE_TIMEOUT.

Security: the key is the only gate, and whoever holds it can run code as the server's user.
The handshake is multiprocessing's HMAC challenge (HMAC-MD5 on Python 3.11; 3.12 negotiates
SHA-256 and still accepts 3.11 peers); the traffic after it is neither encrypted nor signed,
hence loopback-only TCP unless ``--allow-remote``. The key file must belong to this user and
not be accessible to others. Client frames are decoded by an unpickler that refuses every
global; the per-task policy crosses as plain fields (plus bytes for the worker), so even an
authenticated client makes the server import nothing. What the server does unpickle is its
own workers' frames, as ``TaskOrchestrator`` always does.

Shutdown (SIGTERM or SIGINT): stop accepting (close the listener, remove the socket file),
``o.stop(--drain-timeout)`` while connections stay open, so that the outcomes of tasks in
flight reach their clients and new submits get ``OrchestratorClosedError``; then flush and close
every connection, stop the asyncio loop, exit 0 (1 if the drain timed out and tasks were
cancelled or abandoned). A second signal during the drain shortens it to nothing: queued tasks
are cancelled, running ones terminated.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import ipaddress
import itertools
import logging
import os
import queue
import secrets
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable

from taskorch._errors import OrchestratorClosedError, SerializationError, TaskorchError
from taskorch._parent.task import RawOutcome, TaskFuture, WorkItem
from taskorch._policy import Features
from taskorch._service.client import (
    default_authkey_path,
    describe_address,
    parse_tcp_address,
    read_authkey,
    set_receive_timeout,
)
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
    ServiceProtocolError,
    decode_client_frame,
    decode_service_policy,
    encode_service_error,
    encode_service_frame,
    encode_stats,
)

if TYPE_CHECKING:
    from taskorch._parent.orchestrator import TaskOrchestrator
    from taskorch._stats import StopReport

log = logging.getLogger("taskorch")

#: A connection must complete the HMAC handshake within this many seconds (a kernel receive
#: timeout, SO_RCVTIMEO), or it is closed: a client that connects and says nothing holds a
#: thread and an fd for no longer than this.
HANDSHAKE_TIMEOUT = 10.0
#: Connections open at once (authenticated or not), 2 threads each; more are accepted and
#: closed at once, with a warning. Bounds the threads a flood of connections can cost.
MAX_CONNECTIONS = 256
#: The kernel's queue of connections not yet accepted (listen()).
LISTEN_BACKLOG = 128
#: At shutdown, how long a connection's outbox may take to flush to a client that does not
#: read, before the connection is cut.
FLUSH_TIMEOUT = 5.0
#: After accept() fails (out of fds, say), wait this long before accepting again, instead of
#: spinning on a listener that stays readable.
ACCEPT_RETRY_DELAY = 0.1
#: Bytes written to the main thread's wake pipe besides signal numbers.
_WAKE_DRAINED = 0
_WAKE_THREAD_DIED = 255

_STOP = None  # the outbox sentinel: flush what is queued, then exit


# -- the command ----------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    from taskorch.cli.main import add_pool_arguments

    p = subparsers.add_parser(
        "serve", help="a long-running pool that other processes submit to (taskorch.connect)",
        description="Start a pool and serve it on a Unix socket or a loopback TCP port. Clients "
                    "(taskorch.connect(), taskorch status) authenticate with a shared key, read "
                    "from --authkey-file (created with 32 random bytes, mode 0600, if missing). "
                    "Prints 'taskorch serve: listening on ...' on stderr when ready. SIGTERM or "
                    "SIGINT: stop accepting, drain, exit 0 (1 if the drain timed out); a second "
                    "signal cuts the drain short. Task functions defined in modules travel by name: "
                    "the server's workers import them, so run the server where the application's "
                    "modules are importable (PYTHONPATH); lambdas and __main__ functions travel by "
                    "value.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH",
                       help="listen on this Unix socket (its directory is created with mode 0700 if missing)")
    where.add_argument("--tcp", metavar="HOST:PORT",
                       help="listen on TCP; only loopback addresses unless --allow-remote (port 0: any free port)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --tcp address: anyone holding the key can then run code as "
                        "this user, and the traffic is authenticated but not encrypted")
    p.add_argument("--authkey-file", metavar="PATH",
                   help="the shared key (default: PATH.authkey next to the socket; "
                        "~/.config/taskorch/authkey for TCP)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="at shutdown, how long tasks in flight may take before they are cancelled "
                        "or terminated (default: 30)")
    add_pool_arguments(p)
    p.set_defaults(handler=serve_main)


def serve_main(args: argparse.Namespace) -> int:
    """``taskorch serve``: runs in the main thread until SIGTERM / SIGINT."""
    from taskorch.cli.main import EXIT_FAILED, EXIT_OK, UsageError, orchestrator_from_args

    if not args.drain_timeout >= 0 or args.drain_timeout == float("inf"):
        raise UsageError(f"--drain-timeout must be a number >= 0, got {args.drain_timeout}")
    listener, address, inode = _bind(args)
    unix_path = address if isinstance(address, str) else None
    try:
        key_path = Path(args.authkey_file) if args.authkey_file else default_authkey_path(address)
        authkey, created = _load_or_create_authkey(key_path)
        orchestrator: TaskOrchestrator = orchestrator_from_args(args)
    except BaseException:
        listener.close()
        _remove_socket_file(unix_path, inode)
        raise
    if created:
        print(f"taskorch serve: generated a new authkey in {key_path} (mode 0600)", file=sys.stderr, flush=True)

    server = _Server(orchestrator, listener, authkey, describe_address(address))
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    old_wakeup_fd = signal.set_wakeup_fd(wake_w)
    reports: list[StopReport] = []  # the drain thread's result
    old_handlers = {signum: signal.signal(signum, _ignore_signal) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start(wake_w)
        print(f"taskorch serve: listening on {server.where} (authkey file {key_path}, "
              f"pid {os.getpid()}, {orchestrator.worker_count} workers)", file=sys.stderr, flush=True)
        # Sleep until a signal (its number, written by the C-level handler) or a thread's byte.
        while True:
            byte = os.read(wake_r, 1)[0]
            if byte in (signal.SIGTERM, signal.SIGINT) or byte == _WAKE_THREAD_DIED:
                break
        thread_died = byte == _WAKE_THREAD_DIED
        why = "a server thread died (see the log)" if thread_died else signal.Signals(byte).name
        s = orchestrator.stats()
        print(f"taskorch serve: {why}: stopping; draining {s.queued} queued and {s.running} "
              f"running tasks (up to {args.drain_timeout:g} s)", file=sys.stderr, flush=True)
        server.stop_accepting()
        _remove_socket_file(unix_path, inode)
        drain = threading.Thread(
            target=_drain, args=(orchestrator, args.drain_timeout, wake_w, reports),
            name="taskorch-serve-drain", daemon=True)
        # daemon: the main thread joins it below; if stop() itself hung (a bug) the process
        # must still be able to exit.
        drain.start()
        while True:
            byte = os.read(wake_r, 1)[0]
            if byte == _WAKE_DRAINED:
                break
            if byte in (signal.SIGTERM, signal.SIGINT):
                print("taskorch serve: second signal: cancelling queued tasks, terminating running "
                      "ones", file=sys.stderr, flush=True)
                orchestrator.stop(timeout=0)  # shortens the drain's deadline; returns once done
        drain.join()
        server.close_connections()  # every outcome is queued by now: flush, then disconnect
        if not reports:
            return EXIT_FAILED  # stop() raised; the drain thread logged it
        report = reports[0]
        print(f"taskorch serve: stopped ({'drained' if report.drained else 'drain timed out'}: "
              f"{report.succeeded} succeeded, {report.failed} failed, {report.cancelled} cancelled, "
              f"{report.abandoned} abandoned)", file=sys.stderr, flush=True)
        return EXIT_OK if report.drained and not thread_died else EXIT_FAILED
    finally:
        server.stop_accepting()
        server.close_connections()
        server.stop_loop()
        orchestrator.stop(timeout=0)
        _remove_socket_file(unix_path, inode)
        for signum, handler in old_handlers.items():
            signal.signal(signum, handler)
        signal.set_wakeup_fd(old_wakeup_fd)
        os.close(wake_r)
        os.close(wake_w)


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    """The Python-level SIGTERM/SIGINT handler does nothing (so nothing that could take a lock
    the interrupted code holds): the byte the C-level handler writes to the wakeup fd is what
    wakes the main thread."""


def _drain(orchestrator: TaskOrchestrator, timeout: float, wake_w: int, out: list[StopReport]) -> None:
    try:
        out.append(orchestrator.stop(timeout))
    except BaseException:
        log.exception("taskorch serve: stop() failed")
    finally:
        _wake(wake_w, _WAKE_DRAINED)


def _wake(wake_w: int, byte: int) -> None:
    try:
        os.write(wake_w, bytes([byte]))
    except BlockingIOError:  # the pipe is full: the main thread has plenty to wake up for
        pass


# -- binding --------------------------------------------------------------------------------------


def _bind(args: argparse.Namespace) -> tuple[socket.socket, str | tuple[str, int], int | None]:
    """The listening socket (non-blocking), the address it is bound to, and the inode of its
    socket file (None for TCP). UsageError for a refused or malformed address."""
    from taskorch.cli.main import UsageError

    if args.tcp is not None:
        try:
            host, port = parse_tcp_address(args.tcp)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise UsageError(f"cannot resolve {host!r}: {exc}") from exc
        family, _, _, _, sockaddr = infos[0]
        ip = ipaddress.ip_address(sockaddr[0])
        if not ip.is_loopback and not args.allow_remote:
            raise UsageError(
                f"refusing to listen on {args.tcp} ({ip}), which other machines can reach: any "
                "client holding the key could run code as this user, and the traffic is not "
                "encrypted. Use 127.0.0.1 (or a Unix socket), or pass --allow-remote")
        try:
            listener = socket.create_server(sockaddr[:2], family=family, backlog=LISTEN_BACKLOG)
        except OSError as exc:
            raise UsageError(f"cannot listen on {args.tcp}: {exc}") from exc
        bound_host, bound_port = listener.getsockname()[:2]
        listener.setblocking(False)
        return listener, (bound_host, bound_port), None

    path = os.path.abspath(args.socket)
    if len(os.fsencode(path)) >= 108:
        raise UsageError(f"the socket path {path!r} is too long for a Unix socket (107 bytes at most)")
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        try:
            os.makedirs(directory, mode=0o700)
            os.chmod(directory, 0o700)  # makedirs' mode is filtered by the umask
        except FileExistsError:
            pass
        except OSError as exc:
            raise UsageError(f"cannot create the socket's directory {directory!r}: {exc}") from exc
    _remove_stale_socket(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        listener.listen(LISTEN_BACKLOG)
    except OSError as exc:
        listener.close()
        raise UsageError(f"cannot listen on {path!r}: {exc}") from exc
    listener.setblocking(False)
    return listener, path, os.lstat(path).st_ino


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a server that died is removed; a live server's is not touched."""
    from taskorch.cli.main import UsageError

    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise UsageError(f"{path!r} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: left by a server that died
        return
    except OSError:
        return  # let bind() report it
    finally:
        probe.close()
    raise UsageError(f"another server is listening on {path!r}")


def _remove_socket_file(path: str | None, inode: int | None) -> None:
    """Remove our socket file (idempotent), unless another server has replaced it since."""
    if path is None:
        return
    try:
        if os.lstat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass


def _load_or_create_authkey(path: Path) -> tuple[bytes, bool]:
    """The key in ``path``, created (32 random bytes, mode 0600) if missing; (key, created).
    A key readable or writable by others is refused: whoever holds it can run code here."""
    from taskorch.cli.main import UsageError

    created = False
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
            try:
                os.link(tmp, path)  # atomic, and never replaces a key another process just made
                created = True
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    try:
        info = path.stat()
        key = read_authkey(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read the authkey file: {exc}") from exc
    mode = info.st_mode
    if info.st_uid != os.getuid():
        raise UsageError(
            f"the authkey file {str(path)!r} belongs to another user (uid {info.st_uid}), who "
            "could then run code as this user; use a key file of your own")
    if mode & 0o077:
        raise UsageError(
            f"the authkey file {str(path)!r} is accessible to other users (mode "
            f"{stat.S_IMODE(mode):04o}); anyone who can read it can run code as this user. "
            f"Run: chmod 600 {path}")
    return key, created


# -- the server -----------------------------------------------------------------------------------


class _Server:
    """The listener, the live connections and the asyncio loop (created in the main thread)."""

    def __init__(self, orchestrator: TaskOrchestrator, listener: socket.socket, authkey: bytes, where: str) -> None:
        self.orchestrator = orchestrator
        self.authkey = authkey
        self.where = where
        self.info = {
            "pid": os.getpid(), "taskorch": _version(),
            "python": f"{sys.version_info[0]}.{sys.version_info[1]}", "workers": orchestrator.worker_count,
            "max_backlog": orchestrator.max_backlog,
            "drop": Features.ALLOW_SYNC_TASK_DROP in orchestrator.features,
        }
        self._listener = listener
        # Stop pipe of the accept thread: written once by stop_accepting().
        self._stop_r, self._stop_w = os.pipe()
        # Guards `_connections` and `_stopping`; taken by the accept thread, readers (on exit)
        # and the main thread. Never held across I/O or a join.
        self._lock = threading.Lock()
        self._connections: set[_ServedConnection] = set()
        self._stopping = False  # set by close_connections(): no new connections
        self._numbers = itertools.count(1)
        self.loop = asyncio.new_event_loop()
        # The asyncio thread: runs `loop` forever; wakeups are the loop's own (room for a
        # waiting submit, call_soon_threadsafe from readers). Exits when stop_loop() stops the
        # loop. Daemon, joined by stop_loop(): it must never keep a drained server alive.
        self._loop_thread = threading.Thread(target=self._run_loop, name="taskorch-serve-async", daemon=True)
        # The accept thread: blocks in select() on the listener and the stop pipe. Exits when
        # the stop pipe is written. Daemon for the same reason; joined by stop_accepting().
        self._accept_thread = threading.Thread(target=self._accept_guarded, name="taskorch-serve-accept", daemon=True)
        self._wake_w = -1
        self._accept_stopped = False

    def start(self, wake_w: int) -> None:
        self._wake_w = wake_w
        self._loop_thread.start()
        self._accept_thread.start()

    # -- accepting --------------------------------------------------------------------------

    def _accept_guarded(self) -> None:
        try:
            self._accept_loop()
        except BaseException:
            log.exception("taskorch serve: the accept thread failed; stopping the server")
            _wake(self._wake_w, _WAKE_THREAD_DIED)

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._listener, selectors.EVENT_READ)
            selector.register(self._stop_r, selectors.EVENT_READ)
            while True:
                events = selector.select()  # wakeups: a connection to accept, the stop pipe
                if any(key.fileobj == self._stop_r for key, _ in events):
                    return
                try:
                    sock, _ = self._listener.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue  # the peer gave up between select() and accept()
                except OSError as exc:  # EMFILE, ENFILE, ENOBUFS...
                    log.error("taskorch serve: accept() failed: %s; retrying in %g s", exc, ACCEPT_RETRY_DELAY)
                    if selector.select(ACCEPT_RETRY_DELAY) and os.read(self._stop_r, 1):
                        return
                    continue
                self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(True)  # Connection reads with os.read
        connection: _ServedConnection | None = None
        with self._lock:
            full = len(self._connections) >= MAX_CONNECTIONS
            if not full and not self._stopping:
                connection = _ServedConnection(self, sock, next(self._numbers))
                self._connections.add(connection)
        if connection is None:
            if full:
                log.warning("taskorch serve: %d connections open (MAX_CONNECTIONS): refusing %s",
                            MAX_CONNECTIONS, _peer(sock))
            sock.close()
            return
        connection.start()

    def stop_accepting(self) -> None:
        """Idempotent: wake the accept thread, join it, close the listener."""
        if self._accept_stopped:
            return
        self._accept_stopped = True
        os.write(self._stop_w, b"x")
        if self._accept_thread.is_alive():
            self._accept_thread.join()
        self._listener.close()
        os.close(self._stop_r)
        os.close(self._stop_w)

    def forget(self, connection: _ServedConnection) -> None:
        with self._lock:
            self._connections.discard(connection)

    def close_connections(self) -> None:
        """Flush every outbox (up to FLUSH_TIMEOUT each), then cut the connections and join
        their threads. After the drain, so every outcome has been queued."""
        with self._lock:
            self._stopping = True
            connections = list(self._connections)
        for connection in connections:
            connection.finish()
        for connection in connections:
            connection.join()

    # -- the asyncio thread -----------------------------------------------------------------

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        except BaseException:
            log.exception("taskorch serve: the asyncio thread failed; stopping the server")
            _wake(self._wake_w, _WAKE_THREAD_DIED)

    def stop_loop(self) -> None:
        if self.loop.is_closed():
            return
        if self._loop_thread.is_alive():
            def stop() -> None:
                for task in asyncio.all_tasks(self.loop):
                    task.cancel()
                self.loop.call_soon(self.loop.stop)  # after the cancelled tasks ran once

            self.loop.call_soon_threadsafe(stop)
            self._loop_thread.join()
        self.loop.close()


class _ServedConnection:
    """One client connection: its reader thread, its writer thread, and its tasks."""

    def __init__(self, server: _Server, sock: socket.socket, number: int) -> None:
        self.server = server
        self.orchestrator = server.orchestrator
        self.number = number
        self.peer = f"connection {number} ({_peer(sock)})"
        # Two fds for one socket: `conn` frames messages, `sock` is for setsockopt/shutdown.
        # Only the reader closes them, at its end, holding `_send_lock` and `_lock`, so that a
        # shutdown from another thread never acts on a closed (possibly reused) fd number.
        self.sock = sock
        self.conn: Connection[Any, Any] = Connection(os.dup(sock.fileno()))
        # Guards `_inflight`, `closed` and the fds' lifetime. Taken by the reader, the asyncio
        # thread, the dispatcher's done callbacks and the main thread; never held across I/O.
        self._lock = threading.Lock()
        self._inflight: dict[int, TaskFuture] = {}  # accepted, outcome not yet queued, by req
        self.closed = False  # no more frames are queued once set
        # Held by the writer around each send_bytes() and by the reader while closing the fds.
        self._send_lock = threading.Lock()
        # The outbox: frames for the writer. Producers: the asyncio thread (answers to waiting
        # submits) and the done callbacks (S_DONE, in the dispatcher thread); the reader sends
        # its own answers directly. Unbounded, because no producer may ever wait on a client.
        # Accepted hazard: a client that submits and never reads makes the server hold every
        # outcome of its tasks here (each up to SERVICE_MAX_FRAME) until it disconnects.
        # Sentinel _STOP: flush what is queued, then exit.
        self._outbox: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        # run_async() submits waiting for room, by req (asyncio thread only).
        self._waiting: dict[int, asyncio.Task[None]] = {}
        # Reader: blocks in recv_bytes(); wakeups: a frame, EOF or an error (the client left,
        # HANDSHAKE_TIMEOUT, or a shutdown() by the main thread at server stop). Exits on any
        # of those, after closing the connection. Daemon: at server exit the main thread has
        # joined it already, unless it is wedged, which must not keep the process alive.
        self.reader = threading.Thread(target=self._read_guarded, name=f"taskorch-serve-conn-{number}", daemon=True)
        # Writer: blocks in the outbox's get() and in send_bytes() (a client that does not
        # read). Exits at _STOP or when a send fails. Daemon for the same reason. Started
        # once the client has authenticated.
        self.writer = threading.Thread(target=self._write_guarded, name=f"taskorch-serve-send-{number}", daemon=True)

    def start(self) -> None:
        self.reader.start()

    # -- reader thread ----------------------------------------------------------------------

    def _read_guarded(self) -> None:
        why = "the client disconnected"
        level = logging.DEBUG
        try:
            if not self._handshake():
                return
            self.writer.start()
            self.send((S_HELLO, SERVICE_VERSION, self.server.info))
            self._read()
        except (EOFError, BrokenPipeError, ConnectionResetError):
            pass  # the client left
        except ServiceProtocolError as exc:
            why, level = f"protocol error: {exc}", logging.WARNING
        except OSError as exc:
            if str(exc) == "bad message length":
                why = f"a frame over the {SERVICE_MAX_FRAME // 2**20} MiB limit"
            else:
                why = f"{type(exc).__name__}: {exc}"
            level = logging.WARNING
        except BaseException as exc:
            why, level = f"internal error: {type(exc).__name__}: {exc}", logging.ERROR
            log.exception("taskorch serve: %s: reader failed", self.peer)
        finally:
            self._close(why, level)

    def _handshake(self) -> bool:
        try:
            set_receive_timeout(self.sock, HANDSHAKE_TIMEOUT)
            deliver_challenge(self.conn, self.server.authkey)
            answer_challenge(self.conn, self.server.authkey)
            set_receive_timeout(self.sock, None)
        except (EOFError, BrokenPipeError, ConnectionResetError):  # a probe, or a stale-socket check
            log.debug("taskorch serve: %s left before authenticating", self.peer)
            return False
        except BlockingIOError:
            log.warning("taskorch serve: %s did not authenticate within %g s; closed",
                        self.peer, HANDSHAKE_TIMEOUT)
            return False
        except Exception as exc:  # AuthenticationError, a bad length, garbage (AssertionError)
            if not self.server._stopping:
                log.warning("taskorch serve: %s failed to authenticate (%s: %s); closed",
                            self.peer, type(exc).__name__, exc)
            return False
        log.debug("taskorch serve: %s authenticated", self.peer)
        return True

    def _read(self) -> None:
        while True:
            message = decode_client_frame(self.conn.recv_bytes(SERVICE_MAX_FRAME))
            tag = message[0]
            if tag == C_SUBMIT:
                self._submit(*message[1:])
            elif tag == C_STATS:
                self._answer((S_STATS, message[1], encode_stats(self.orchestrator.stats())))
            else:
                assert tag == C_WITHDRAW
                self._on_loop(self._withdraw, message[1])

    def _submit(self, req: int, payload: bytes, wire_policy: Any, wait: bool) -> None:
        o = self.orchestrator
        if wire_policy is None:
            policy, policy_bytes = o.policy, None
        else:
            try:
                policy, policy_bytes = decode_service_policy(wire_policy)
            except ValueError as exc:
                self._answer((S_REJECTED, req, encode_service_error(SerializationError(f"invalid policy: {exc}"))))
                return
        item = o._new_item(payload, policy, policy_bytes, raw=True)
        if wait:
            if not self._on_loop(self._start_waiting, req, item):
                self._answer((S_REJECTED, req, encode_service_error(
                    OrchestratorClosedError("taskorch serve is stopping"))))
            return
        try:
            future = o._offer(item, f"from {self.peer}")
        except TaskorchError as exc:  # QueueFullError, OrchestratorClosedError, ...BrokenError
            self._answer((S_REJECTED, req, encode_service_error(exc)))
            return
        if future is None:
            self._answer((S_DROPPED, req))
        else:
            self._accepted(req, future, self._answer)

    def _answer(self, message: tuple[Any, ...]) -> None:
        """Send an answer from the reader thread itself, without the writer's thread hop (a
        third of run()'s round trip). It blocks only this client's own reader, and only while
        this client does not read its socket. Frames queued in the outbox before it may go
        out after it; nothing relies on that order (see _accepted)."""
        with self._send_lock:
            self.conn.send_bytes(encode_service_frame(message))

    def _accepted(self, req: int, future: TaskFuture, answer: Callable[[tuple[Any, ...]], None]) -> None:
        """Answer ACCEPTED, then watch the outcome. The done callback is added only after the
        answer is sent (reader) or queued (asyncio thread), so S_DONE, which goes through the
        outbox, always follows S_ACCEPTED on the wire, even for a task already done."""
        with self._lock:
            self._inflight[req] = future
        answer((S_ACCEPTED, req, future.task_id))
        future.add_done_callback(functools.partial(self._task_done, req))

    def _task_done(self, req: int, future: Any) -> None:
        """Done callback (the dispatcher thread, usually): queue S_DONE, never block."""
        with self._lock:
            self._inflight.pop(req, None)
        attempts, seconds = future.attempts, future.seconds
        if future.cancelled():
            self.send((S_DONE, req, O_CANCELLED, attempts, seconds, None))
            return
        exc = future.exception()
        if exc is not None:
            self.send((S_DONE, req, O_ERROR, attempts, seconds, encode_service_error(exc)))
            return
        outcome: RawOutcome = future.result()
        self.send((S_DONE, req, O_RESULT if outcome.ok else O_RAISED, attempts, seconds, outcome.data))

    # -- the asyncio thread's part ----------------------------------------------------------

    def _on_loop(self, fn: Any, *args: Any) -> bool:
        try:
            self.server.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is stopping
            return False
        return True

    def _start_waiting(self, req: int, item: WorkItem) -> None:
        if self.closed:
            return  # the client left before this reached the loop
        self._waiting[req] = self.server.loop.create_task(self._offer_when_room(req, item))

    async def _offer_when_room(self, req: int, item: WorkItem) -> None:
        try:
            future = await self.orchestrator._offer_async(item)  # cancelled: nothing enqueued
        except TaskorchError as exc:
            self.send((S_REJECTED, req, encode_service_error(exc)))
            return
        finally:
            self._waiting.pop(req, None)
        self._accepted(req, future, self.send)

    def _withdraw(self, req: int) -> None:
        task = self._waiting.pop(req, None)
        if task is not None:
            task.cancel()
            return
        with self._lock:
            future = self._inflight.get(req)
        if future is not None:
            future.cancel()  # succeeds only while queued in the backlog

    def _cancel_waiting(self) -> None:
        for task in list(self._waiting.values()):
            task.cancel()

    # -- writer thread ----------------------------------------------------------------------

    def send(self, message: tuple[Any, ...]) -> None:
        """Queue a frame for the client (any thread; never blocks). Dropped once closed: the
        outcome of a task whose client left is counted in the stats and discarded."""
        if not self.closed:
            self._outbox.put(message)

    def _write_guarded(self) -> None:
        try:
            while True:
                message = self._outbox.get()  # wakeups: a frame, or _STOP
                if message is _STOP:
                    return
                frame = encode_service_frame(message)
                if len(frame) > SERVICE_MAX_FRAME:
                    frame = self._oversized(message, len(frame))
                with self._send_lock:
                    self.conn.send_bytes(frame)
        except (OSError, ValueError) as exc:  # the client left; ValueError: fds closed
            log.debug("taskorch serve: %s: send failed: %s", self.peer, exc)
            self.shut_down()  # wake the reader, which closes the connection
        except BaseException:
            log.exception("taskorch serve: %s: writer failed", self.peer)
            self.shut_down()

    @staticmethod
    def _oversized(message: tuple[Any, ...], size: int) -> bytes:
        error = SerializationError(
            f"the task's outcome is {size / 2**20:.1f} MiB pickled, over taskorch serve's "
            f"{SERVICE_MAX_FRAME // 2**20} MiB frame limit; return large data in a file and pass "
            "its path")
        if message[0] != S_DONE:
            raise error
        tag, req, _, attempts, seconds, _ = message
        return encode_service_frame((tag, req, O_ERROR, attempts, seconds, encode_service_error(error)))

    # -- closing ----------------------------------------------------------------------------

    def shut_down(self) -> None:
        """Wake both threads: blocked reads see EOF, blocked sends fail. Any thread."""
        with self._lock:
            if self.sock.fileno() == -1:
                return
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def finish(self) -> None:
        """Server stop (main thread): flush the outbox, then cut the connection."""
        if self.writer.is_alive():
            self._outbox.put(_STOP)
            self.writer.join(FLUSH_TIMEOUT)
        self.shut_down()

    def join(self) -> None:
        self.reader.join()

    def _close(self, why: str, level: int) -> None:
        """The reader's exit: stop queueing, stop the writer, close the fds, log."""
        with self._lock:
            self.closed = True
            inflight = len(self._inflight)
        self._on_loop(self._cancel_waiting)  # run_async() submits still waiting: nothing enqueued
        self.shut_down()
        if self.writer.is_alive():
            self._outbox.put(_STOP)
            self.writer.join()
        with self._send_lock, self._lock:  # lock order: _send_lock, then _lock
            self.conn.close()
            self.sock.close()
        self.server.forget(self)
        if self.server._stopping:
            level = logging.DEBUG
        elif inflight:
            level = max(level, logging.WARNING)
            why += (f", with {inflight} task(s) accepted and not finished: they run to the end "
                    "and count in the stats; their outcomes are discarded")
        log.log(level, "taskorch serve: %s closed: %s", self.peer, why)


def _peer(sock: socket.socket) -> str:
    """Who is on the other end, for logs: pid/uid of a local peer (SO_PEERCRED), else host:port."""
    try:
        if sock.family == socket.AF_UNIX:
            pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
            return f"pid {pid}, uid {uid}"
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "peer unknown"


def _version() -> str:
    from taskorch import __version__

    return __version__
