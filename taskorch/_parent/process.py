"""Parent process, dispatcher thread only: the handle on one worker process.

Why not ``loky.ProcessPoolExecutor``: when one of its workers dies it marks its shared queues
"in a dirty state", fails every pending future with ``TerminatedWorkerError`` and kills every
other worker (``terminate_broken`` in loky's ``process_executor.py``). taskorch instead starts
each worker with loky's process context (start method "loky": fork+exec of a fresh
interpreter, safe in a threaded parent, no re-run of ``__main__``) and gives it a private
socketpair, so a death touches only that worker's channel and the task it was running.

A worker's exit is watched through a pidfd where the kernel has one (Linux >= 5.3): readable
exactly when the process ends, even if a grandchild started by the task inherited the worker's
other descriptors. Elsewhere loky's sentinel pipe serves.

Nothing here waits on loky's sentinel pipe (``Process.join``): a process the task started
inherits it, so a join could wait for that process rather than the worker (the dispatcher
stalled 5 s per crash that way, issue #11). ``reap()`` asks the kernel directly (``waitid``
with ``WNOWAIT``, then ``waitpid(WNOHANG)`` through loky's ``Popen.poll``, which keeps the
``Process`` object's ``exitcode`` right); when the exit fd was readable it never blocks.

Process tree. Each worker leads its own process group (``_worker.main`` does ``setpgid`` before
it runs any task), which holds every process its tasks start. Whenever the worker ends, the
group goes with it:

- crash, stop, recycling: ``reap()`` SIGKILLs the group while the worker is still an unreaped
  zombie (so its pid, the group's id, cannot have been reused yet);
- hard timeout: ``terminate()`` sends SIGTERM to the group (the task and its processes may
  clean up), ``kill()`` SIGKILL, and ``reap()`` once more;
- parent death, even by SIGKILL: the worker's guardian process kills the group (see
  ``_worker.main``).

Not covered: a process that leaves the group itself (``setsid()``, a daemon's double fork with
``setsid``) escapes the group kills. ``terminate()`` and ``kill()`` still kill such processes
while they are below the worker (from /proc, at that moment); after a crash or a parent death
they are orphans, out of reach, and live on. A worker still starting (before its ``setpgid``)
has no group yet: then only its pid is signalled, and it has run no task.

Sends never block for long: the dispatcher keeps the bytes handed to a worker and not yet
finished under ``PREFETCH_BYTES`` (far below the socket buffer), except for a single call to an
idle worker, which is reading. Without that bound, a parent blocked sending to a busy worker
and a worker blocked sending a large result to the parent would deadlock.
"""

from __future__ import annotations

import multiprocessing.process
import os
import select
import signal
import time
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

from loky.backend.context import get_context

from taskorch._framing import split_frames
from taskorch._parent.task import WorkItem
from taskorch._wire import RECALL, SHUTDOWN, Event, decode_events, encode_calls
from taskorch._worker.main import worker_main

#: Upper bound on payload bytes handed to a worker and not yet finished (see module docstring).
PREFETCH_BYTES = 64 * 1024
#: At most this many calls handed to one worker ahead of the one it runs. More amortizes the
#: round trip for tiny tasks; fewer limits how long a call can wait behind a slow one.
MAX_PREFETCH = 64
#: Prefetch only as many calls as fit in this much expected run time (from the worker's recent
#: task durations), so a task never waits long behind another worker's long task.
PREFETCH_SECONDS = 0.002
#: A worker that has reported nothing for this long is treated as busy with a long task: it
#: gets at most one call ahead, and while another worker idles, its calls not started are
#: recalled.
SLOW_AFTER = 0.02
#: The most the parent reads from a channel at once (frames are split from it in _wire).
RECEIVE_CHUNK = 256 * 1024
#: reap() of a worker that has not ended yet (only right after kill(): the kernel finishing a
#: SIGKILL) waits at most this long, then gives up (exit code None, "vanished").
REAP_TIMEOUT = 5.0


