"""A client session's reader thread: what ``taskorch serve`` sends, losing the link, and the
session's end (client side).

``session.Session`` owns one ``Inbox`` (see its docstring for the whole picture); everything
here runs in its thread, "taskorch-client-reader-N": it reads frames (an S_BATCH is several
messages in one frame), answers the callers' requests, resolves their futures (no user code:
see ``requests.resolve``), counts the credits that arrive, and, when the link is lost, has
the session go down and reconnect (``link``), or end.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Protocol

from taskorch._errors import OrchestratorBrokenError
from taskorch._parent.task import TaskFuture
from taskorch._service.client.credits import Credits
from taskorch._service.client.requests import Request, resolve
from taskorch._service.codec import decode_server_frames
from taskorch._service.protocol import (
    Accepted,
    CreditGrant,
    CreditRecall,
    Done,
    Dropped,
    Rejected,
    ServerFrame,
    StatsReply,
    accepted_frame,
)
from taskorch._service.transport import FrameReader
from taskorch._service.values import decode_service_error

if TYPE_CHECKING:
    from taskorch._service.client.link import Link

log = logging.getLogger("taskorch")

#: The answers to a request besides Accepted and Done.
_OTHER_ANSWERS = (Dropped, Rejected, StatsReply)


class _Tally:
    """What one batch of messages brought: credits, answers to credit submissions, task ids."""

    __slots__ = ("granted", "answered", "accepted")

    def __init__(self) -> None:
        self.granted = 0
        self.answered = 0
        self.accepted = False


class Owner(Protocol):
    """What the reader needs of its session (``session.Session``, which imports this module;
    this one imports nothing of it). All called from the reader thread."""

    @property
    def closing(self) -> bool: ...

    def requests_answered_by(self, frames: tuple[ServerFrame, ...]) -> list[Request | None]:
        """The request each frame answers; a final answer takes it out of the table."""

    def put_back(self, frames: tuple[ServerFrame, ...], requests: list[Request | None]) -> None:
        """Frames not handled after all: their requests go back in the table."""

    credits: Credits  # (the reader grants them)

    def return_credits(self) -> None:
        """S_RECALL: give back every credit held."""

    def go_down(self, why: str) -> None:
        """The link is lost."""

    def reconnect(self) -> bool:
        """Dial again; True once connected."""

    def end(self, reason: str) -> None:
        """The session is over."""


class Inbox:
    """The session's reader thread and what it does with each frame."""

    def __init__(self, session: Owner, link: Link, name: str) -> None:
        self._session = session
        self._link = link
        # The only thread that receives, and the one that reconnects. Blocks in reading the
        # socket (wakeups: a frame, EOF, errors, a shut_down()), then, while down, in dialing
        # (bounded by connect_timeout) and in the backoff wait (woken by close()). Exits when
        # closed, or when reconnecting gave up, after failing every request left. Daemon: a
        # client never closed must not keep the interpreter from exiting. Started by the
        # session.
        self.thread = threading.Thread(target=self._read_guarded, name=name, daemon=True)

    def _read_guarded(self) -> None:
        session = self._session
        reason = "closed by this client"
        try:
            while True:
                why = self._read_until_lost()
                if session.closing:
                    break
                if self._link.reconnect_for <= 0:
                    reason = why
                    break
                session.go_down(why)
                if not session.reconnect():
                    if not session.closing:
                        reason = f"{why}; could not reconnect within {self._link.reconnect_for:g} s"
                    break
        except BaseException as exc:
            reason = f"internal error: {type(exc).__name__}: {exc}"
            log.exception("taskorch.Client: the reader of %s failed", self._link.where)
        finally:
            session.end(reason)

    def _read_until_lost(self) -> str:
        try:
            self._read()
        except EOFError:
            return "closed by the server"
        except Exception as exc:
            if not self._session.closing:
                log.warning("taskorch.Client: lost the connection to %s: %s: %s",
                            self._link.where, type(exc).__name__, exc,
                            exc_info=not isinstance(exc, OSError))
            return f"{type(exc).__name__}: {exc}"
        raise AssertionError("unreachable")

    def _read(self) -> None:
        frames = FrameReader(self._link.fileno())  # the reader alone replaces or closes the link
        while True:
            self._handle(decode_server_frames(frames.read()))

    def _handle(self, frames: tuple[ServerFrame, ...]) -> None:
        """Server messages, in order. The requests they answer are looked up under one hold
        of the lock, and the credits they bring granted under one more. If one raises (the
        link is then dropped), the requests of the messages after it go back in the table, as
        if not received: they are sent again after the reconnection."""
        found = self._session.requests_answered_by(frames)
        tally = _Tally()
        for i, (frame, request) in enumerate(zip(frames, found)):
            try:
                self._handle_one(frame, request, tally)
            except BaseException:
                self._session.put_back(frames[i + 1:], found[i + 1:])
                raise
        if tally.granted or tally.answered or tally.accepted:
            self._session.credits.grant(tally.granted, tally.answered)

    def _handle_one(self, frame: ServerFrame, request: Request | None, tally: _Tally) -> None:
        """One message and the request it answers (if any); credits counted in ``tally``."""
        if type(frame) is Done:
            if request is None or request.future is None or request.future.done():
                return  # withdrawn
            if not request.answered:  # a result() wait (or a resent submission)
                request.deliver(accepted_frame(frame.req, 0, 0))
            resolve(request.future, frame.outcome, frame.attempts, frame.seconds, frame.data)
        elif type(frame) is Accepted or isinstance(frame, _OTHER_ANSWERS):
            if request is None:
                return  # withdrawn
            if request.answered:  # a re-attached task: accepted again, or lost
                if isinstance(frame, Rejected) and request.future is not None:
                    self._lost(request.future, decode_service_error(frame.error))
                return
            if type(frame) is Accepted and request.future is not None:
                request.future.task_id = frame.task_id
                tally.granted += frame.grant
                tally.answered += request.credit
                tally.accepted = True  # wake accepted() callers (through grant)
            elif isinstance(frame, Rejected) and request.credit and request.future is not None:
                tally.answered += 1
                request.future.set_exception(decode_service_error(frame.error))
            request.deliver(frame)
        elif isinstance(frame, CreditGrant):
            tally.granted += frame.n
        elif isinstance(frame, CreditRecall):
            self._session.credits.grant(tally.granted, tally.answered)  # (they count in the return)
            tally.granted = tally.answered = 0
            self._session.return_credits()
        else:
            raise ValueError(f"unexpected frame from the server ({frame!r})")

    def _lost(self, future: TaskFuture, error: BaseException) -> None:
        if not future.done():  # (S_REJECTED for a re-attached task: TaskNotFoundError)
            future.set_exception(OrchestratorBrokenError(
                f"taskorch serve at {self._link.where} no longer knows task {future.task_id} "
                f"({error}): it was restarted without its journal? The task may or may not "
                "have run"))
