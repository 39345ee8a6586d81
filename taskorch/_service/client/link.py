"""The link under a client's session: the socket, its loss, and reconnecting (client side).

``Link`` is the base of ``session.Session`` (through ``inbox.Inbox``), which sets every
attribute declared here in its constructor and owns the threads (see its docstring for the
whole picture). The methods here
run in the callers' threads (``_send``, ``shut_down``, ``abandon``) and in the session's
reader thread ("taskorch-client-reader-N": ``_go_down``, ``_reconnect``, ``_install``).

Reconnecting: after the link is lost, the reader dials again with backoff (RECONNECT_DELAY
doubling to RECONNECT_DELAY_MAX) for ``reconnect_for`` seconds; each dial is bounded by
``connect_timeout``; ``abandon()`` (close) stops the backoff at once. On success, the new link
is installed under ``_send_lock`` (callers' frames wait), and what the lost link left
unanswered is sent again, in req order (``requests.resend_message``).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Callable

from taskorch._errors import ServerTimeoutError, ServerUnavailableError
from taskorch._service.client.requests import Request, resend_message, set_send_timeout
from taskorch._service.protocol import C_STATS, C_TRIGGER, encode_service_frame

if TYPE_CHECKING:
    Dial = Callable[[float], tuple[socket.socket, Connection[Any, Any], dict[str, Any]]]

log = logging.getLogger("taskorch")

#: Reconnection backoff: first pause, and the longest.
RECONNECT_DELAY = 0.05
RECONNECT_DELAY_MAX = 2.0


class Link:
    # Set by Session.__init__ (see the comments there).
    where: str
    info: dict[str, Any]
    _dial: Dial
    connect_timeout: float
    request_timeout: float
    reconnect_for: float
    _sock: socket.socket | None
    _conn: Connection[Any, Any] | None
    _send_lock: threading.Lock
    _lock: threading.Lock
    _requests: dict[int, Request]
    _credits: int
    _credit_inflight: int
    _credit_change: threading.Condition
    _closing: bool
    closed_reason: str | None
    down_reason: str | None
    _up: threading.Event
    _stop_reconnecting: threading.Event

    def _send(self, frame: bytes) -> None:
        with self._send_lock:
            conn = self._conn
            if conn is None:
                raise self._unavailable()
            try:
                conn.send_bytes(frame)
                return
            except (OSError, ValueError) as exc:  # ValueError: the reader closed the Connection
                error = exc
        self.shut_down()  # never send after a frame cut short: the reader reconnects
        if isinstance(error, BlockingIOError):  # SO_SNDTIMEO: the server does not read
            raise ServerTimeoutError(
                f"taskorch serve at {self.where} did not read a request within "
                f"{self.request_timeout:g} s (stopped, or overloaded?); reconnecting") from error
        raise self._unavailable(str(error)) from error


    def _unavailable(self, why: str | None = None) -> ServerUnavailableError:
        return ServerUnavailableError(
            f"not connected to taskorch serve at {self.where} "
            f"({why or self.down_reason or 'connection lost'}); reconnecting for up to "
            f"{self.reconnect_for:g} s. Nothing was sent: retry later, or use run_async(), "
            "which waits for the connection")


    def abandon(self) -> None:
        """End the session without waiting (close(), or the client was garbage-collected)."""
        self._closing = True
        self._stop_reconnecting.set()
        self.shut_down()


    def shut_down(self) -> None:
        """Wake the reader with EOF (it then reconnects, or ends if closing)."""
        with self._lock:
            if self._sock is None or self._sock.fileno() == -1:
                return
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:  # already disconnected
                pass


    def _go_down(self, why: str) -> None:
        """The link is lost: close it; fail the requests that cannot be sent again."""
        log.warning("taskorch.Client: lost the connection to %s (%s); reconnecting for up to "
                    "%g s", self.where, why, self.reconnect_for)
        self.shut_down()  # a sender blocked in send_bytes() fails now, releasing `_send_lock`
        with self._send_lock, self._lock:  # lock order: _send_lock, then _lock
            self.down_reason = why
            self._credits = self._credit_inflight = 0  # the server frees what it granted
            self._credit_change.notify_all()
            self._up.clear()
            self._close_link_locked()
            stranded = [(req, r) for req, r in self._requests.items()
                        if not r.answered and (r.message is None
                                               or r.message[0] in (C_STATS, C_TRIGGER))]
            for req, _ in stranded:
                del self._requests[req]
        for _, request in stranded:
            request.deliver(self._unavailable())


    def _reconnect(self) -> bool:
        """Dial with backoff until connected (True), closed or out of time (False)."""
        deadline = time.monotonic() + self.reconnect_for
        delay = RECONNECT_DELAY
        while not self._closing:
            remaining = deadline - time.monotonic()
            try:
                sock, conn, info = self._dial(max(0.05, min(self.connect_timeout, remaining)))
            except Exception as exc:  # refused, missing socket, timeout, a refusal, the key
                log.debug("taskorch.Client: reconnecting to %s: %s", self.where, exc)
            else:
                return self._install(sock, conn, info)
            if time.monotonic() + delay > deadline or self._stop_reconnecting.wait(delay):
                return False
            delay = min(delay * 2, RECONNECT_DELAY_MAX)
        return False


    def _install(self, sock: socket.socket, conn: Connection[Any, Any],
                 info: dict[str, Any]) -> bool:
        """Use the new link; send again what the lost one left unanswered, in req order."""
        set_send_timeout(sock, self.request_timeout)
        with self._send_lock:
            with self._lock:
                if self._closing:
                    conn.close()
                    sock.close()
                    return False
                self._sock, self._conn, self.info = sock, conn, info
                pending = sorted(self._requests.items())
            try:
                for req, request in pending:
                    message = resend_message(req, request)
                    if message is not None:
                        conn.send_bytes(encode_service_frame(message))
            except (OSError, ValueError) as exc:  # lost again: the reader sees it next
                log.debug("taskorch.Client: re-sending to %s failed: %s", self.where, exc)
                self.shut_down()
            with self._lock:
                self.down_reason = None
        self._up.set()
        log.warning("taskorch.Client: reconnected to %s (server pid %s); %d request(s) re-sent",
                    self.where, info.get("pid"), len(pending))
        return True


    def _close_link_locked(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._sock is not None:
            self._sock.close()
        self._conn = self._sock = None