class WorkerProcess:
    """One worker process and its channel, as the dispatcher sees it."""

    def __init__(self, slot: int, process: Any, conn: Connection) -> None:
        self.slot = slot
        self.process = process  # a loky LokyProcess
        self.pid: int = process.pid
        self.conn = conn
        self._fd = conn.fileno()
        self._received = bytearray()  # read from the channel, not yet a complete frame
        self.exit_fd, self._owns_exit_fd = _exit_fd(process)
        self.started_at = time.monotonic()
        # Calls handed over and not finished, in the order the worker runs them; the head is
        # running once its Started event arrived (item.state RUNNING and item.worker is self).
        self.inflight: deque[WorkItem] = deque()
        self.inflight_bytes = 0
        self.handed = 0  # calls ever handed over (for max_tasks_per_worker)
        self.tasks_run = 0  # outcomes it sent (for the dashboard)
        self.events_seen = False  # has it ever reported anything (vs died while starting)
        self.ewma_seconds: float | None = None  # recent task duration, for the prefetch depth
        self.last_progress = self.started_at  # last event, or hand-over to it while idle
        self.recall_sent = False  # a RECALL is unanswered
        self.retiring: str | None = None  # why it takes no more calls (recycling, shutdown)
        self.replacement_started = False  # retiring, and its successor already spawned
        self.shutdown_sent = False
        self.channel_open = True  # calls may be sent (False after EOF or a failed send)
        self.eof = False  # its side of the channel is closed and every byte was read
        self.last_read = 0.0  # time.monotonic() of the last bytes read from it
        # Hard-timeout escalation: the item being killed for, and when to escalate to SIGKILL.
        self.kill_reason: str | None = None
        self.kill_item: WorkItem | None = None
        self.sigkill_at: float | None = None
        self.descendants: list[int] = []  # noted at SIGTERM, killed when it is gone

    @classmethod
    def spawn(cls, slot: int, default_policy: bytes, max_memory_mib: float | None) -> WorkerProcess:
        ctx = get_context("loky")
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        process = ctx.Process(
            target=worker_main,
            args=(child_conn, default_policy, os.getpid(), max_memory_mib),
            name=f"taskorch-worker-{slot}",
        )
        try:
            process.start()
        except BaseException:
            parent_conn.close()
            raise
        finally:
            child_conn.close()
        # taskorch reaps its workers itself. Left in multiprocessing's registry, they would be
        # joined, without a timeout, by multiprocessing's exit hook, which can run before ours
        # (atexit order is registration order, reversed) and would wait forever for workers
        # that only leave when we tell them to.
        multiprocessing.process._children.discard(process)  # type: ignore[attr-defined]
        return cls(slot, process, parent_conn)

    # -- capacity ----------------------------------------------------------------------------

    def room(self, now: float) -> int:
        """How many more calls to hand over now (see PREFETCH_* and SLOW_AFTER)."""
        if self.retiring is not None or self.kill_reason is not None or not self.channel_open:
            return 0
        if not self.events_seen:
            # Still starting (no Ready yet). Calls wait in the backlog rather than in its
            # socket: whichever worker is up first takes them, as from a shared queue, instead
            # of the first call waiting for the slower of two interpreters to boot.
            return 0
        ewma = self.ewma_seconds
        if ewma is None:
            depth = 1  # nothing known yet: no bet on how long tasks take
        elif self.inflight and now - self.last_progress > SLOW_AFTER:
            # Busy with a long task: one call waits in its inbox, so that the next task
            # starts without a round trip to us (on a loaded machine the round trip waits
            # for a CPU); if another worker idles meanwhile, the dispatcher recalls it.
            depth = 2
        else:
            depth = 2 + min(MAX_PREFETCH, int(PREFETCH_SECONDS / max(ewma, 1e-6)))
        return depth - len(self.inflight)

    def record_duration(self, seconds: float) -> None:
        ewma = self.ewma_seconds
        self.ewma_seconds = seconds if ewma is None else 0.8 * ewma + 0.2 * seconds

    # -- channel -----------------------------------------------------------------------------

    def send_calls(self, items: list[WorkItem], now: float) -> None:
        if not self.inflight:
            self.last_progress = now  # busy from now on
        self.conn.send_bytes(encode_calls(items))
        self.inflight.extend(items)
        self.inflight_bytes += sum(len(it.payload) for it in items)
        self.handed += len(items)

    def unstarted(self) -> int:
        """Calls handed over that it has not started (all but a started head)."""
        n = len(self.inflight)
        return n - 1 if n and self.inflight[0].started_on is self else n

    def send_recall(self) -> None:
        """Ask for the calls not started back (answered by a Recalled event)."""
        self.recall_sent = True
        try:
            self.conn.send_bytes(RECALL)
        except OSError:
            pass  # it is dying: its calls come back when its exit is handled

    def send_shutdown(self) -> None:
        """Ask the worker to exit once it has run what it holds (idempotent)."""
        if self.shutdown_sent:
            return
        self.shutdown_sent = True
        try:
            self.conn.send_bytes(SHUTDOWN)
        except OSError:
            pass  # it is dying anyway; its exit is noticed through exit_fd

    def receive(self) -> list[Event] | None:
        """The events of every complete frame that has arrived (call when the channel is
        readable: one read, which does not block then); None once the channel has ended."""
        try:
            data = os.read(self._fd, RECEIVE_CHUNK)
        except OSError:
            data = b""
        if not data:
            self.eof = True
            self.channel_open = False
            return None
        self.last_read = time.monotonic()
        self._received += data
        return decode_events(split_frames(self._received))

    def mid_frame(self) -> bool:
        """Part of a frame has arrived, not all of it (a large result, say)."""
        return bool(self._received)

    def drain(self) -> list[Event]:
        """After the process ended: every complete frame it managed to send. (Reads until EOF,
        or until nothing more is there: a process the task started may hold the channel.)"""
        events: list[Event] = []
        while not self.eof:
            try:
                if not self.conn.poll():
                    break
            except (EOFError, OSError):
                break
            events += self.receive() or []
        self.eof = True
        self.channel_open = False
        return events

    # -- process -----------------------------------------------------------------------------

    def terminate(self) -> None:
        """SIGTERM the worker's process group: the task and the processes it started may clean
        up; the caller escalates to kill(). Processes below the worker that left its group are
        noted now and killed once it is gone (see reap())."""
        self.descendants = _descendants(self.pid)
        self._signal_group(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL the worker's process group, and the processes below the worker that left it."""
        for pid in _descendants(self.pid):
            _kill_pid(pid)
        self._signal_group(signal.SIGKILL)

    def ended(self) -> bool:
        """Whether the process has ended, without reaping it (it stays a zombie until reap())."""
        if self.process._popen.returncode is not None:
            return True
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True  # reaped by someone else (SIGCHLD set to SIG_IGN in the application)

    def reap(self, timeout: float = REAP_TIMEOUT) -> int | None:
        """The exit code once the process has ended (negative: killed by that signal); None if
        it is still running after ``timeout``. Kills what is left of its process group first.
        Returns at once when the exit fd was readable; waits only for a process still dying
        (just after kill()), on its pidfd, never on a pipe a task's process may hold."""
        if not self._wait_ended(timeout):
            return None
        # The group's id is the worker's pid, reserved until the zombie is reaped just below.
        self._signal_group(signal.SIGKILL)
        for pid in self.descendants:  # a terminated task's own processes must not outlive it
            _kill_pid(pid)
        self.descendants = []
        code: int | None = self.process.exitcode  # waitpid(WNOHANG) in loky's Popen.poll
        return code

    def _wait_ended(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        poller = None
        while not self.ended():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._owns_exit_fd:  # a pidfd: readable once the process has ended
                if poller is None:
                    poller = select.poll()  # not select(): the fd may be above FD_SETSIZE
                    poller.register(self.exit_fd, select.POLLIN)
                poller.poll(remaining * 1000)
            else:
                time.sleep(min(remaining, 0.001))  # loky's sentinel may be held by a grandchild
        return True

    def _signal_group(self, sig: signal.Signals) -> None:
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            if self.process._popen.returncode is None:  # not reaped: the pid is still its own
                _kill_pid(self.pid, sig)  # not leading its group yet: still starting, no task run
        except OSError:
            pass

    def close(self) -> None:
        """Release the channel and the exit fd (after reap()). loky's Popen closes its
        sentinel pipe only when the Popen object is freed (a ``util.Finalize``; it has no
        ``close()``): drop our process handle's reference to it, so that the pipe closes now
        and not at some later garbage collection."""
        self.conn.close()
        if self._owns_exit_fd:
            self._owns_exit_fd = False  # (idempotent: a fork may copy a half-closed worker)
            os.close(self.exit_fd)
        self.process._popen = None

    def forget_in_forked_child(self) -> None:
        """In a forked child: close this process's copies of the channel and the exit fd.
        No signal, no reap: the worker is the parent's."""
        self.conn.close()
        if self._owns_exit_fd:
            os.close(self.exit_fd)
            self._owns_exit_fd = False
        self.inflight.clear()

    def __repr__(self) -> str:
        return f"<WorkerProcess slot={self.slot} pid={self.pid} inflight={len(self.inflight)}>"


def _kill_pid(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid``, from /proc (Linux); empty where there is none."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])  # the name may hold spaces
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _exit_fd(process: Any) -> tuple[int, bool]:
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is not None:
        try:
            return pidfd_open(process.pid), True
        except OSError:
            pass
    return process.sentinel, False
