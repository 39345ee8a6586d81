"""``taskorch serve``'s process life: ``serve()`` starts the ``Server`` and waits in the main
thread for a signal, then drains (the server process, main thread; "taskorch-serve-drain").

Start: the caller opens (and locks) the journal; ``serve()`` recovers what it holds unfinished
(``TaskRegistry.recover``) before accepting anyone. The journal is closed last.

Garbage collection: ``serve()`` turns CPython's allocation-driven cyclic collector off and
runs a full collection from the main thread every GC_INTERVAL seconds instead (restored when
it returns). A server holds every accepted task while it is queued (a burst of 20,000 is
ordinary); the allocation-driven collector walks all of them again each time the heap grows by
a quarter, which cost ``taskorch serve`` about a fifth of its CPU per task in the benchmark
(section A, measured with ``gc.callbacks``). The server's per-task objects form no reference
cycles (refcounting frees them); the collection on the clock still frees any cycle made
elsewhere (an exception's traceback, a library's), at most GC_INTERVAL seconds late.
Hazards: code that runs in the server process and makes cycles fast (not task code: tasks
run in the workers) would hold their memory until the next tick; and each collection holds the
GIL while it walks the heap (a few ms per 100,000 objects alive: 20,000 queued tasks are about
250,000), a pause of every server thread once per tick.

Shutdown (SIGTERM or SIGINT): stop accepting (close the listener, remove the socket file),
``o.stop(drain_timeout)`` while connections stay open, so that the outcomes of tasks in flight
reach their clients and new submits get ``OrchestratorClosedError``; then flush and close
every connection and stop the asyncio loop. A second signal during the drain shortens it to
nothing: queued tasks are cancelled, running ones terminated.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import select
import signal
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable

from taskorch._service.server.journal import Journal
from taskorch._service.server.listener import Listener
from taskorch._service.server.registry import TaskRegistry
from taskorch._service.server.server import (
    HANDSHAKE_TIMEOUT,
    MAX_CONNECTIONS,
    MAX_UNAUTHENTICATED,
    Server,
)

if TYPE_CHECKING:
    from taskorch._parent.orchestrator import TaskOrchestrator
    from taskorch._service.server.http import HttpService
    from taskorch._stats import StopReport

log = logging.getLogger("taskorch")

#: A second SIGTERM within this many seconds of the first is its echo, not a second signal:
#: timeout(1) sends SIGTERM to the server and then to its whole process group, the server
#: included (coreutils timeout.c, ``send_sig(0, sig)``), and the two can arrive apart. An
#: operator who means a second SIGTERM sends it later than that; a second Ctrl-C (SIGINT)
#: counts at once.
SIGNAL_ECHO_WINDOW = 1.0
#: At the end, how long the last done-callbacks may take (the schedules' outcomes queue
#: journal records there).
CALLBACKS_TIMEOUT = 5.0
#: After the drain, how long the journal may take to commit the last outcomes (a commit or
#: two) before the connections are closed.
OUTCOMES_TIMEOUT = 10.0
#: Seconds between two full garbage collections (see the module docstring).
GC_INTERVAL = 5.0
#: Bytes written to the main thread's wake pipe besides signal numbers.
_WAKE_DRAINED = 0
_WAKE_THREAD_DIED = 255


@dataclasses.dataclass(frozen=True)
class ServeOutcome:
    """How ``serve()`` ended."""

    signal: int | None  # the signal that stopped it; None when a server thread died
    report: StopReport | None  # the drain's report; None when stop() itself failed

    @property
    def drained(self) -> bool:
        return self.signal is not None and self.report is not None and self.report.drained


def serve(
    orchestrator: TaskOrchestrator, listener: Listener, authkey: bytes, *,
    drain_timeout: float = 30.0,
    say: Callable[[str], None] = log.warning, ready_details: str = "",
    handshake_timeout: float = HANDSHAKE_TIMEOUT,
    max_unauthenticated: int = MAX_UNAUTHENTICATED,
    max_connections: int = MAX_CONNECTIONS, http: HttpService | None = None,
    journal: Journal | None = None, before_accepting: Callable[[], None] | None = None,
) -> ServeOutcome:
    """Serve ``orchestrator`` on ``listener`` until SIGTERM or SIGINT, then drain (main thread).

    Owns them all: returns with the listener closed, the orchestrator stopped, the journal
    (None: one in memory) closed, and ``http`` (the metrics and dashboard) closed after the
    drain. ``say`` gets the operator's lines; ``ready_details`` goes into the ready line. The
    limits are ``Server``'s. ``before_accepting`` runs once the journal is recovered and
    its writer started, before any client is served (``taskorch serve`` adds its schedules
    there); if it raises, everything is closed and the error propagates."""
    process = _ServerProcess(orchestrator, listener, http, say)
    process.recover(journal, authkey, drain_timeout, before_accepting,
                    handshake_timeout=handshake_timeout, max_unauthenticated=max_unauthenticated,
                    max_connections=max_connections)
    try:
        process.catch_signals()
        process.start_serving(ready_details)
        stopped_by = process.wait_for_signal()
        report = process.drain(stopped_by, drain_timeout)
        process.deliver_last_outcomes()
        process.say_stopped(report)
        return ServeOutcome(stopped_by, report)
    finally:
        process.close()


class _ServerProcess:
    """``serve()``'s steps and what they share (main thread). Owns the wake pipe: the main
    thread sleeps reading it; the C-level signal handler writes the signal's number there
    (``signal.set_wakeup_fd``), the drain thread _WAKE_DRAINED, a dying server thread
    _WAKE_THREAD_DIED."""

    def __init__(self, orchestrator: TaskOrchestrator, listener: Listener,
                 http: HttpService | None, say: Callable[[str], None]) -> None:
        self.orchestrator = orchestrator
        self.listener = listener
        self.http = http
        self.say = say
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.gc_was_enabled = gc.isenabled()
        gc.disable()  # collected on the clock instead (_GcClock; see the module docstring)
        self.clock = _GcClock()
        # Set by recover(); None until then.
        self.journal: Journal | None = None
        self.registry: TaskRegistry | None = None
        self.server: Server | None = None
        # Set by catch_signals(): what close() restores (None: not caught yet).
        self.old_wakeup_fd: int | None = None
        self.old_handlers: dict[int, Any] = {}

    def recover(self, journal: Journal | None, authkey: bytes, drain_timeout: float,
                before_accepting: Callable[[], None] | None, *, handshake_timeout: float,
                max_unauthenticated: int, max_connections: int) -> None:
        """Make the server, recover the journal, start its writer, run ``before_accepting``;
        on any failure close everything (nothing was served) and raise."""
        try:
            if not drain_timeout >= 0 or drain_timeout == float("inf"):
                raise ValueError(f"the drain timeout must be a number >= 0, got {drain_timeout}")
            self.journal = journal = journal or Journal(None)
            self.registry = registry = TaskRegistry(self.orchestrator, journal)
            self.server = Server(self.orchestrator, self.listener, authkey, registry=registry,
                                 handshake_timeout=handshake_timeout,
                                 max_unauthenticated=max_unauthenticated,
                                 max_connections=max_connections,
                                 on_thread_death=lambda: _wake(self.wake_w, _WAKE_THREAD_DIED))
            queued, retried, failed = registry.recover()
            journal.start()
            if before_accepting is not None:  # (the schedules: they fire from now on)
                before_accepting()
        except BaseException:
            self._close_unserved(journal)
            raise
        if queued or retried or failed:
            self.say(f"recovered from the journal: {queued} queued tasks queued again, {retried} "
                     f"that were running retried (an attempt charged), {failed} failed (attempts "
                     "spent)")

    def _close_unserved(self, journal: Journal | None) -> None:
        os.close(self.wake_r)
        os.close(self.wake_w)
        if self.http is not None:
            self.http.close()
        self.listener.close()
        self.orchestrator.stop(timeout=0)
        if journal is not None:
            journal.close()  # (releases its lock)
        if self.gc_was_enabled:
            gc.enable()

    def catch_signals(self) -> None:
        """SIGTERM and SIGINT only write their number to the wake pipe (``_ignore_signal``)."""
        self.old_wakeup_fd = signal.set_wakeup_fd(self.wake_w)
        self.old_handlers = {signum: signal.signal(signum, _ignore_signal)
                             for signum in (signal.SIGTERM, signal.SIGINT)}

    def start_serving(self, ready_details: str) -> None:
        assert self.server is not None and self.journal is not None
        self.server.start()
        if self.http is not None:
            self.http.operator = self.server.operator  # the task records and actions
            self.http.add_readiness_check("journal", self.journal.unwritable)
            self.http.start()
            self.say(f"metrics and dashboard on {self.http.url}")
        self.say(f"listening on {self.server.where} ({ready_details}pid {os.getpid()}, "
                 f"{self.orchestrator.worker_count} workers)")

    def wait_for_signal(self) -> int | None:
        """Sleep until SIGTERM or SIGINT (its number) or a dead server thread (None)."""
        while True:
            byte = self.clock.next_byte(self.wake_r)
            if byte in (signal.SIGTERM, signal.SIGINT):
                return byte
            if byte == _WAKE_THREAD_DIED:
                return None

    def drain(self, stopped_by: int | None, drain_timeout: float) -> StopReport | None:
        """Stop accepting, then ``o.stop(drain_timeout)`` on the drain thread while the
        connections stay open; a second signal shortens it to nothing. The drain's report
        (None: stop() itself failed)."""
        assert self.server is not None and self.registry is not None
        stopped_at = time.monotonic()
        why = ("a server thread died (see the log)" if stopped_by is None
               else signal.Signals(stopped_by).name)
        self.registry.stopping = True
        s = self.orchestrator.stats()
        self.say(f"{why}: stopping; draining {s.queued} queued and {s.running} running tasks "
                 f"(up to {drain_timeout:g} s)")
        self.server.stop_accepting()
        reports: list[StopReport] = []  # the drain thread's result
        drain = threading.Thread(
            target=_drain, args=(self.orchestrator, drain_timeout, self.wake_w, reports),
            name="taskorch-serve-drain", daemon=True)
        # daemon: the main thread joins it below; if stop() itself hung (a bug) the process
        # must still be able to exit.
        drain.start()
        self._wait_drained(stopped_by, stopped_at)
        drain.join()
        return reports[0] if reports else None

    def _wait_drained(self, stopped_by: int | None, stopped_at: float) -> None:
        while True:
            byte = self.clock.next_byte(self.wake_r)
            if byte == _WAKE_DRAINED:
                return
            if (byte == stopped_by == signal.SIGTERM
                    and time.monotonic() - stopped_at < SIGNAL_ECHO_WINDOW):
                continue  # the same signal again at once: an echo (SIGNAL_ECHO_WINDOW)
            if byte in (signal.SIGTERM, signal.SIGINT):
                self.say("second signal: cancelling queued tasks, terminating running ones")
                self.orchestrator.stop(timeout=0)  # shortens the drain's deadline

    def deliver_last_outcomes(self) -> None:
        """Every task has ended; its outcome reaches the connection once the journal has
        committed it (registry: the writer publishes after COMMIT). So: the schedules'
        callbacks (they queue records), the journal's ops queued so far, then the outboxes."""
        assert self.server is not None and self.journal is not None
        _wait_callbacks()
        if not self.journal.flush(OUTCOMES_TIMEOUT):
            log.warning("taskorch serve: the journal did not commit the last outcomes within "
                        "%g s; their clients may not get them (they run again after a restart "
                        "if not journaled)", OUTCOMES_TIMEOUT)
        self.server.close_connections()  # flush every outbox, then disconnect

    def say_stopped(self, report: StopReport | None) -> None:
        assert self.registry is not None
        if report is not None:
            left = (f"; {self.registry.left_for_next_start} left in the journal for the next "
                    "start" if self.registry.left_for_next_start else "")
            self.say(f"stopped ({'drained' if report.drained else 'drain timed out'}: "
                     f"{report.succeeded} succeeded, {report.failed} failed, "
                     f"{report.cancelled} cancelled, {report.abandoned} abandoned{left})")

    def close(self) -> None:
        """Everything, in order, whatever happened (idempotent parts; signals restored)."""
        assert self.server is not None and self.journal is not None
        if self.http is not None:
            self.http.close()
        self.server.close()
        self.orchestrator.stop(timeout=0)
        _wait_callbacks()
        self.journal.close()
        self.listener.close()
        for signum, handler in self.old_handlers.items():
            signal.signal(signum, handler)
        if self.old_wakeup_fd is not None:
            signal.set_wakeup_fd(self.old_wakeup_fd)
        os.close(self.wake_r)
        os.close(self.wake_w)
        if self.gc_was_enabled:
            gc.enable()


