"""A client's session with ``taskorch serve``: its requests, its link, its reader.

One class, ``Session``, which owns its ``link.Link`` (the socket, sending, reconnecting) and
its ``inbox.Inbox`` (the reader thread and what the server sends). In the application's
process: ``submit()``, ``submit_async()``, ``result()`` and ``stats()`` run in the callers'
threads (or event loops); one reader thread per session ("taskorch-client-reader-N") receives
every frame, resolves the futures and reconnects (the methods under "the reader's side").

    caller's thread                         "taskorch-client-reader-N"           server
    ---------------                         --------------------------           ------
    cloudpickle the call (SerializationError here, nothing sent)
    register request ``req`` (``_lock``)
    C_SUBMIT frame ------------(the link's ``send_lock``)---------------------------->
    wait for the answer (Event / asyncio future), at most request_timeout
                                                       <-- S_ACCEPTED / DROPPED / REJECTED
                                            answer the caller
                                                                 <-- S_DONE (any time later)
                                            resolve the TaskFuture (no user code: see resolve)

Losing the connection (EOF, a reset, a send that timed out: the reader cuts the socket so
that a half-written frame is never followed by another): the reader marks the session down
(``down_reason``), fails the requests that cannot be sent again (stats), and dials again with
backoff (50 ms doubling to 2 s) for ``reconnect_for`` seconds. While down, ``run()`` and
``stats()`` raise ``ServerUnavailableError`` at once; ``run_async()`` waits for the link (at
most ``request_timeout``); ``result()`` is sent once it is back. On reconnecting, in req
order: a submission not answered is sent again with ``retry`` set (the server's journal knows
it by ``(token, req)``: accepted once, whatever happened to the first frame), an accepted
task whose outcome is pending is re-attached (C_RESULT with its task id), a result() wait is
sent again. If the session gives up, every unresolved future fails with
``OrchestratorBrokenError`` and later calls raise ``OrchestratorClosedError``.

Hazards: ``submit()``, ``result()`` and ``stats()`` wait for the reader thread: from it they
raise RuntimeError instead of deadlocking (futures' callbacks run on "taskorch-callbacks").
``submit_async()`` writes its frame from the event loop's thread: large arguments block the
loop while they stream (at most ``request_timeout``: the socket's send timeout).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
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
    QueueFullError,
    SerializationError,
    ServerTimeoutError,
    ServerUnavailableError,
)
from taskorch._parent.task import TaskFuture
from taskorch._service.client.credits import Credits
from taskorch._service.client.inbox import Inbox
from taskorch._service.client.link import Link
from taskorch._service.client.requests import (
    Builder,
    Request,
    answered_by,
    new_future,
    payload,
    put_back,
    resend,
    stats_fields,
    strand,
    submitted,
)
from taskorch._service.codec import encode_service_frame
from taskorch._service.protocol import (
    SERVICE_MAX_FRAME,
    ClientFrame,
    Rejected,
    ServerFrame,
    credit_return_frame,
    result_request_frame,
    stats_request_frame,
    submit_frame,
    withdraw_frame,
)
from taskorch._service.values import WirePolicy, decode_service_error, decode_stats

if TYPE_CHECKING:
    from taskorch._service.protocol import SubmitOptions
    from taskorch._stats import Stats

    Dial = Callable[[float], tuple[socket.socket, Connection[Any, Any], dict[str, Any]]]

log = logging.getLogger("taskorch")

_client_numbers = itertools.count(1)


class Session:
    """The request table, shared by the callers and the reader thread; the session's link
    and its reader (``Inbox``) are its parts."""

    def __init__(
        self, sock: socket.socket, conn: Connection[Any, Any], where: str, info: dict[str, Any],
        *, dial: Dial, connect_timeout: float, request_timeout: float, reconnect_for: float,
    ) -> None:
        self.where = where
        self.request_timeout = request_timeout
        # Guards `_requests`, the credits, `_closing`, `closed_reason`, and the link's
        # `down_reason` and fds' lifetime (lock order: the link's send_lock, then this). Never
        # held while sending, waiting, or resolving a future (user callbacks).
        self._lock = threading.Lock()
        self._link = Link(sock, conn, where, info, self._lock, dial=dial,
                          connect_timeout=connect_timeout, request_timeout=request_timeout,
                          reconnect_for=reconnect_for)
        self._requests: dict[int, Request] = {}
        self._req_ids = itertools.count(1)
        self.token = os.urandom(16)  # names its submissions in the server's journal, with req
        self.credits = Credits(self._lock)  # (granted by the reader: see ``credits``)
        self._closing = False  # close() was called: no new requests
        self._ask = self.ask  # (one bound method, shared by every future: ``new_future``)
        self.closed_reason: str | None = None  # set when the session has ended
        # The reader: the only thread that receives, and the one that reconnects (``inbox``).
        self._inbox = Inbox(self, self._link, f"taskorch-client-reader-{next(_client_numbers)}")
        self.reader = self._inbox.thread
        self.reader.start()

    @property
    def info(self) -> dict[str, Any]:
        """What the server said about itself on connecting (again on reconnecting)."""
        return self._link.info

    @property
    def down_reason(self) -> str | None:
        """Why the link is lost, while it is (reconnecting); else None."""
        return self._link.down_reason

    @property
    def closing(self) -> bool:
        return self._closing

    # -- callers' side -----------------------------------------------------------------------

    def submit(
        self, wire_policy: WirePolicy | None, fn: Callable[..., Any], args: tuple[Any, ...],
        kwargs: dict[str, Any], options: SubmitOptions | None = None,
    ) -> TaskFuture | None:
        self._check_not_reader("run()")
        self._check_open_locked()  # (closed: said before a bad call is, as in _start)
        data = payload(fn, args, kwargs)  # (SerializationError: nothing taken, nothing sent)
        may = options is None or options.after is None  # (a bad ``after`` raises in run())
        request = Request(new_future(self._ask, self), credit=True)
        # The common case: a credit held, spent as the request is registered (one lock hold;
        # ``held`` read here only as a hint, so that the frame is not built twice without one).
        if may and self.credits.held > 0 and self._start(request, lambda req: submit_frame(
                req, data, wire_policy, wait=False, client=self.token, retry=False,
                credit=True, options=options), spend=True):
            return request.future  # no round trip: the answer resolves or fails it later
        credit = self._take_credit(self.request_timeout, may)  # (none held: wait for some)
        if credit is None:
            raise ServerTimeoutError(
                f"taskorch serve at {self.where} did not answer run() within "
                f"{self.request_timeout:g} s (stopped, or overloaded?); nothing was sent")
        request = Request(request.future, credit=credit)
        build: Builder = lambda req: submit_frame(  # noqa: E731
            req, data, wire_policy, wait=False, client=self.token, retry=False, credit=credit,
            options=options)
        if credit:
            return self._spend(request, build)
        return submitted(request, self._call(request, build, "run()"))

    async def submit_async(
        self, wire_policy: WirePolicy | None, fn: Callable[..., Any], args: tuple[Any, ...],
        kwargs: dict[str, Any], options: SubmitOptions | None = None,
    ) -> TaskFuture:
        loop = asyncio.get_running_loop()
        if self.down_reason is not None:
            await loop.run_in_executor(None, self._link.up.wait, self.request_timeout)
        request = Request(new_future(self._ask, self), loop, loop.create_future())
        assert request.waiter is not None
        req = self._start(request, lambda req: submit_frame(
            req, payload(fn, args, kwargs), wire_policy, wait=True, client=self.token,
            retry=False, credit=False, options=options))
        try:
            answer = await request.waiter
        except asyncio.CancelledError:
            self._withdraw(req)
            raise
        future = submitted(request, answer)
        assert future is not None  # the server never drops a waiting request
        return future

    def submit_payload_waiting(self, wire_policy: WirePolicy | None, data: bytes,
                               timeout: float | None = None, what: str = "map()") -> TaskFuture:
        """A pickled call (``map()``'s chunks, ``with_wait()``) accepted once the backlog has
        room; a lost link waited out. With a credit held (or coming), no round trip (the slot
        is the client's, as in run()); else one, in which the server waits for room and tops
        the credits up. Past ``timeout``: withdrawn; QueueFullError (ServerUnavailableError
        while down)."""
        self._check_not_reader(what)
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._take_credit(self.request_timeout if timeout is None
                             else min(timeout, self.request_timeout)):
            with contextlib.suppress(ServerUnavailableError, ServerTimeoutError):  # (down: below)
                future = self._spend(Request(new_future(self._ask, self), credit=True), lambda req:
                                     submit_frame(req, data, wire_policy, wait=False,
                                                  client=self.token, retry=False, credit=True))
                assert future is not None
                return future
        if deadline is not None:
            timeout = max(0.0, deadline - time.monotonic())
        request = Request(new_future(self._ask, self))
        req = self._start(request, lambda req: submit_frame(
            req, data, wire_policy, wait=True, client=self.token, retry=False, credit=False),
            when_down="queue")
        assert request.event is not None  # set on the answer, or the session's end (failure)
        if not request.event.wait(timeout):
            with self._lock:  # the reader takes answers under this lock (requests_answered_by)
                if not request.taken:
                    self._requests.pop(req, None)  # an answer from now on is not for us
            if not request.taken:
                self._withdraw(req)
                raise (self._link.unavailable() if self._link.down_reason is not None
                       else QueueFullError(int(self.info.get("max_backlog") or 0)))
            request.event.wait()  # taken before the timeout hit: being delivered now
        assert request.answer is not None
        future = submitted(request, request.answer)
        assert future is not None  # the server never drops a waiting request
        return future

    def _take_credit(self, wait: float | None, may: bool = True) -> bool | None:
        """``Credits.take``: True, spent; False, a round trip (if not ``may``: at once)."""
        return self.credits.take(wait, lambda: may and self._link.down_reason is None,
                                 lambda: self._closing or self.closed_reason is not None)

    def _spend(self, request: Request, build: Builder, when_down: str = "fail",
               ) -> TaskFuture | None:
        """Send ``build(req)``, a credit submission (``_take_credit`` took it): no answer."""
        try:
            self._start(request, build, when_down)
        except (TypeError, ValueError):  # nothing sent (SerializationError): keep it
            self.credits.grant(1, 1)
            raise
        return request.future

    def accepted(self, future: TaskFuture, timeout: float | None) -> int:
        """Wait until the server has committed ``future``'s task (see ``Client.accepted``)."""
        self._check_not_reader("accepted()")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            if not (future.task_id or future.done()
                    or any(r.future is future for r in self._requests.values())):
                raise ValueError("accepted() takes a future that this client's run() or "
                                 "run_async() returned")
            # Woken by each S_ACCEPTED, refused credit submission (grant), the session's end.
            while not future.task_id and not future.done() and self.closed_reason is None:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(
                        f"taskorch serve at {self.where} did not commit the task within "
                        f"{timeout:g} s")
                self.credits.change.wait(remaining)
            reason = self.closed_reason
        if future.task_id:
            return future.task_id
        if future.done():
            error = future.exception(0)
            raise error if error is not None else ValueError(
                "accepted() takes a future that this client's run() or run_async() returned")
        raise OrchestratorClosedError(
            f"the connection to taskorch serve at {self.where} closed ({reason}) before the "
            "server said whether it committed the task")

    def result(self, task_id: int, timeout: float | None) -> Any:
        """Wait for task ``task_id``'s outcome (any client's) and return or raise it."""
        self._check_not_reader("result()")
        deadline = None if timeout is None else time.monotonic() + timeout
        request = Request(new_future(self._ask))
        wait = timeout is None or timeout > 0  # 0: ask whether it has ended, do not wait
        req = self._start(request, lambda req: result_request_frame(req, task_id, wait),
                          when_down="queue")
        assert request.event is not None and request.future is not None  # (see _call)
        if not request.event.wait(timeout if wait else self.request_timeout):
            self._withdraw(req)
            raise TimeoutError(f"task {task_id} did not end within {timeout:g} s")
        answer = request.answer
        if isinstance(answer, BaseException):
            raise answer
        assert answer is not None
        if isinstance(answer, Rejected):
            raise decode_service_error(answer.error)
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        return request.future.result(remaining)  # resolved right after the event is set

    def stats(self) -> Stats:
        return decode_stats(self.status())

    def status(self) -> dict[str, Any]:
        """The server's S_STATS fields (Stats', and ``taskorch status``'s: encode_status)."""
        return self.ask(stats_request_frame, "stats()")

    def ask(self, build: Callable[[int], ClientFrame], what: str) -> dict[str, Any]:
        """A request answered by S_STATS (stats, trigger, an operator's): its fields."""
        self._check_not_reader(what)
        return stats_fields(self._call(Request(None), build, what))

    def _call(self, request: Request, build: Builder, what: str) -> ServerFrame | BaseException:
        req = self._start(request, build)
        assert request.event is not None
        # Set by the reader on the answer, or when the session gives up.
        if not request.event.wait(self.request_timeout):
            self._withdraw(req)
            if request.answer is None:
                raise ServerTimeoutError(
                    f"taskorch serve at {self.where} did not answer {what} within "
                    f"{self.request_timeout:g} s (stopped, or overloaded?); a submission may or "
                    "may not have been accepted")
        assert request.answer is not None
        return request.answer

    def _start(self, request: Request, build: Builder, when_down: str = "fail",
               spend: bool = False) -> int:
        """Register ``request`` and send its frame; raises (nothing sent) on a bad call, or
        ServerUnavailableError while down (``when_down="queue"``: sent at reconnection).
        ``spend``: only if a credit is held and the link is up, spent in the same hold of the
        lock as the registration (else 0: nothing registered, nothing sent)."""
        self._check_open_locked()  # early, without the lock (checked again under it below)
        req = next(self._req_ids)  # (atomic: itertools.count is C, under the GIL)
        message = build(req)
        frame = encode_service_frame(message)  # SerializationError from encode_call
        if len(frame) > SERVICE_MAX_FRAME:
            raise SerializationError(
                f"the call is {len(frame) / 2**20:.1f} MiB pickled, over taskorch serve's "
                f"{SERVICE_MAX_FRAME // 2**20} MiB frame limit; nothing was sent. Pass large data "
                "as a file path")
        request.message = message
        with self._lock:
            self._check_open_locked()
            if spend and (self._link.down_reason is not None or not self.credits.spend_locked()):
                return 0
            if self._link.down_reason is not None and when_down == "fail":
                raise self._link.unavailable()
            self._requests[req] = request  # before sending: the answer may come at once
        try:
            self._send(frame)
        except (ServerUnavailableError, ServerTimeoutError):
            if when_down == "fail":
                with self._lock:
                    self._requests.pop(req, None)  # (a frame cut short is never accepted)
                raise
        except BaseException:  # Ctrl-C, maybe mid-frame (the link is cut): not resent either
            with self._lock:
                self._requests.pop(req, None)
            raise
        return req

    def _withdraw(self, req: int) -> None:
        with self._lock:
            self._requests.pop(req, None)
        try:
            self._send(encode_service_frame(withdraw_frame(req)))
        except (OrchestratorClosedError, ServerUnavailableError, ServerTimeoutError):
            pass

    def _send(self, frame: bytes) -> None:
        self._link.send(frame)

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
                "from another thread, or use run_async() in an event loop")

    # -- closing -----------------------------------------------------------------------------

    def close(self, timeout: float) -> None:
        with self._lock:
            already = self._closing
            self._closing = True
            futures = [r.future for r in self._requests.values() if r.future is not None]
        in_reader = threading.current_thread() is self.reader
        if not already and futures and not in_reader:
            concurrent.futures.wait(futures, timeout)
        self.abandon()
        if not in_reader:
            self.reader.join()

    def abandon(self) -> None:
        """End the session without waiting (close(), or the client was garbage-collected)."""
        self._closing = True
        self._link.stop_reconnecting()
        self._link.shut_down()

    def forget_in_forked_child(self) -> None:
        """In a forked child, at the fork (one thread; the reader is the parent's): close our
        copies of the socket without ``shutdown()`` (it would end the parent's connection),
        fail the parent's requests here (answered there), new locks (copied held?)."""
        self._lock = threading.Lock()
        self.credits = Credits(self._lock)
        self._link.forget_in_forked_child(self._lock)
        self._closing = True
        self.closed_reason = "it was opened by the process this one was forked from"
        requests = list(self._requests.values())
        self._requests.clear()
        for request in requests:
            if request.future is not None:
                request.future.fail_in_forked_child(OrchestratorBrokenError(
                    "this task was submitted through a taskorch.Client by the process this one "
                    "was forked from: its outcome goes to that process only"))

    # -- the reader's side (``inbox``: "taskorch-client-reader-N") ---------------------------

    def requests_answered_by(self, frames: tuple[ServerFrame, ...]) -> list[Request | None]:
        """The request each frame answers (None: none, or withdrawn), under one hold of the
        lock; a final answer takes its request out of the table."""
        with self._lock:
            return answered_by(self._requests, frames)

    def put_back(self, frames: tuple[ServerFrame, ...], requests: list[Request | None]) -> None:
        """Frames not handled after all (the link is dropped): their requests go back in the
        table, as if not received, to be sent again after the reconnection."""
        with self._lock:
            put_back(self._requests, frames, requests)

    def return_credits(self) -> None:
        """S_RECALL: give back every credit held (C_RETURN)."""
        try:
            self._send(encode_service_frame(credit_return_frame(self.credits.return_all())))
        except (ServerUnavailableError, ServerTimeoutError):
            pass  # the link is lost: the server frees them itself

    def go_down(self, why: str) -> None:
        """The link is lost: close it; fail the requests that cannot be sent again."""
        log.warning("taskorch.Client: lost the connection to %s (%s); reconnecting for up to "
                    "%g s", self.where, why, self._link.reconnect_for)
        self._link.shut_down()  # a sender blocked in send_bytes() fails now, releasing send_lock
        with self._link.send_lock, self._lock:  # lock order: send_lock, then _lock
            self._link.lost_locked(why)
            self.credits.clear_locked()  # the server frees what it granted
            stranded = strand(self._requests)
        for request in stranded:
            request.deliver(self._link.unavailable())

    def reconnect(self) -> bool:
        """Dial again (``Link.reconnect``); on success, send what is pending again."""
        return self._link.reconnect(lambda: self._closing, self._to_resend)

    def _to_resend(self) -> list[ClientFrame | None]:  # (_lock held)
        return [resend(req, request) for req, request in sorted(self._requests.items())]

    def end(self, reason: str) -> None:
        """The session is over (the reader's last act): fail what is left."""
        self._link.shut_down()  # a sender blocked in send_bytes() fails now, releasing send_lock
        with self._link.send_lock, self._lock:  # lock order: send_lock, then _lock
            self.closed_reason = reason
            self.credits.change.notify_all()
            requests = list(self._requests.values())
            self._requests.clear()
            self._link.closed_locked()
        self._link.up.set()  # run_async() callers waiting for the link see the end
        for request in requests:
            if not request.answered:
                request.deliver(OrchestratorClosedError(
                    f"the connection to taskorch serve at {self.where} closed ({reason}) before it "
                    "answered; the task was probably not accepted"))
            elif request.future is not None and not request.future.done():
                if self._closing:
                    error: Exception = OrchestratorClosedError(
                        "the taskorch.Client was closed before this task's outcome arrived; the "
                        "task still runs on the server")
                else:
                    error = OrchestratorBrokenError(
                        f"lost the connection to taskorch serve at {self.where} ({reason}) before "
                        "this task's outcome arrived: it may or may not have run")
                request.future.set_exception(error)
