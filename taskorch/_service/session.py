"""A client's connection to ``taskorch serve``: its request table and its reader thread.

Runs in the application's process: ``submit()``, ``submit_async()`` and ``stats()`` in the
caller's threads (or event loops), and one reader thread per session
("taskorch-client-reader-N") that receives every frame and resolves the futures.

    caller's thread                         "taskorch-client-reader-N"           server
    ---------------                         --------------------------           ------
    cloudpickle the call (SerializationError here, nothing sent)
    register request ``req`` (``_lock``)
    C_SUBMIT frame --------------(``_send_lock``)----------------------------------->
    wait for the answer (Event / asyncio future)            <-- S_ACCEPTED / DROPPED / REJECTED
                                            answer the caller
                                                                 <-- S_DONE (any time later)
                                            resolve the TaskFuture (no user code: see _resolve)

Hazards: ``submit()`` and ``stats()`` wait for the reader thread, so calling them from the
reader thread would deadlock: they raise RuntimeError there instead (futures' callbacks run
on the "taskorch-callbacks" thread, not here). ``submit_async()`` writes its frame from the
event loop's thread: a call with large arguments blocks the loop while it streams to the
server (a few microseconds for a small call).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import socket
import threading
import time
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any, Callable

from taskorch._errors import (
    OrchestratorBrokenError,
    OrchestratorClosedError,
    SerializationError,
)
from taskorch._parent.task import TaskFuture
from taskorch._service.protocol import (
    C_RESULT,
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
    S_REJECTED,
    S_STATS,
    SERVICE_MAX_FRAME,
    WirePolicy,
    decode_server_frame,
    decode_service_error,
    decode_stats,
    encode_service_frame,
)
from taskorch._wire import encode_call

if TYPE_CHECKING:
    from taskorch._stats import Stats

log = logging.getLogger("taskorch")

_client_numbers = itertools.count(1)


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


class Session:
    """The connection and its request table, shared by the callers and the reader thread."""

    def __init__(
        self, sock: socket.socket, conn: Connection[Any, Any], where: str, info: dict[str, Any],
    ) -> None:
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
        # Names this client's submissions in the server's journal, with their req.
        self.token = os.urandom(16)
        self._closing = False  # close() was called: no new requests
        self.closed_reason: str | None = None  # set when the connection is gone
        # The reader: the only thread that receives. Blocks in recv_bytes(); its wakeups are a
        # frame, EOF (the server closed, or shut_down() here) and errors. Exits at EOF or on
        # any error, after failing every request left. A daemon: a client never closed must
        # not keep the interpreter from exiting (the server runs what it accepted anyway).
        self.reader = threading.Thread(
            target=self._read_guarded, name=f"taskorch-client-reader-{next(_client_numbers)}",
            daemon=True)
        self.reader.start()

    # -- callers' side -----------------------------------------------------------------------

    def submit(
        self, wire_policy: WirePolicy | None, fn: Callable[..., Any], args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> TaskFuture | None:
        self._check_not_reader("run()")
        request = _Request(_new_future())
        answer = self._call(
            request, lambda req: (C_SUBMIT, req, _payload(fn, args, kwargs), wire_policy, False,
                                  self.token, False))
        return self._accepted(request, answer)

    async def submit_async(
        self, wire_policy: WirePolicy | None, fn: Callable[..., Any], args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> TaskFuture:
        loop = asyncio.get_running_loop()
        request = _Request(_new_future(), loop, loop.create_future())
        assert request.waiter is not None
        req = self._start(
            request, lambda req: (C_SUBMIT, req, _payload(fn, args, kwargs), wire_policy, True,
                                  self.token, False))
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

    def result(self, task_id: int, timeout: float | None) -> Any:
        """Wait for task ``task_id``'s outcome (any client's) and return or raise it."""
        self._check_not_reader("result()")
        deadline = None if timeout is None else time.monotonic() + timeout
        request = _Request(_new_future())
        req = self._start(request, lambda req: (C_RESULT, req, task_id))
        assert request.event is not None and request.future is not None
        # Set by the reader when the outcome (or a refusal) arrives, or the connection ends.
        if not request.event.wait(timeout):
            with self._lock:
                self._requests.pop(req, None)
            try:
                self._send(encode_service_frame((C_WITHDRAW, req)))
            except OrchestratorClosedError:
                pass
            raise TimeoutError(f"task {task_id} did not end within {timeout:g} s")
        answer = request.answer
        if isinstance(answer, BaseException):
            raise answer
        assert answer is not None
        if answer[0] == S_REJECTED:
            raise decode_service_error(answer[2])
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        return request.future.result(remaining)  # resolved right after the event is set

    def stats(self) -> Stats:
        self._check_not_reader("stats()")
        answer = self._call(_Request(None), lambda req: (C_STATS, req))
        if isinstance(answer, BaseException):
            raise answer
        return decode_stats(answer[2])

    def _call(
        self, request: _Request, build: Callable[[int], tuple[Any, ...]],
    ) -> tuple[Any, ...] | BaseException:
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

    def _accepted(
        self, request: _Request, answer: tuple[Any, ...] | BaseException,
    ) -> TaskFuture | None:
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
                    requests = self._requests
                    request = requests.get(req) if tag == S_ACCEPTED else requests.pop(req, None)
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


def _resolve(
    future: TaskFuture, outcome: int, attempts: int, seconds: float | None, data: Any,
) -> None:
    """Resolve a client future from S_DONE (reader thread). No user code runs here: the
    result or exception stays pickled until the caller asks (``TaskFuture``), and
    done-callbacks run on the "taskorch-callbacks" thread, so a slow one holds no other
    outcome of this connection."""
    future.attempts = attempts
    future.seconds = seconds
    if outcome == O_RESULT:
        future._set_undecoded("result", data)
    elif outcome == O_RAISED:
        future._set_undecoded("error", data)
    elif outcome == O_ERROR:
        future.set_exception(decode_service_error(data))
    elif outcome == O_CANCELLED:
        future._cancel_now()
    else:
        raise ValueError(f"unknown outcome {outcome!r}")
