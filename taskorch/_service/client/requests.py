"""A client's requests to ``taskorch serve``, and how their answers resolve them (client side).

Runs in the application's process: ``Request`` objects are made by the caller's threads and
answered by the session's reader thread ("taskorch-client-reader-N"); ``resolve`` turns an
``S_DONE`` frame into a resolved ``TaskFuture`` without running user code there (the cause of
a ``DependencyFailedError`` is unpickled later, by the first caller that asks: ``decode_cause``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import struct
import threading
from typing import Any, Callable

from taskorch._errors import RemoteTaskError, TaskorchError
from taskorch._parent.task import TaskFuture
from taskorch._service.operations import AdminRequest, admin_request_frame
from taskorch._service.protocol import (
    FINAL_ANSWERS,
    O_CANCELLED,
    O_DEPENDENCY,
    O_ERROR,
    O_RAISED,
    O_RESULT,
    Accepted,
    ClientFrame,
    Dropped,
    Rejected,
    ServerFrame,
    StatsReply,
    StatsRequest,
    Submit,
    TriggerRequest,
    resubmit_frame,
    result_request_frame,
)
from taskorch._service.values import decode_service_error
from taskorch._stats import Progress
from taskorch._wire import decode_exception, encode_call


class Request:
    """One request waiting for its answer (and, once accepted, for its outcome)."""

    __slots__ = ("future", "answered", "taken", "event", "loop", "waiter", "answer", "message",
                 "credit")

    def __init__(
        self, future: TaskFuture | None, loop: asyncio.AbstractEventLoop | None = None,
        waiter: asyncio.Future[Any] | None = None, credit: bool = False,
    ) -> None:
        self.future = future  # None for a stats request
        self.answered = False  # the answer was handed to the caller (reader thread only)
        self.taken = False  # the reader found its answer (set under the session's lock)
        # How the caller waits: a threading.Event (run(), stats()) or an asyncio future; a
        # credit run() does not wait (neither).
        self.event = threading.Event() if waiter is None and not credit else None
        self.loop = loop
        self.waiter = waiter
        self.answer: ServerFrame | BaseException | None = None
        # The frame sent, kept to send it again after a reconnection (None: not resendable).
        self.message: ClientFrame | None = None
        self.credit = credit  # a run() that spent a credit: nobody waits for the answer

    def deliver(self, answer: ServerFrame | BaseException) -> None:
        """Hand the answer to the caller (reader thread, or the session when it gives up)."""
        self.answered = True
        self.answer = answer
        if self.event is not None:
            self.event.set()
        elif self.waiter is not None:
            assert self.loop is not None
            try:
                self.loop.call_soon_threadsafe(_deliver, self.waiter, answer)
            except RuntimeError:  # that loop is closed: its caller is gone
                pass


def payload(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    if not callable(fn):
        raise TypeError(f"the task must be callable, got {type(fn).__qualname__}")
    return encode_call(fn, args, kwargs)


class RemoteTaskFuture(TaskFuture):
    """A client's future: ``cancel()`` and ``progress()`` ask the server (``operate``, one
    round trip each, through ``ask``: ``Session.ask``). Every future of a session shares its
    ``ask`` and the module's canceller: nothing per future but the future (each held future's
    objects are the cyclic collector's work, see ``condition``)."""

    def __init__(self, ask: Ask) -> None:
        super().__init__()
        self._ask = ask
        # O_DEPENDENCY: the cause's (outcome, data), set before the future is done, decoded
        # and attached by the first result()/exception() (under ``_cause_lock``), then None.
        self._cause: tuple[int, Any] | None = None
        self._cause_lock: threading.Lock | None = None

    def operate(self, op: str, args: dict[str, Any]) -> Any:
        """An operator's request to this future's server (``operate``): its answer."""
        return operate(self._ask, op, args)

    def set_dependency_failed(self, data: Any) -> None:
        """Resolve with O_DEPENDENCY's ``DependencyFailedError`` (reader thread: only
        taskorch's error is unpickled now; its cause, maybe user code, when asked)."""
        error, outcome, cause = data
        self._cause_lock = threading.Lock()
        self._cause = (outcome, cause)
        self.set_exception(decode_service_error(error))

    def result(self, timeout: float | None = None) -> Any:
        try:
            try:
                return super().result(timeout)  # (one wait: the cause only on a failure)
            except Exception:  # (never a KeyboardInterrupt that came while waiting)
                if self._cause_lock is None:  # (set before the future is done: see above)
                    raise
            self._attach_cause()
            return super().result(0)
        finally:
            self = None  # type: ignore[assignment]  # (no cycle through the error's frame)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        error = super().exception(timeout)
        if error is not None and self._cause_lock is not None:
            self._attach_cause()
        return error

    def _attach_cause(self) -> None:
        """Done: give a DependencyFailedError its cause (once, whichever thread asks first)."""
        error = super().exception(0)
        if self._cause is None or self._cause_lock is None or error is None:
            return
        with self._cause_lock:
            if self._cause is not None:
                error.__cause__ = decode_cause(*self._cause)
                self._cause = None

    def progress(self) -> Progress | None:
        """The task's latest ``taskorch.progress()`` as the server holds it (None before the
        server accepted it, or if it cannot be asked: then the last one seen)."""
        if self.task_id:
            try:
                fields = self.operate("task", {"id": self.task_id}).get("progress")
            except (TaskorchError, ValueError, LookupError, TimeoutError):
                return self.latest_progress
            self.latest_progress = None if fields is None else Progress(**fields)
        return self.latest_progress