class _GcClock:
    """The main thread's wait for the wake pipe, with a full garbage collection every
    GC_INTERVAL seconds (see the module docstring), however often bytes arrive."""

    def __init__(self) -> None:
        self._due = time.monotonic() + GC_INTERVAL

    def next_byte(self, wake_r: int) -> int:
        while True:
            wait = self._due - time.monotonic()
            if wait <= 0:
                gc.collect()
                self._due = time.monotonic() + GC_INTERVAL
            elif select.select([wake_r], [], [], wait)[0]:
                return os.read(wake_r, 1)[0]


def _wait_callbacks() -> None:
    from taskorch._parent.callbacks import callback_runner
    callback_runner.wait_idle(CALLBACKS_TIMEOUT)  # (the schedules' outcomes queue journal records)


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    """The Python-level SIGTERM/SIGINT handler does nothing (so nothing that could take a lock
    the interrupted code holds): the byte the C-level handler writes to the wakeup fd is what
    wakes the main thread."""


def _drain(
    orchestrator: TaskOrchestrator, timeout: float, wake_w: int, out: list[StopReport]
) -> None:
    try:
        out.append(orchestrator.stop(timeout))
    except BaseException:
        log.exception("taskorch serve: stop() failed")
    finally:
        _wake(wake_w, _WAKE_DRAINED)


def _wake(wake_w: int, byte: int) -> None:
    try:
        os.write(wake_w, bytes([byte]))
    except BlockingIOError:  # the pipe is full: the main thread has plenty to wake up for
        pass
    except OSError:  # closed: serve() has returned
        pass
