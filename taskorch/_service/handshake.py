"""Opening a service connection: socket options, the HMAC handshake on each side, refusals.

The server side runs in the connection's reader thread ("taskorch-serve-conn-N"); refusals
are also sent from the accept thread. The client side runs in the caller of ``connect()``,
plus a timer thread ("taskorch-connect-deadline") that cuts a handshake at its deadline.

    server (reader thread)                               client (connect())
    deliver_challenge  -- #CHALLENGE# ------------------>  answer_challenge
                       <-- digest ------------------------
                       -- #WELCOME# --------------------->
    answer_challenge   <-- #CHALLENGE# -------------------  deliver_challenge
                       -- digest ------------------------>
                       <-- #WELCOME# ---------------------
    (S_HELLO, ...)     -- a pickled frame --------------->  check the version

A server that will not serve a connection (too many connections waiting to authenticate,
too many clients, stopping, the handshake deadline passed) sends a refusal instead, at any
point of the above: REFUSED followed by a short UTF-8 reason, framed like every message and
under the handshake's 256-byte read limit, then closes. The client turns it into
``ConnectionRefusedError`` carrying the reason, instead of an EOFError.

Both ends of a TCP connection set TCP_NODELAY: a request and its answer are small frames, and
Nagle's algorithm holding one back until the previous one is acknowledged (delayed ACK) made
every round trip cost ~44 ms.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any, Callable, cast

from taskorch._service.codec import decode_hello
from taskorch._service.protocol import SERVICE_MAX_FRAME, SERVICE_VERSION, ServiceProtocolError

#: The first bytes of a refusal frame (never the start of a pickle or an HMAC message).
REFUSED = b"#TASKORCH-REFUSED#"
#: A refusal must fit the client's 256-byte limit on handshake messages.
_MAX_REASON = 256 - len(REFUSED)


def configure_socket(sock: socket.socket) -> None:
    """Options of a service connection, both ends: TCP_NODELAY for TCP (see above)."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def refusal_frame(reason: str) -> bytes:
    body = REFUSED + reason.encode("utf-8", "replace")[:_MAX_REASON]
    return struct.pack("!i", len(body)) + body


#: How long a refusal waits for a handshake message being written to finish (see there).
REFUSAL_LOCK_TIMEOUT = 1.0


def refuse_then_cut(sock: socket.socket, send_lock: threading.Lock, reason: str,
                    cut: Callable[[], None]) -> None:
    """Server side, any thread: tell the peer why it is not served, then ``cut`` the
    connection. Before authentication no writer runs; ``send_lock`` orders this frame with
    the handshake's, which the reader holds only to write tens of bytes into an empty socket
    buffer (at worst it waits for the GIL): hence the short wait, after which it just cuts."""
    if send_lock.acquire(timeout=REFUSAL_LOCK_TIMEOUT):
        try:
            if sock.fileno() != -1:
                try:
                    sock.send(refusal_frame(reason), socket.MSG_DONTWAIT)
                except OSError:
                    pass
            cut()
        finally:
            send_lock.release()
    else:
        cut()


class SerializedSends:
    """A Connection whose sends hold ``lock``, so that a refusal written by another thread
    never lands inside a handshake message. Only what the handshake functions call."""

    def __init__(self, conn: Connection[Any, Any], lock: threading.Lock) -> None:
        self._conn = conn
        self._lock = lock

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        return self._conn.recv_bytes(maxlength)

    def send_bytes(self, buf: bytes) -> None:
        with self._lock:
            self._conn.send_bytes(buf)


def server_handshake(conn: SerializedSends, authkey: bytes) -> None:
    """The server's half (reader thread). AuthenticationError for a wrong key; EOFError or
    OSError when the peer leaves or the connection is cut (refused, deadline)."""
    deliver_challenge(cast("Connection[Any, Any]", conn), authkey)
    answer_challenge(cast("Connection[Any, Any]", conn), authkey)


class _RefusalAware:
    """The client's view of the handshake: a refusal frame becomes ConnectionRefusedError."""

    def __init__(self, conn: Connection[Any, Any], where: str) -> None:
        self._conn = conn
        self._where = where

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        message = self._conn.recv_bytes(maxlength)
        if message.startswith(REFUSED):
            reason = message[len(REFUSED):].decode("utf-8", "replace")
            raise ConnectionRefusedError(
                f"taskorch serve at {self._where} refused the connection: {reason}"
            )
        return message

    def send_bytes(self, buf: bytes) -> None:
        self._conn.send_bytes(buf)


def client_handshake(sock: socket.socket, conn: Connection[Any, Any], authkey: bytes, where: str,
                     deadline: float, timeout: float) -> dict[str, Any]:
    """The client's half, done by ``deadline`` (``time.monotonic()``; ``timeout`` is the
    caller's limit, for the message); returns the server's info.

    Raises AuthenticationError (the key), ConnectionRefusedError (the server said why),
    TimeoutError (the deadline), ConnectionError (anything else that ended it).
    """
    expired = threading.Event()
    done_lock = threading.Lock()  # the timer must not cut a connection the caller now owns
    done = False

    def cut() -> None:
        with done_lock:
            if not done:
                expired.set()
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the reads below with EOF
                except OSError:
                    pass

    # A timer rather than SO_RCVTIMEO: the kernel timeout applies to each read, so a server
    # that drips a byte at a time would hold connect() forever.
    timer = threading.Timer(max(0.0, deadline - time.monotonic()), cut)
    timer.name = "taskorch-connect-deadline"
    timer.daemon = True  # cancelled and joined below; must never keep an interpreter alive
    timer.start()
    peer = _RefusalAware(conn, where)
    try:
        answer_challenge(cast("Connection[Any, Any]", peer), authkey)
        deliver_challenge(cast("Connection[Any, Any]", peer), authkey)
        hello = peer.recv_bytes(SERVICE_MAX_FRAME)
    except AuthenticationError as exc:
        raise AuthenticationError(
            f"taskorch serve at {where} refused the authkey ({exc}): use the key file the "
            "server printed when it started") from exc
    except ConnectionRefusedError:
        raise
    except (EOFError, OSError, AssertionError) as exc:  # AssertionError: not a challenge
        if expired.is_set():
            raise TimeoutError(
                f"taskorch serve at {where} did not complete the handshake within {timeout:g} s; "
                "is it overloaded, or is something else listening there?") from exc
        raise ConnectionError(
            f"taskorch serve at {where} closed the connection during the handshake "
            f"({type(exc).__name__}: {exc}); it may be stopping, or not a taskorch server; "
            "see its log") from exc
    finally:
        with done_lock:
            done = True
        timer.cancel()
        timer.join()
    try:
        return dict(decode_hello(hello).info)
    except ServiceProtocolError as exc:
        raise ConnectionError(
            f"{where} does not speak taskorch's service protocol version {SERVICE_VERSION} "
            f"({exc}); upgrade the older side") from exc


def peer_name(sock: socket.socket) -> str:
    """Who is on the other end, for logs: pid/uid of a local peer (SO_PEERCRED), else host:port."""
    try:
        if sock.family == socket.AF_UNIX:
            pid, uid, _ = struct.unpack(
                "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            )
            return f"pid {pid}, uid {uid}"
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "peer unknown"