#: ``Session.ask``: send the request ``build(req)`` makes, return the answer's fields.
Ask = Callable[[Callable[[int], Any], str], dict[str, Any]]
#: What makes a request's frame from its number (``Session._start``).
Builder = Callable[[int], ClientFrame]


def operate(ask: Ask, op: str, args: dict[str, Any]) -> Any:
    """An operator's request (``operations``) through ``ask``: its answer."""
    return ask(lambda req: admin_request_frame(req, op, args), f"{op}()")["answer"]


def new_future(ask: Ask, owner: object = None) -> TaskFuture:
    """A client future; its ``cancel()`` and ``progress()`` ask the server through ``ask``
    (pass the same ``ask`` for every future: see ``RemoteTaskFuture``); ``owner``: its session
    (what tells this client's futures in ``options(after=...)``)."""
    future = RemoteTaskFuture(ask)
    future.owner = owner
    future.set_canceller(_cancel_remote)
    return future


#: How long a client future's cancel() waits for the S_DONE of the cancel the server made.
CANCEL_WAIT = 5.0


def _cancel_remote(future: TaskFuture) -> bool:
    """``future.cancel()``: the server cancels the task if it has not started (True: it never
    runs; its cancelled outcome, committed, comes as S_DONE). False before the server
    accepted it (no id yet), from the reader thread, or if the server cannot be asked."""
    if not future.task_id or not isinstance(future, RemoteTaskFuture):
        return False
    try:
        cancelled = bool(future.operate("cancel", {"id": future.task_id}))
    except (TaskorchError, ValueError, LookupError, TimeoutError):
        return False
    if cancelled:
        concurrent.futures.wait([future], CANCEL_WAIT)  # its S_DONE (the same commit)
        if not future.done():
            future.cancel_now()
    return cancelled


def _deliver(waiter: asyncio.Future[Any], answer: Any) -> None:
    if not waiter.done():
        if isinstance(answer, BaseException):
            waiter.set_exception(answer)
        else:
            waiter.set_result(answer)


def resolve(
    future: TaskFuture, outcome: int, attempts: int, seconds: float | None, data: Any,
) -> None:
    """Resolve a client future from S_DONE (reader thread). No user code runs here: the
    result or exception stays pickled until the caller asks (``TaskFuture``), and
    done-callbacks run on the "taskorch-callbacks" thread, so a slow one holds no other
    outcome of this connection."""
    future.attempts = attempts
    future.seconds = seconds
    if outcome == O_RESULT:
        future.set_undecoded("result", data)
    elif outcome == O_RAISED:
        future.set_undecoded("error", data)
    elif outcome == O_ERROR:
        future.set_exception(decode_service_error(data))
    elif outcome == O_CANCELLED:
        if not future.cancelled():  # (a cancel() of this client may have got there first)
            future.cancel_now()
    elif outcome == O_DEPENDENCY and isinstance(future, RemoteTaskFuture):
        future.set_dependency_failed(data)
    elif outcome == O_DEPENDENCY:
        future.set_exception(decode_cause(outcome, data))
    else:
        raise ValueError(f"unknown outcome {outcome!r}")


