"""A client session's link to ``taskorch serve``: the socket, its loss, and reconnecting
(client side).

``session.Session`` owns one ``Link`` (see its docstring for the whole picture). The methods
here run in the callers' threads (``send``, ``shut_down``, ``unavailable``) and in the
session's reader thread ("taskorch-client-reader-N": ``lost_locked``, ``reconnect``,
``closed_locked``).

Locks: ``send_lock`` is the link's own; ``lock`` is the session's, which guards the fds'
lifetime and ``down_reason`` here as well as the session's request table (lock order:
``send_lock``, then ``lock``). The fds are replaced or closed only by the reader, holding
both, so that a send or a ``shut_down()`` never acts on a closed (possibly reused) fd number.

Reconnecting: after the link is lost, the reader dials again with backoff (RECONNECT_DELAY
doubling to RECONNECT_DELAY_MAX) for ``reconnect_for`` seconds; each dial is bounded by
``connect_timeout``; ``stop_reconnecting()`` (close) stops the backoff at once. On success,
the new link is installed under ``send_lock`` (callers' frames wait), and what the lost link
left unanswered is sent again, in req order (the session says what: ``requests.resend``).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Callable

from taskorch._errors import ServerTimeoutError, ServerUnavailableError
from taskorch._framing import write_frame
from taskorch._service.client.requests import set_send_timeout
from taskorch._service.codec import encode_service_frame
from taskorch._service.protocol import ClientFrame

if TYPE_CHECKING:
    Dial = Callable[[float], tuple[socket.socket, Connection[Any, Any], dict[str, Any]]]

log = logging.getLogger("taskorch")

#: Reconnection backoff: first pause, and the longest.
RECONNECT_DELAY = 0.05
RECONNECT_DELAY_MAX = 2.0


class Link:
    """The socket to the server, replaced after a loss (see the module docstring)."""

    def __init__(
        self, sock: socket.socket, conn: Connection[Any, Any], where: str, info: dict[str, Any],
        lock: threading.Lock, *, dial: Dial, connect_timeout: float, request_timeout: float,
        reconnect_for: float,
    ) -> None:
        self.where = where
        self.info = info  # what the server said on connecting (replaced on reconnecting)
        self._dial = dial
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.reconnect_for = reconnect_for
        # Two fds for one socket, `_conn` frames messages, `_sock` is for shutdown(). None
        # while down (see the module docstring for who replaces and closes them).
        self._sock: socket.socket | None = sock
        self._conn: Connection[Any, Any] | None = conn
        self._fd = conn.fileno()  # `_conn`'s, for send (valid while `_conn` is set)
        set_send_timeout(sock, request_timeout)
        # Guards the frames on the wire (callers' frames must not interleave). Held for one
        # send_bytes() (bounded by the send timeout), or by the reader while it re-sends.
        self.send_lock = threading.Lock()
        self.lock = lock  # the session's (see the module docstring)
        self.down_reason: str | None = None  # set while the link is lost (reconnecting)
        self.up = threading.Event()  # set while connected, and once the session has ended
        self.up.set()
        self._stop_reconnecting = threading.Event()  # close(): stop the backoff now

    def send(self, frame: bytes) -> None:
        with self.send_lock:
            conn = self._conn
            if conn is None:
                raise self.unavailable()
            try:
                write_frame(self._fd, frame)  # (its fd is open: closed under send_lock only)
                return
            except BaseException as exc:  # OSError; or Ctrl-C, maybe mid-frame: the same cut
                error = exc
        self.shut_down()  # never send after a frame cut short: the reader reconnects
        if not isinstance(error, OSError):
            raise error
        if isinstance(error, BlockingIOError):  # SO_SNDTIMEO: the server does not read
            raise ServerTimeoutError(
                f"taskorch serve at {self.where} did not read a request within "
                f"{self.request_timeout:g} s (stopped, or overloaded?); reconnecting") from error
        raise self.unavailable(str(error)) from error

    def unavailable(self, why: str | None = None) -> ServerUnavailableError:
        return ServerUnavailableError(
            f"not connected to taskorch serve at {self.where} "
            f"({why or self.down_reason or 'connection lost'}); reconnecting for up to "
            f"{self.reconnect_for:g} s. Nothing was sent: retry later, or use run_async(), "
            "which waits for the connection")

    def shut_down(self) -> None:
        """Wake the reader with EOF (it then reconnects, or ends if closing)."""
        with self.lock:
            if self._sock is None or self._sock.fileno() == -1:
                return
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already disconnected
                pass

    def stop_reconnecting(self) -> None:
        """close(): the reader's backoff wait ends now."""
        self._stop_reconnecting.set()

    def fileno(self) -> int:
        """The fd the reader reads (reader thread: it alone replaces or closes the link)."""
        assert self._conn is not None
        return self._conn.fileno()

    def lost_locked(self, why: str) -> None:
        """The link is lost (reader; ``send_lock`` and ``lock`` held): close it."""
        self.down_reason = why
        self.up.clear()
        self.closed_locked()

    def closed_locked(self) -> None:
        """Close the fds (reader, or the fork; ``send_lock`` and ``lock`` held)."""
        if self._conn is not None:
            self._conn.close()
        if self._sock is not None:
            self._sock.close()
        self._conn = self._sock = None

    def reconnect(self, closing: Callable[[], bool],
                  pending: Callable[[], list[ClientFrame | None]]) -> bool:
        """Dial with backoff until connected (True), ``closing()`` or out of time (False).
        Once connected, send ``pending()`` (called under ``lock``: the session's requests to
        send again, in order; None: nothing for that one)."""
        deadline = time.monotonic() + self.reconnect_for
        delay = RECONNECT_DELAY
        while not closing():
            remaining = deadline - time.monotonic()
            try:
                sock, conn, info = self._dial(max(0.05, min(self.connect_timeout, remaining)))
            except Exception as exc:  # refused, missing socket, timeout, a refusal, the key
                log.debug("taskorch.Client: reconnecting to %s: %s", self.where, exc)
            else:
                return self._install(sock, conn, info, closing, pending)
            if time.monotonic() + delay > deadline or self._stop_reconnecting.wait(delay):
                return False
            delay = min(delay * 2, RECONNECT_DELAY_MAX)
        return False

    def _install(self, sock: socket.socket, conn: Connection[Any, Any], info: dict[str, Any],
                 closing: Callable[[], bool],
                 pending: Callable[[], list[ClientFrame | None]]) -> bool:
        """Use the new link; send again what the lost one left unanswered, in req order."""
        set_send_timeout(sock, self.request_timeout)
        with self.send_lock:
            with self.lock:
                if closing():
                    conn.close()
                    sock.close()
                    return False
                self._sock, self._conn, self._fd, self.info = sock, conn, conn.fileno(), info
                frames = pending()
            try:
                for frame in frames:
                    if frame is not None:
                        conn.send_bytes(encode_service_frame(frame))
            except (OSError, ValueError) as exc:  # lost again: the reader sees it next
                log.debug("taskorch.Client: re-sending to %s failed: %s", self.where, exc)
                self.shut_down()
            with self.lock:
                self.down_reason = None
        self.up.set()
        log.warning("taskorch.Client: reconnected to %s (server pid %s); %d request(s) re-sent",
                    self.where, info.get("pid"), len(frames))
        return True

    def forget_in_forked_child(self, lock: threading.Lock) -> None:
        """In a forked child (one thread): new locks (they may have been copied held); close
        this process's copies of the fds, without ``shutdown()``, which would end the
        parent's connection too."""
        self.send_lock = threading.Lock()
        self.lock = lock
        self._stop_reconnecting.set()
        self.closed_locked()
