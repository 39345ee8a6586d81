"""A client's reader thread: what ``taskorch serve`` sends, and the end of a session (client
side).

``Inbox`` is a base of ``session.Session`` (``Session(Inbox(Link))``), which sets every
attribute declared in ``link.Link`` in its constructor; see ``session`` for the whole
picture. Everything here runs in the session's reader thread ("taskorch-client-reader-N"):
it reads frames (an S_BATCH is several messages in one frame), answers the callers' requests,
resolves their futures (no user code: see ``requests.resolve``), counts the credits that
arrive, and, when the link is lost, reconnects (``Link``), or ends the session.
"""

from __future__ import annotations

import logging
from typing import Any

from taskorch._errors import (
    OrchestratorBrokenError,
    OrchestratorClosedError,
    ServerTimeoutError,
    ServerUnavailableError,
)
from taskorch._parent.task import TaskFuture
from taskorch._service.client.link import Link
from taskorch._service.client.requests import Request, resolve
from taskorch._service.protocol import (
    C_RETURN,
    S_ACCEPTED,
    S_BATCH,
    S_CREDIT,
    S_DONE,
    S_DROPPED,
    S_RECALL,
    S_REJECTED,
    S_STATS,
    FrameReader,
    decode_server_frame,
    decode_service_error,
    encode_service_frame,
)

log = logging.getLogger("taskorch")

#: Server messages that answer a request for good (its entry leaves the table).
_ANSWERS = frozenset((S_DONE, S_DROPPED, S_REJECTED, S_STATS))


class _Tally:
    """What one batch of messages brought: credits, answers to credit submissions, task ids."""

    __slots__ = ("granted", "answered", "accepted")

    def __init__(self) -> None:
        self.granted = 0
        self.answered = 0
        self.accepted = False


class Inbox(Link):
    def _read_guarded(self) -> None:
        reason = "closed by this client"
        try:
            while True:
                why = self._read_until_lost()
                if self._closing:
                    break
                if self.reconnect_for <= 0:
                    reason = why
                    break
                self._go_down(why)
                if not self._reconnect():
                    if not self._closing:
                        reason = f"{why}; could not reconnect within {self.reconnect_for:g} s"
                    break
        except BaseException as exc:
            reason = f"internal error: {type(exc).__name__}: {exc}"
            log.exception("taskorch.Client: the reader of %s failed", self.where)
        finally:
            self._end(reason)

    def _read_until_lost(self) -> str:
        try:
            self._read()
        except EOFError:
            return "closed by the server"
        except Exception as exc:
            if not self._closing:
                log.warning("taskorch.Client: lost the connection to %s: %s: %s", self.where,
                            type(exc).__name__, exc, exc_info=not isinstance(exc, OSError))
            return f"{type(exc).__name__}: {exc}"
        raise AssertionError("unreachable")

    def _read(self) -> None:
        conn = self._conn
        assert conn is not None
        frames = FrameReader(conn.fileno())  # the reader alone replaces or closes the link
        while True:
            message = decode_server_frame(frames.read())
            self._handle(message[1] if message[0] == S_BATCH else (message,))

    def _handle(self, messages: tuple[tuple[Any, ...], ...]) -> None:
        """Server messages, in order (the reader thread). The requests they answer are looked
        up under one hold of the lock, and the credits they bring granted under one more. If
        one raises (the link is then dropped), the requests of the messages after it go back
        in the table, as if not received: they are sent again after the reconnection."""
        with self._lock:
            requests = self._requests
            found = [requests.get(m[1]) if m[0] == S_ACCEPTED
                     else requests.pop(m[1], None) if m[0] in _ANSWERS else None
                     for m in messages]
        tally = _Tally()
        for i, (message, request) in enumerate(zip(messages, found)):
            try:
                self._handle_one(message, request, tally)
            except BaseException:
                with self._lock:
                    for later, its in zip(messages[i + 1:], found[i + 1:]):
                        if its is not None and later[0] in _ANSWERS:
                            self._requests.setdefault(later[1], its)
                raise
        if tally.granted or tally.answered or tally.accepted:
            self._grant(tally.granted, tally.answered)

    def _handle_one(self, message: tuple[Any, ...], request: Request | None,
                    tally: _Tally) -> None:
        """One message and the request it answers (if any); credits counted in ``tally``."""
        tag = message[0]
        if tag == S_DONE:
            if request is None or request.future is None or request.future.done():
                return  # withdrawn
            _, req, outcome, attempts, seconds, data = message
            if not request.answered:  # a result() wait (or a resent submission)
                request.deliver((S_ACCEPTED, req, 0))
            resolve(request.future, outcome, attempts, seconds, data)
        elif tag in _ANSWERS or tag == S_ACCEPTED:
            if request is None:
                return  # withdrawn
            if request.answered:  # a re-attached task: accepted again, or lost
                if tag == S_REJECTED and request.future is not None:
                    self._lost(request.future, decode_service_error(message[2]))
                return
            if tag == S_ACCEPTED and request.future is not None:
                request.future.task_id = message[2]
                tally.granted += message[3]
                tally.answered += request.credit
                tally.accepted = True  # wake accepted() callers (through _grant)
            elif tag == S_REJECTED and request.credit and request.future is not None:
                tally.answered += 1
                request.future.set_exception(decode_service_error(message[2]))
            request.deliver(message)
        elif tag == S_CREDIT:
            tally.granted += message[1]
        elif tag == S_RECALL:
            self._grant(tally.granted, tally.answered)  # (what came before counts in the return)
            tally.granted = tally.answered = 0
            with self._lock:
                n, self._credits = self._credits, 0
            try:
                self._send(encode_service_frame((C_RETURN, n)))
            except (ServerUnavailableError, ServerTimeoutError):
                pass  # the link is lost: the server frees them itself
        else:
            raise ValueError(f"unexpected frame from the server (tag {tag!r})")

    def _grant(self, n: int, answered: int = 0) -> None:
        """``n`` more credits; ``answered`` credit submissions answered. Wakes whoever waits
        for either (``submit``) or for a task id (``accepted``)."""
        with self._lock:
            self._credits += n
            self._credit_inflight = max(0, self._credit_inflight - answered)
            self._credit_change.notify_all()

    def _credit_or_answers(self) -> bool:  # (_lock held)
        return (self._credits > 0 or self._credit_inflight == 0 or self.down_reason is not None
                or self._closing or self.closed_reason is not None)

    def _lost(self, future: TaskFuture, error: BaseException) -> None:
        if not future.done():  # (S_REJECTED for a re-attached task: TaskNotFoundError)
            future.set_exception(OrchestratorBrokenError(
                f"taskorch serve at {self.where} no longer knows task {future.task_id} "
                f"({error}): it was restarted without its journal? The task may or may not "
                "have run"))

    def _end(self, reason: str) -> None:
        self.shut_down()  # a sender blocked in send_bytes() fails now, releasing `_send_lock`
        with self._send_lock, self._lock:  # lock order: _send_lock, then _lock
            self.closed_reason = reason
            self._credit_change.notify_all()
            requests = list(self._requests.values())
            self._requests.clear()
            self._close_link_locked()
        self._up.set()  # run_async() callers waiting for the link see the end
        closing = self._closing
        for request in requests:
            if not request.answered:
                request.deliver(OrchestratorClosedError(
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
