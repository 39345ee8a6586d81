"""One client connection of ``taskorch serve``: its reader thread and its writer thread.

Server process. Per connection, two threads:

    "taskorch-serve-conn-N"     the handshake (``handshake.server_handshake``; the accept
                                thread enforces its total deadline), then reads frames and
                                submits: ``run()`` semantics (``o.intake.offer``) never block, and
                                ``run_async()`` ones go to the server's asyncio thread
    "taskorch-serve-send-N"     once authenticated: writes the frames queued in the outbox
                                (answers from the asyncio thread, acceptances and outcomes)

plus calls from threads it does not own: the journal's writer (the registry's ``Sink``: a
submission committed, S_ACCEPTED; an outcome committed, S_DONE) and the server's asyncio
thread (submits waiting for room). A slow or hostile client can hold only its own two threads
and its outbox's byte bound (``outbox``).

A submission: hold a backlog slot (``intake.reserve``: QueueFullError, a drop, or a slot;
run_async() waits for one on the asyncio thread), hand it to the registry, which journals it
and enqueues it once committed; the answer then goes out through the outbox.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import threading
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from taskorch._errors import (
    OrchestratorClosedError,
    QueueFullError,
    SerializationError,
    TaskorchError,
)
from taskorch._service.codec import decode_client_frame, encode_service_frame
from taskorch._service.handshake import (
    SerializedSends,
    peer_name,
    refusal_frame,
    refuse_then_cut,
    server_handshake,
)
from taskorch._service.operations import AdminRequest
from taskorch._service.protocol import (
    SERVICE_MAX_FRAME,
    BadRequest,
    CreditReturn,
    Done,
    ResultRequest,
    ServerFrame,
    ServiceProtocolError,
    StatsRequest,
    Submit,
    TriggerRequest,
    Withdraw,
    accepted_frame,
    credit_grant_frame,
    done_frame,
    dropped_frame,
    hello_frame,
    rejected_frame,
    stats_reply_frame,
)
from taskorch._service.server.admitting import Admitting, Inflight
from taskorch._service.server.credits import ConnectionCredits
from taskorch._service.server.host import Host
from taskorch._service.server.operator import trigger_answer
from taskorch._service.server.outbox import Fetched, Outbox
from taskorch._service.transport import FrameReader, frame_batch, frame_bytes
from taskorch._service.values import encode_status

if TYPE_CHECKING:
    from taskorch._service.server.outcomes import Outcome

log = logging.getLogger("taskorch")

#: A named tuple from its fields (``tuple.__new__`` in C: an ``Inflight`` per task).
_new = tuple.__new__

#: At shutdown, how long a connection's outbox may take to flush to a client that does not
#: read, before the connection is cut.
FLUSH_TIMEOUT = 5.0

#: Most outbox frames the writer sends in one write.
WRITE_BATCH = 256

_STOP = None  # the outbox sentinel: flush what is queued, then exit


class ServedConnection:
    """One client connection: its reader thread, its writer thread, and its tasks."""

    def __init__(self, server: Host[ServedConnection], sock: socket.socket, number: int) -> None:
        self.server = server
        self.orchestrator = server.orchestrator
        self.registry = server.registry
        self.credits = ConnectionCredits(server.orchestrator.intake)
        self.number = number
        self.peer = f"connection {number} ({peer_name(sock)})"
        # Two fds for one socket: `conn` frames messages, `sock` is for setsockopt/shutdown.
        # Only the reader closes them, at its end, holding `_send_lock` and `_lock`, so that a
        # shutdown from another thread never acts on a closed (possibly reused) fd number.
        self.sock = sock
        self.conn: Connection[Any, Any] = Connection(os.dup(sock.fileno()))
        # Guards `_inflight`, `closed` and the fds' lifetime. Taken by the reader, the asyncio
        # thread, the journal's writer and the main thread; never held across I/O.
        self._lock = threading.Lock()
        # Requests whose outcome is awaited, by req: an accepted submission (its task, to
        # cancel it on a withdraw if it is its own) or a C_RESULT wait (None).
        self._inflight: dict[int, Inflight | None] = {}
        self._admitting = Admitting(self._lock)  # and those being journaled, before that
        self.closed = False  # no more frames are queued once set
        self.refused: str | None = None  # why the server cut it unserved (refuse(), once)
        # Held by the writer around each send_bytes() and by the reader while closing the fds.
        self._send_lock = threading.Lock()
        # The outbox: frames for the writer, from the asyncio thread (answers to waiting
        # submits) and the journal's writer (S_ACCEPTED, S_DONE); never waits on a client: past
        # its byte bound, outcomes wait in the journal (``outbox``). _STOP: flush, then exit.
        self._outbox = Outbox(self._fetch, self.registry.journal.outbox_bytes)
        self._fetched = Fetched(self._outbox)
        # run_async() submits waiting for room, by req (asyncio thread only).
        self._waiting: dict[int, asyncio.Task[None]] = {}
        # Reader: blocks in recv_bytes(); wakeups: a frame, EOF or an error (the client left,
        # a refuse() by the accept thread, or a shutdown() by the main thread at server stop).
        # Exits on any of those, after closing the connection. Daemon: at server exit the main
        # thread has joined it already, unless it is wedged, which must not keep the process
        # alive.
        self.reader = threading.Thread(
            target=self._read_guarded, name=f"taskorch-serve-conn-{number}", daemon=True
        )
        # Writer: blocks in the outbox's get() and in send_bytes() (a client that does not
        # read). Exits at _STOP or when a send fails. Daemon for the same reason. Started
        # once the client has authenticated.
        self.writer = threading.Thread(
            target=self._write_guarded, name=f"taskorch-serve-send-{number}", daemon=True
        )

    def start(self) -> None:
        self.reader.start()

    def discard(self, reason: str) -> None:
        """Refuse a connection that was never started (accept thread): tell the peer why,
        close the fds. No other thread knows of it."""
        self.refused = reason
        try:
            self.sock.send(refusal_frame(reason), socket.MSG_DONTWAIT)
        except OSError:
            pass
        self.conn.close()
        self.sock.close()

    # -- reader thread ----------------------------------------------------------------------

    def _read_guarded(self) -> None:
        why = "the client disconnected"
        level = logging.DEBUG
        try:
            if not self._handshake():
                return
            self._answer(hello_frame(self.server.info))  # alone, first
            self.writer.start()
            granted = self.credits.top_up()
            if granted:
                self.send(credit_grant_frame(granted))
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
        """Authenticate the peer, then take a place among the authenticated connections."""
        try:
            server_handshake(SerializedSends(self.conn, self._send_lock), self.server.authkey)
        except Exception as exc:  # EOF, a reset, AuthenticationError, garbage (AssertionError)
            if self.refused is not None:  # cut by the server: the deadline, or room for another
                log.warning("taskorch serve: %s refused before authenticating: %s",
                            self.peer, self.refused)
            elif isinstance(exc, (EOFError, BrokenPipeError, ConnectionResetError)):
                log.debug("taskorch serve: %s left before authenticating", self.peer)  # a probe
            elif not self.server.stopping:
                log.warning("taskorch serve: %s failed to authenticate (%s: %s); closed",
                            self.peer, type(exc).__name__, exc)
            return False
        if not self.server.promote(self):  # refused (and told why) by promote() or earlier
            log.warning("taskorch serve: %s refused after authenticating: %s",
                        self.peer, self.refused)
            return False
        log.debug("taskorch serve: %s authenticated", self.peer)
        return True

    def refuse(self, reason: str) -> None:
        """Tell the peer why it is not served, then cut the connection (any thread; see
        ``handshake.refuse_then_cut``)."""
        self.refused = reason
        refuse_then_cut(self.sock, self._send_lock, reason, self.shut_down)

    def _read(self) -> None:
        frames = FrameReader(self.conn.fileno())  # (the fds live as long as this thread)
        while True:
            try:
                frame = decode_client_frame(frames.read())
            except BadRequest as exc:  # that request is refused, nothing else
                log.warning("taskorch serve: %s: request %d refused: %s", self.peer, exc.req, exc)
                self._reply(rejected_frame(exc.req, ValueError(
                    f"taskorch serve refused this request: {exc}")))
                continue
            if isinstance(frame, Submit):
                self._submit(frame)
            elif isinstance(frame, ResultRequest):
                with self._lock:
                    self._inflight[frame.req] = None
                self.registry.watch(frame.task_id, self, frame.req, frame.wait)
            elif isinstance(frame, CreditReturn):
                self.credits.give_back(frame.n)
            elif isinstance(frame, StatsRequest):
                self._reply(stats_reply_frame(frame.req, encode_status(
                    self.orchestrator, self.registry.journal.unwritable())))
            elif isinstance(frame, TriggerRequest):
                self._reply(trigger_answer(self.orchestrator, frame.req, frame.name))
            elif isinstance(frame, AdminRequest):
                self._reply(self.server.operator.answer(frame))  # (waits: see there)
            else:
                assert isinstance(frame, Withdraw)
                self._on_loop(self._withdraw, frame.req)

    def _submit(self, frame: Submit) -> None:
        if frame.credit:  # the slot is one this connection holds (see credits)
            if self.credits.spend():
                self._journal(frame)
                granted = self.credits.top_up_when_low()
                if granted:  # now, not after the commit: the client streams on meanwhile
                    self._answer(credit_grant_frame(granted), unless_busy=True)
            else:
                self._reply(rejected_frame(frame.req,
                                           QueueFullError(self.orchestrator.max_backlog)))
        elif frame.retry:  # sent before on another connection? Then the journal has it.
            self.registry.find(frame.client, frame.req, self, frame.req,
                               functools.partial(self._submit_new, frame))
        else:
            self._submit_new(frame)

    def _submit_new(self, frame: Submit) -> None:
        """The reader (or the journal's writer, for a retry it did not find)."""
        if frame.wait:
            if not self._on_loop(self._start_waiting, frame):
                self._reply(rejected_frame(
                    frame.req, OrchestratorClosedError("taskorch serve is stopping")))
            return
        try:
            reserved = self.orchestrator.intake.reserve(f"from {self.peer}")
        except TaskorchError as exc:  # QueueFullError, OrchestratorClosedError, ...BrokenError
            self._reply(rejected_frame(frame.req, exc))
            if isinstance(exc, QueueFullError):
                self.server.recall_credits()  # held slots may be what fills it
            return
        if not reserved:
            self._reply(dropped_frame(frame.req))
            return
        self._journal(frame)

    def _journal(self, frame: Submit) -> None:
        """A slot is held: journal the task; the registry calls admitted() once committed."""
        self._admitting.begin(frame.req)
        try:
            self.registry.submit_reserved(frame.client, frame.req, frame.payload, frame.policy,
                                          self, frame.req, frame.timing, frame.key, frame.after)
        except ValueError as exc:  # (the slot was given back)
            self._admitting.abandon(frame.req)
            self._reply(rejected_frame(frame.req, SerializationError(f"invalid options: {exc}")))

    # -- the registry's Sink: answers and outcomes (the journal's writer, mostly) -------------

    def admitted(self, req: int, admission: int | BaseException, joined: bool = False) -> None:
        """The submission is committed and enqueued as task ``admission`` (another's if
        ``joined``), or refused. The registry calls this before any outcome() for it, so
        S_DONE always follows S_ACCEPTED."""
        if isinstance(admission, BaseException):
            self.send(rejected_frame(req, admission))
        else:
            self.admitted_all([(req, admission)], joined)

    def admitted_all(self, accepted: list[tuple[int, int]], joined: bool = False) -> None:
        """``admitted(req, task_id)`` for many (a journal batch's submissions that made their
        own tasks): one lock hold and one outbox put for them all."""
        answered: list[tuple[int, int]] = []
        withdrawn: list[tuple[int, int]] = []
        with self._lock:
            for req, task_id in accepted:
                if self._admitting.end_locked(req):
                    withdrawn.append((req, task_id))
                else:
                    self._inflight[req] = _new(Inflight, (task_id, not joined))
                    answered.append((req, task_id))
        for req, task_id in withdrawn if not joined else ():
            # Between wanted() and now: its own is cancelled if it has not started.
            self._on_loop(self.server.loop.run_in_executor, None, self.registry.withdrawn,
                          task_id, self, req)
        if answered and not self.closed:  # (a grant, if one is due, with the last)
            last = answered.pop()
            frames: list[ServerFrame] = [accepted_frame(req, task_id, 0)
                                         for req, task_id in answered]
            frames.append(accepted_frame(*last, self.credits.top_up_when_low()))
            self._outbox.put_plain_all(frames)

    def wanted(self, req: int) -> bool:
        return self._admitting.wanted(req)

    def outcome(self, req: int, outcome: Outcome) -> None:
        """The task of ``req`` ended: queue S_DONE (or defer it), unless it was withdrawn."""
        self.outcomes([(req, outcome)])

    def outcomes(self, ended: list[tuple[int, Outcome]]) -> None:
        """``outcome`` for many requests (a journal batch's): one lock hold, and one outbox
        put for the small outcomes of accepted tasks (``Outbox.defer_or_put_all``)."""
        owned: list[tuple[Done, int]] = []
        waits: list[Done] = []
        with self._lock:
            inflight = self._inflight
            for req, outcome in ended:
                if req in inflight:
                    accepted = inflight.pop(req)
                    frame = done_frame(req, *outcome)
                    if accepted is None:  # a C_RESULT wait
                        waits.append(frame)
                    else:
                        owned.append((frame, accepted.task_id))
        if self.closed:
            return
        for frame in waits:
            self._outbox.put(frame)
        if owned:
            self._outbox.defer_or_put_all(owned)

    def _fetch(self, req: int, task_id: int) -> None:
        """A deferred outcome: read it back from the journal (the outbox, writer thread)."""
        self.registry.watch(task_id, self._fetched, req, True)

    def rejected(self, req: int, error: BaseException) -> None:
        """A C_RESULT that has no outcome to wait for (see ``registry.watch``)."""
        with self._lock:
            self._inflight.pop(req, None)
        self._reply(rejected_frame(req, error))

    def _reply(self, message: ServerFrame) -> None:
        """Answer directly from the reader thread (no thread hop), else through the outbox."""
        if threading.current_thread() is self.reader:
            self._answer(message)
        else:
            self.send(message)

    def _answer(self, message: ServerFrame, *, unless_busy: bool = False) -> None:
        """Send an answer from the reader thread itself, without the writer's thread hop. It
        blocks only this client's own reader, and only while this client does not read its
        socket. Frames queued in the outbox before it may go out after it; nothing relies on
        that order (S_DONE follows S_ACCEPTED, and both go through the outbox).
        ``unless_busy``: if the writer is sending, queue it in the outbox instead of waiting
        (an S_CREDIT: the reader must not wait behind a large batch to a slow client)."""
        if not self._send_lock.acquire(blocking=not unless_busy):
            self.send(message)
            return
        try:
            self.conn.send_bytes(encode_service_frame(message))
        finally:
            self._send_lock.release()

    # -- the asyncio thread's part ----------------------------------------------------------

    def _on_loop(self, fn: Any, *args: Any) -> bool:
        try:
            self.server.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the server is stopping
            return False
        return True

    def _start_waiting(self, frame: Submit) -> None:
        if self.closed:
            return  # the client left before this reached the loop
        self._waiting[frame.req] = self.server.loop.create_task(self._reserve_when_room(frame))

    async def _reserve_when_room(self, frame: Submit) -> None:
        try:
            await self.orchestrator.intake.reserve_async()  # cancelled: nothing held
        except TaskorchError as exc:
            self.send(rejected_frame(frame.req, exc))
            return
        finally:
            self._waiting.pop(frame.req, None)
        self._journal(frame)

    def _withdraw(self, req: int) -> None:
        task = self._waiting.pop(req, None)
        if task is not None:
            task.cancel()
            return
        with self._lock:
            if self._admitting.withdraw_locked(req):  # being journaled: never enqueued
                return
            accepted = self._inflight.pop(req, None)
        if accepted is not None and accepted.owned:  # (a joined task: only watched, no more)
            # Off the shared loop: a cancel may wait for a recall (intake.RECALL_WAIT).
            self.server.loop.run_in_executor(None, self.registry.withdrawn, accepted.task_id,
                                             self, req)

    def _cancel_waiting(self) -> None:
        for task in list(self._waiting.values()):
            task.cancel()

    # -- writer thread ----------------------------------------------------------------------

    def send(self, message: ServerFrame) -> None:
        """Queue a frame for the client (any thread; never blocks). Dropped once closed: the
        outcome of a task whose client left is counted in the stats and discarded."""
        if not self.closed:
            self._outbox.put(message)

    def _write_guarded(self) -> None:
        try:
            while True:
                batch = self._outbox.take(WRITE_BATCH)  # wakeups: a frame, or _STOP
                stop = batch[-1] is _STOP
                messages = [message for message in batch if message is not _STOP]
                if messages:
                    data = frame_batch(messages) if len(messages) > 1 else None
                    if data is None:  # one message, or a batch over the limit: frame by frame
                        data = b"".join(frame_bytes(message) for message in messages)
                    with self._send_lock:  # every frame queued meanwhile, in one write
                        self.sock.sendall(data)
                    self._outbox.sent()
                if stop:
                    return
        except (OSError, ValueError) as exc:  # the client left; ValueError: fds closed
            log.debug("taskorch serve: %s: send failed: %s", self.peer, exc)
            self.shut_down()  # wake the reader, which closes the connection
        except BaseException:
            log.exception("taskorch serve: %s: writer failed", self.peer)
            self.shut_down()

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
        self.credits.close()
        self.shut_down()
        if self.writer.is_alive():
            self._outbox.put(_STOP)
            self.writer.join()
        with self._send_lock, self._lock:  # lock order: _send_lock, then _lock
            self.conn.close()
            self.sock.close()
        self.server.forget(self)
        if self.server.stopping:
            level = logging.DEBUG
        elif inflight:
            level = max(level, logging.WARNING)
            why += (f", with {inflight} task(s) accepted and not finished: they run to the end "
                    "and count in the stats; their outcomes are discarded")
        log.log(level, "taskorch serve: %s closed: %s", self.peer, why)
