"""``taskorch serve``: a long-running pool that other processes submit to (the server process).

One ``TaskOrchestrator`` serves every client. The server never unpickles a user object: a
call arrives as ``encode_call()`` bytes and goes to a worker unopened (a "raw" item), and its
outcome comes back still pickled (``RawOutcome``) and is forwarded as is. Client frames are
decoded with an unpickler that accepts builtins only (``taskorch._service.protocol``). The
workers import the module functions that clients send by name (cloudpickle's rule), so the
server needs the application's modules on its path, and the same Python minor version as its
clients for what travels by value.

This module holds the listener's side (``Server``); the process's life (``serve()``) is in
``serving``. Each connection is a ``connection.ServedConnection``. Threads of the server
process:

    main                        ``serve()``: starts the threads below, says it is ready, then
                                blocks reading the wake pipe (SIGTERM, SIGINT through
                                ``signal.set_wakeup_fd``, or a thread that died); then shuts
                                down (below)
    "taskorch-serve-accept"     accepts connections and admits or refuses them; cuts those
                                that have not authenticated by their deadline
    "taskorch-serve-conn-N"     per connection: handshake, then reads frames and submits
    "taskorch-serve-send-N"     per authenticated connection: writes its outbox
    "taskorch-serve-async"      an asyncio loop for submits that wait for room
                                (``await o.intake.offer_async``), cancellable by a withdraw
    "taskorch-serve-drain"      runs ``o.stop()`` at shutdown, so that the main thread can
                                take a second signal and shorten the drain
    "taskorch-serve-journal"    the journal's writer: group commits (``journal``, ``registry``)
    "taskorch-dispatcher"       the orchestrator's: resolves TaskFutures; their callbacks only
                                queue an S_DONE frame to the connection's outbox (never block)

Admission: a connection that has not authenticated holds a thread and an fd, and must finish
the handshake within ``handshake_timeout`` seconds in total (not per read: a peer dripping a
byte at a time is cut all the same). At most ``max_unauthenticated`` such connections exist at
once: when one more arrives, the oldest is refused to make room, so that a flood of silent
peers can delay a real client but not lock it out for as long as it lasts. Authenticated
connections have their own cap, ``max_connections``. A refused peer is told why (see
``handshake``) and the server logs it.

Security: the key is the only gate, and whoever holds it can run code as the server's user.
The handshake is multiprocessing's HMAC challenge (HMAC-MD5 on Python 3.11; 3.12 negotiates
SHA-256 and still accepts 3.11 peers); the traffic after it is neither encrypted nor signed,
hence loopback-only TCP unless the operator allows remote clients (``listener.bind_tcp``).
Client frames are decoded by an unpickler that refuses every global; the per-task policy
crosses as plain fields (plus bytes for the worker), so even an authenticated client makes
the server import nothing. What the server does unpickle is its own workers' frames, as
``TaskOrchestrator`` always does.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import selectors
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from taskorch._policy import Features
from taskorch._service.handshake import configure_socket, peer_name
from taskorch._service.protocol import credit_recall_frame
from taskorch._service.server.connection import ServedConnection
from taskorch._service.server.journal import Journal
from taskorch._service.server.listener import Listener
from taskorch._service.server.operator import Operator
from taskorch._service.server.registry import TaskRegistry

if TYPE_CHECKING:
    from taskorch._parent.orchestrator import TaskOrchestrator

log = logging.getLogger("taskorch")

#: A connection must complete the HMAC handshake within this many seconds in total, or it is
#: refused and closed. Long enough for a client on a loaded machine (the handshake is two
#: round trips and two HMACs), short enough that a silent peer's thread and fd come back soon.
HANDSHAKE_TIMEOUT = 10.0
#: Connections that have not authenticated yet, at once; one more refuses the oldest. Bounds
#: what peers without the key can cost (a thread and an fd each); small, because a real
#: client spends about a millisecond in this state.
MAX_UNAUTHENTICATED = 32
#: Authenticated connections open at once (2 threads each); more are refused with a reason.
MAX_CONNECTIONS = 256
#: After accept() fails (out of fds, say), wait this long before accepting again, instead of
#: spinning on a listener that stays readable.
ACCEPT_RETRY_DELAY = 0.1



class Server:
    """The listener, the connections and the asyncio loop (created in the main thread).

    ``start()``, then ``stop_accepting()``, ``close_connections()`` and ``stop_loop()`` (or
    ``close()`` for all three) from the thread that owns it. ``on_thread_death`` is called
    (from the dying thread) when the accept or asyncio thread fails.
    """

    def __init__(
        self, orchestrator: TaskOrchestrator, listener: Listener, authkey: bytes, *,
        registry: TaskRegistry | None = None, handshake_timeout: float = HANDSHAKE_TIMEOUT,
        max_unauthenticated: int = MAX_UNAUTHENTICATED,
        max_connections: int = MAX_CONNECTIONS, on_thread_death: Callable[[], None] = lambda: None,
    ) -> None:
        if not handshake_timeout > 0 or max_unauthenticated < 1 or max_connections < 1:
            raise ValueError(
                "handshake_timeout, max_unauthenticated and max_connections must be > 0"
            )
        self.orchestrator = orchestrator
        # No registry (tests of admission): one with an in-memory journal, owned by the server.
        self._own_journal = registry is None
        self.registry = registry or TaskRegistry(orchestrator, Journal(None))
        self.operator = Operator(self.registry)  # (C_ADMIN's, and the HTTP service's)
        self.authkey = authkey
        self.listener = listener
        self.where = listener.where
        self.handshake_timeout = handshake_timeout
        self.max_unauthenticated = max_unauthenticated
        self.max_connections = max_connections
        self._on_thread_death = on_thread_death
        self.info: dict[str, Any] = {
            "pid": os.getpid(), "taskorch": _version(),
            "python": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "workers": orchestrator.worker_count,
            "max_backlog": orchestrator.max_backlog,
            "drop": Features.ALLOW_SYNC_TASK_DROP in orchestrator.features,
        }
        # Stop pipe of the accept thread: written once by stop_accepting().
        self._stop_r, self._stop_w = os.pipe()
        # Guards `_pending`, `_authenticated` and `_stopping`; taken by the accept thread,
        # readers (promote, forget) and the main thread. Never held across I/O or a join: a
        # connection is refused after the lock is released.
        self._lock = threading.Lock()
        # Not yet authenticated -> handshake deadline (monotonic). Insertion order is
        # admission order, and every deadline is admission + handshake_timeout, so the first
        # entry is both the oldest and the next to expire.
        self._pending: dict[ServedConnection, float] = {}
        self._authenticated: set[ServedConnection] = set()
        self._stopping = False  # set by close_connections(): no new connections
        self._numbers = itertools.count(1)
        self.loop = asyncio.new_event_loop()
        # The asyncio thread: runs `loop` forever; wakeups are the loop's own (room for a
        # waiting submit, call_soon_threadsafe from readers). Exits when stop_loop() stops the
        # loop. Daemon, joined by stop_loop(): it must never keep a drained server alive.
        self._loop_thread = threading.Thread(
            target=self._run_loop, name="taskorch-serve-async", daemon=True
        )
        # The accept thread: blocks in select() on the listener and the stop pipe, with a
        # timeout at the next handshake deadline. Exits when the stop pipe is written.
        # Daemon for the same reason; joined by stop_accepting().
        self._accept_thread = threading.Thread(
            target=self._accept_guarded, name="taskorch-serve-accept", daemon=True
        )
        self._accept_stopped = False

    @property
    def stopping(self) -> bool:
        return self._stopping

    def start(self) -> None:
        if self._own_journal:
            self.registry.journal.start()
        self._loop_thread.start()
        self._accept_thread.start()

    def close(self) -> None:
        """Everything ``serve()`` does at the end, without the drain. Idempotent."""
        self.stop_accepting()
        self.close_connections()
        self.stop_loop()
        if self._own_journal:
            self.registry.journal.close()

    # -- accepting (the accept thread) ----------------------------------------------------

    def _accept_guarded(self) -> None:
        try:
            self._accept_loop()
        except BaseException:
            log.exception("taskorch serve: the accept thread failed; stopping the server")
            self._on_thread_death()

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self.listener.sock, selectors.EVENT_READ)
            selector.register(self._stop_r, selectors.EVENT_READ)
            while True:
                # Wakeups: a connection to accept, the stop pipe, the next handshake deadline.
                events = selector.select(self._until_next_deadline())
                if any(key.fileobj == self._stop_r for key, _ in events):
                    return
                self._expire_handshakes()
                if not events:
                    continue
                try:
                    sock, _ = self.listener.sock.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    continue  # the peer gave up between select() and accept()
                except OSError as exc:  # EMFILE, ENFILE, ENOBUFS...
                    log.error("taskorch serve: accept() failed: %s; retrying in %g s",
                              exc, ACCEPT_RETRY_DELAY)
                    if selector.select(ACCEPT_RETRY_DELAY) and os.read(self._stop_r, 1):
                        return
                    continue
                self._admit(sock)

    def _until_next_deadline(self) -> float | None:
        with self._lock:
            deadline = next(iter(self._pending.values()), None)
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _expire_handshakes(self) -> None:
        now = time.monotonic()
        expired = []
        with self._lock:
            for connection, deadline in self._pending.items():
                if deadline > now:
                    break
                expired.append(connection)
            for connection in expired:
                del self._pending[connection]
        for connection in expired:
            connection.refuse(f"did not authenticate within {self.handshake_timeout:g} s")

    def _admit(self, sock: socket.socket) -> None:
        sock.setblocking(True)  # Connection reads with os.read
        configure_socket(sock)
        try:
            connection = ServedConnection(self, sock, next(self._numbers))
        except OSError as exc:  # out of fds for its dup(): this peer only
            log.error("taskorch serve: cannot serve %s: %s", peer_name(sock), exc)
            sock.close()
            return
        evicted: ServedConnection | None = None
        with self._lock:
            if self._stopping:
                refusal = "the server is stopping"
            elif len(self._authenticated) >= self.max_connections:
                refusal = (f"{len(self._authenticated)} clients are connected, the server's limit; "
                           "close idle clients or retry later")
            else:
                refusal = ""
                if len(self._pending) >= self.max_unauthenticated:
                    evicted = next(iter(self._pending))
                    del self._pending[evicted]
                self._pending[connection] = time.monotonic() + self.handshake_timeout
        if evicted is not None:
            log.warning("taskorch serve: %d connections waiting to authenticate (the limit): "
                        "refusing the oldest, %s", self.max_unauthenticated, evicted.peer)
            evicted.refuse(f"{self.max_unauthenticated} connections were waiting to authenticate "
                           "(the server's limit) and this one was the oldest; retry")
        if refusal:
            log.warning("taskorch serve: refusing %s: %s", connection.peer, refusal)
            connection.discard(refusal)
            return
        connection.start()

    def promote(self, connection: ServedConnection) -> bool:
        """Reader thread, once its peer authenticated: True if it may be served. False if it
        was refused meanwhile (deadline, eviction), or if the authenticated are at their cap
        (then it is refused here)."""
        with self._lock:
            if self._pending.pop(connection, None) is None:
                return False
            full = len(self._authenticated) >= self.max_connections
            if not full:
                self._authenticated.add(connection)
        if full:
            connection.refuse(f"{self.max_connections} clients are connected, the server's limit; "
                              "close idle clients or retry later")
        return not full

    def forget(self, connection: ServedConnection) -> None:
        """Reader thread, at its end."""
        with self._lock:
            self._pending.pop(connection, None)
            self._authenticated.discard(connection)

    def recall_credits(self) -> None:
        """A reader found the backlog full: ask the clients holding credits for them back."""
        for connection in self.connections()[1]:
            if connection.credits.recall():
                connection.send(credit_recall_frame())

    def connections(self) -> tuple[list[ServedConnection], list[ServedConnection]]:
        """(waiting to authenticate, authenticated): a snapshot, for tests and logs."""
        with self._lock:
            return list(self._pending), list(self._authenticated)

    def stop_accepting(self) -> None:
        """Idempotent: wake the accept thread, join it, close the listener (and remove its
        socket file)."""
        if self._accept_stopped:
            return
        self._accept_stopped = True
        os.write(self._stop_w, b"x")
        if self._accept_thread.is_alive():
            self._accept_thread.join()
        self.listener.close()
        os.close(self._stop_r)
        os.close(self._stop_w)

    def close_connections(self) -> None:
        """Flush every outbox (up to FLUSH_TIMEOUT each), then cut the connections and join
        their threads. After the drain and a ``Journal.flush()``, so that every outcome has
        been committed and queued in its connection's outbox (``serving.serve``)."""
        with self._lock:
            self._stopping = True
            connections = list(self._pending) + list(self._authenticated)
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
            self._on_thread_death()

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


# -- the process's life (main thread) ---------------------------------------------------------


def _version() -> str:
    from taskorch import __version__

    return __version__