def decode_cause(outcome: int, data: Any) -> BaseException:
    """A failed task's exception from its S_DONE ``outcome`` and ``data``, as its own future
    would raise it (the caller's thread: this may unpickle the task's exception); an
    O_DEPENDENCY's ``DependencyFailedError`` with its cause, and so on down the chain."""
    if outcome == O_RAISED:
        pickled, type_name, message, tb = data
        try:
            return decode_exception(pickled, type_name, message, tb)
        except KeyboardInterrupt:
            raise
        except BaseException:  # noqa: BLE001 - as TaskFuture: SystemExit from a __setstate__
            return decode_exception(None, type_name, message, tb)
    if outcome == O_ERROR:
        return decode_service_error(data)
    if outcome == O_CANCELLED:
        return concurrent.futures.CancelledError()
    if outcome == O_DEPENDENCY:
        error, cause_outcome, cause = data
        exc = decode_service_error(error)
        exc.__cause__ = decode_cause(cause_outcome, cause)
        return exc
    return RemoteTaskError("taskorch.TaskorchError", f"an unknown outcome {outcome!r}")


def submitted(request: Request, answer: ServerFrame | BaseException) -> TaskFuture | None:
    """A submission's future once its answer came (None: dropped), or what refused it raised."""
    if isinstance(answer, BaseException):
        raise answer
    if isinstance(answer, Accepted):
        return request.future
    if isinstance(answer, Dropped):
        return None
    assert isinstance(answer, Rejected), answer
    raise decode_service_error(answer.error)


def stats_fields(answer: ServerFrame | BaseException) -> dict[str, Any]:
    """The fields of an S_STATS answer (stats, triggers, operators' requests), or what
    refused the request raised."""
    if isinstance(answer, BaseException):
        raise answer
    if isinstance(answer, Rejected):
        raise decode_service_error(answer.error)
    assert isinstance(answer, StatsReply), answer
    return answer.fields


def answered_by(requests: dict[int, Request], frames: tuple[ServerFrame, ...],
                ) -> list[Request | None]:
    """The request of ``requests`` (the session's table, its lock held) each frame answers
    (None: none, or withdrawn); a final answer takes its request out of the table."""
    found = [requests.get(f.req) if type(f) is Accepted
             else requests.pop(f.req, None) if isinstance(f, FINAL_ANSWERS) else None
             for f in frames]
    for request in filter(None, found):
        request.taken = True
    return found


def put_back(requests: dict[int, Request], frames: tuple[ServerFrame, ...],
             found: list[Request | None]) -> None:
    """Undo ``answered_by`` for ``frames`` (not handled after all): their requests go back in
    the table, as if not received, to be sent again after the reconnection."""
    for frame, request in zip(frames, found):
        if request is not None and isinstance(frame, FINAL_ANSWERS):
            requests.setdefault(frame.req, request)


def strand(requests: dict[int, Request]) -> list[Request]:
    """The link is lost: take the requests that cannot be sent again out of ``requests`` (the
    session's table, its lock held): stats, triggers and operators' requests not answered."""
    stranded = [(req, r) for req, r in requests.items()
                if not r.answered and (r.message is None or isinstance(
                    r.message, (StatsRequest, TriggerRequest, AdminRequest)))]
    for req, _ in stranded:
        del requests[req]
    return [request for _, request in stranded]


def resend(req: int, request: Request) -> ClientFrame | None:
    """What to send for ``request`` on a new link (None: nothing)."""
    future = request.future
    if request.answered:
        if future is not None and not future.done():  # re-attach: the outcome from the journal
            return result_request_frame(req, future.task_id, True)
        return None
    message = request.message
    if isinstance(message, Submit):  # found by the server if the first frame got through
        return resubmit_frame(message, request.credit)
    return message  # a result() wait


def set_send_timeout(sock: socket.socket, timeout: float) -> None:
    """A send blocked that long on a server that does not read fails (BlockingIOError)."""
    seconds = int(timeout)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                    struct.pack("ll", seconds, int((timeout - seconds) * 1e6)))
