"""Task functions for the tests, importable by worker processes, and the handshakes they use.

Handshakes, never sleeps: a task announces that it started by creating a file (and writes its
worker's pid in it), and waits for its release on a FIFO that the test writes to; a task that
must hang waits on a FIFO nobody writes. The test side polls for files to a deadline
(``wait_until``): the deadline only catches deadlocks, it orders nothing.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # (not imported in the workers, which import this module)
    import subprocess

#: Every deadline of the suite is multiplied by this (TASKORCH_TEST_SCALE, default 1): on a
#: busy or slow machine, TASKORCH_TEST_SCALE=3 gives each deadlock guard three times as long.
#: Deadlines only catch deadlocks, so a larger scale never changes what a test asserts; the
#: timings a test sets up on purpose (a task's per-attempt timeout) are never scaled.
SCALE = float(os.environ.get("TASKORCH_TEST_SCALE") or 1)


def scaled(seconds: float) -> float:
    """A deadline of ``seconds`` on an idle machine, times ``SCALE``."""
    return seconds * SCALE


DEADLOCK_TIMEOUT = scaled(30.0)


def wait_until(
    predicate: Callable[[], Any], timeout: float = 30.0, what: str = ""
) -> Any:
    """Poll ``predicate`` until it is true; fail after ``scaled(timeout)`` seconds."""
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(0.002)


def stop_on_sigterm(proc: subprocess.Popen[Any], output: Callable[[], str]) -> int:
    """SIGTERM a server process (unless it exited) and return its exit code; one that has not
    exited within DEADLOCK_TIMEOUT is killed, and the test fails with its ``output()``."""
    import subprocess

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(DEADLOCK_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the server did not stop on SIGTERM:\n{output()}") from None


def sigstop(pid: int) -> None:
    """SIGSTOP process ``pid`` and wait until every thread of it has stopped (``kill()``
    returns before they do: one may still be running on another CPU)."""
    os.kill(pid, signal.SIGSTOP)

    def stopped() -> bool:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:  # a thread that ended
                continue
        return bool(states) and all(state in ("T", "t") for state in states)

    wait_until(stopped, what=f"every thread of process {pid} to stop")


class Gate:
    """A started-file plus a release FIFO in ``directory``, for one blocking task."""

    def __init__(self, directory: Path, name: str) -> None:
        self.started = directory / f"{name}.started"
        self.release_fifo = directory / f"{name}.release"
        os.mkfifo(self.release_fifo)

    def wait_started(self) -> int:
        """Wait until the task started; return its worker's pid."""
        wait_until(lambda: self.started.exists() and self.started.read_text(),
                   what=f"{self.started}")
        return int(self.started.read_text())

    def release(self, value: str = "go") -> None:
        with open(self.release_fifo, "w") as f:  # blocks until the task opens it for reading
            f.write(value)


# -- tasks (run in workers) --------------------------------------------------------------------


def identity(x: Any) -> Any:
    return x


def square(x: int) -> int:
    return x * x


def add(a: int, b: int = 0, *, policy: str = "") -> tuple[int, str]:
    return a + b, policy


def getpid() -> int:
    return os.getpid()


def announce(started: str) -> None:
    tmp = started + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, started)


def blocker(started: str, release_fifo: str) -> str:
    """Announce the start, then block until the test writes to the release FIFO."""
    announce(started)
    with open(release_fifo) as f:
        return f.read()


def hang(started: str, never_fifo: str) -> None:
    """Announce the start, then wait forever (a FIFO no one writes); interruptible by signals."""
    announce(started)
    with open(never_fifo) as f:
        f.read()


def hang_with_signals_blocked(started: str, never_fifo: str) -> None:
    """Block SIGALRM (the in-process timeout), then wait in C: only the parent's hard kill
    (SIGTERM, whose default action needs no Python code) ends this."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    announce(started)
    fd = os.open(never_fifo, os.O_RDONLY)  # C-level wait, no Python handler can run
    os.read(fd, 1)


def hang_ignoring_sigterm(started: str, never_fifo: str) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    announce(started)
    fd = os.open(never_fifo, os.O_RDONLY)
    os.read(fd, 1)


def has_module(name: str) -> bool:
    """Whether the process running this task has imported ``name``."""
    return name in sys.modules


def fail_until(counter: str, succeed_on: int) -> int:
    """Raise until called for the ``succeed_on``-th time (counted in a file)."""
    path = Path(counter)
    n = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(n))
    if n < succeed_on:
        raise ConnectionError(f"attempt {n} failed")
    return n


def fail_then_block(counter: str, fails: int, started: str, release_fifo: str) -> str:
    """Raise for the first ``fails`` calls (counted in a file), then behave as ``blocker``."""
    path = Path(counter)
    n = int(path.read_text()) + 1 if path.exists() else 1
    path.write_text(str(n))
    if n <= fails:
        raise ConnectionError(f"attempt {n} failed")
    return blocker(started, release_fifo)


def read_text(path: str) -> str:
    return Path(path).read_text()


def exit_first_time(marker: str, value: Any) -> Any:
    """os._exit the first time (marker file absent), succeed afterwards."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os._exit(3)
    return value


def raise_value_error(message: str) -> None:
    raise ValueError(message)


class NeedsTwoArgs(Exception):
    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")  # unpickles with one arg: fails


def raise_unpicklable() -> None:
    raise NeedsTwoArgs("x", "y")


def call_sys_exit(code: int) -> None:
    sys.exit(code)


def raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


def return_unpicklable() -> Any:
    import threading

    return threading.Lock()


def crash_os_exit(code: int = 7) -> None:
    os._exit(code)


def crash_segfault() -> None:
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def write_file(path: str, text: str) -> str:
    Path(path).write_text(text)
    return path


async def async_add(a: int, b: int) -> int:
    import asyncio

    await asyncio.sleep(0)
    return a + b


async def async_hang(started: str, never_fifo: str) -> None:
    import asyncio

    announce(started)
    await asyncio.Event().wait()  # never set


def allocate_mib(mib: int) -> int:
    global _hoard
    _hoard = bytearray(mib * 1024 * 1024)
    for i in range(0, len(_hoard), 4096):
        _hoard[i] = 1
    return os.getpid()


_hoard: bytearray | None = None


class ExplodesOnUnpickle:
    """Unpickling this in the worker calls ``action``: a crash in the 'unpickle the call' phase."""

    def __init__(self, action: str) -> None:
        self.action = action

    def __reduce__(self) -> Any:
        return (_explode, (self.action,))


class SlowToUnpickle:
    """Unpickling this spins on the CPU for ``seconds`` (it arrives as ``seconds``)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __reduce__(self) -> Any:
        return (busy_identity, (self.seconds, self.seconds))


class ExplodesOnPickle:
    """Pickling this (a task's result, in the worker) calls ``action``."""

    def __init__(self, action: str) -> None:
        self.action = action

    def __reduce__(self) -> Any:
        _explode(self.action)
        raise AssertionError("unreachable")


def _explode(action: str) -> Any:
    if action == "raise":
        raise RuntimeError("exploded")
    if action == "exit":
        sys.exit(5)
    if action == "os_exit":
        os._exit(6)
    if action == "segfault":
        crash_segfault()
    if action == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise AssertionError(action)


def return_exploding(action: str) -> ExplodesOnPickle:
    return ExplodesOnPickle(action)


def takes(obj: Any) -> str:
    return type(obj).__name__


def busy_identity(x: Any, seconds: float) -> Any:
    """Spin on the CPU for ``seconds``, then return ``x``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return x


def spawn_child_then_hang(started: str, never_fifo: str, child_pid_file: str) -> None:
    """Start a grandchild process, then hang in C with SIGALRM blocked (only a hard kill
    ends it)."""
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    Path(child_pid_file).write_text(str(child.pid))
    hang_with_signals_blocked(started, never_fifo)


# -- outcomes whose unpickling in the parent is user code (tests/test_futures.py) ---------------

#: Names of the parent's threads that unpickled a result or exception below, in order.
UNPICKLED_IN: list[str] = []


def _unpickled_after_release(value: Any, started: str, release_fifo: str) -> Any:
    """Runs in the parent, while it unpickles: note the thread, announce, wait for release."""
    import threading

    UNPICKLED_IN.append(threading.current_thread().name)
    announce(started)
    with open(release_fifo) as f:
        f.read()
    return value


class BlocksOnUnpickle:
    """Pickled in the worker at no cost; unpickling it (in the parent) blocks on a Gate."""

    def __init__(self, value: Any, started: str, release_fifo: str) -> None:
        self.args = (value, started, release_fifo)

    def __reduce__(self) -> Any:
        return (_unpickled_after_release, self.args)


def return_blocks_on_unpickle(value: Any, started: str, release_fifo: str) -> BlocksOnUnpickle:
    return BlocksOnUnpickle(value, started, release_fifo)


def _error_unpickled_after_release(
    message: str, started: str, release_fifo: str, parent: int
) -> ValueError:
    if os.getpid() != parent:  # the worker checks that the exception round-trips: not there
        return ValueError(message)
    return ValueError(_unpickled_after_release(message, started, release_fifo))


class ErrorBlocksOnUnpickle(Exception):
    """A task's exception whose unpickling in process ``parent`` blocks on a Gate; it arrives
    as a ValueError(message)."""

    def __reduce__(self) -> Any:
        return (_error_unpickled_after_release, self.args)


def raise_blocks_on_unpickle(message: str, started: str, release_fifo: str, parent: int) -> None:
    raise ErrorBlocksOnUnpickle(message, started, release_fifo, parent)


def return_exploding_on_unpickle(action: str) -> ExplodesOnUnpickle:
    """A result that pickles in the worker and explodes (``action``) when the parent
    unpickles it."""
    return ExplodesOnUnpickle(action)


def payload_size(data: bytes) -> int:
    return len(data)


# -- processes a task leaves behind (tests/test_process_tree.py) -------------------------------


def _write_atomically(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _fork_orphan(setsid: bool = False) -> int:
    """Fork a grandchild through a middle process that exits at once (the classic daemon
    double fork), so the grandchild is reparented away from this process: /proc no longer
    shows it below the worker. With ``setsid`` it also leaves the worker's process group and
    session. It keeps every descriptor the worker had (the channel, loky's sentinel pipe) and
    waits for signals forever. Returns its pid once it exists."""
    r, w = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(r)
            if setsid:
                os.setsid()
            grandchild = os.fork()
            if grandchild == 0:
                os.close(w)
                try:
                    while True:
                        signal.pause()
                finally:
                    os._exit(0)
            os.write(w, str(grandchild).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 64):
        data += chunk
    os.close(r)
    os.waitpid(middle, 0)
    return int(data)


def orphan_then_exit(pid_file: str, code: int, setsid: bool = False) -> None:
    """Leave an orphaned grandchild (see ``_fork_orphan``), report its pid, then crash."""
    _write_atomically(pid_file, str(_fork_orphan(setsid)))
    os._exit(code)


def orphan_then_hang(pid_file: str, started: str, never_fifo: str) -> None:
    """Leave an orphaned grandchild, then hang where only the parent's hard kill ends it."""
    _write_atomically(pid_file, str(_fork_orphan()))
    hang_with_signals_blocked(started, never_fifo)


def start_popen_child() -> int:
    """Start a child process with subprocess and return at once, leaving it running."""
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return child.pid


def start_descendants_then_block(pids_file: str, started: str, release_fifo: str) -> str:
    """Start a Popen child and an orphaned grandchild, write their pids to ``pids_file``, then
    block like ``blocker``."""
    pids = [start_popen_child(), _fork_orphan()]
    _write_atomically(pids_file, " ".join(map(str, pids)))
    return blocker(started, release_fifo)


def clear_pdeathsig_then_hold_gil(started: str) -> None:
    """Clear this worker's PR_SET_PDEATHSIG, then wait in C *holding the GIL* (a PyDLL call
    keeps it): no thread of the worker runs Python code until a signal ends the wait."""
    ctypes.CDLL(None, use_errno=True).prctl(1, 0, 0, 0, 0)  # PR_SET_PDEATHSIG, none
    announce(started)
    ctypes.PyDLL(None).pause()


def process_groups() -> tuple[int, int, int]:
    """(this worker's pid, its process group, the group of a child it starts)."""
    import subprocess

    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpgrp())"],
                           capture_output=True, text=True, check=True)
    return os.getpid(), os.getpgrp(), int(child.stdout)


# -- Executor and fork tests -------------------------------------------------------------------


def print_line(text: str) -> None:
    """Print ``text`` on the worker's stdout (inherited from the parent) and flush it."""
    print(text, flush=True)


def mark(path: str) -> str:
    """Leave a file behind: proof that the task ran."""
    Path(path).write_text(str(os.getpid()))
    return path


def record(path: str, value: Any) -> Any:
    """Append ``value`` as a line to ``path`` (one write with O_APPEND: lines never mix)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{value}\n".encode())
    finally:
        os.close(fd)
    return value


def log_start(path: str, label: str) -> str:
    """Append ``label`` and the wall time to the file ``path`` (one line per start)."""
    with open(path, "a") as f:
        f.write(f"{label} {time.time()!r}\n")
    return label


def logged(path: str) -> list[tuple[str, float]]:
    """What ``log_start`` wrote, in order."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [(label, float(t)) for label, t in (line.split() for line in f)]


def hang_in_c_with_signals_blocked(started: str) -> None:
    """Ignore SIGTERM, block the signals a worker could catch (SIGTERM, SIGALRM, SIGINT),
    then wait in C (``pause()``, which only a handled signal ends): only SIGKILL ends this."""
    import ctypes

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGALRM, signal.SIGINT})
    announce(started)
    ctypes.CDLL(None).pause()


def exclusive(lock_path: str, started: str = "", release_fifo: str = "") -> str:
    """Hold ``lock_path`` (created exclusively: a second holder at once raises) while it runs;
    with ``started``, announce and block on ``release_fifo`` (a ``Gate``) in between."""
    fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if started:
            announce(started)
            with open(release_fifo) as f:
                f.read()
        return lock_path
    finally:
        os.close(fd)
        os.unlink(lock_path)


def exclusive_logged(lock_path: str, log_path: str, started: str = "",
                     release_fifo: str = "") -> str:
    """``exclusive``, with a line appended to ``log_path`` (O_APPEND: lines never interleave)
    as it starts, "+ pid", and as it ends, "- pid": the running sum over the log, in order, is
    how many ran at once, as the tasks themselves saw it. A little work in between (hashing)
    gives an overlap, were there one, the time to show."""
    import hashlib

    def log(line: str) -> None:
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, f"{line} {os.getpid()}\n".encode())
        finally:
            os.close(fd)

    log("+")
    try:
        hashlib.sha256(b"x" * 1_000_000).hexdigest()
        return exclusive(lock_path, started, release_fifo)
    finally:
        log("-")


def most_at_once(log_path: str) -> int:
    """The most ``exclusive_logged`` tasks that ran at once, by its log."""
    running = most = 0
    for line in Path(log_path).read_text().splitlines():
        running += 1 if line.startswith("+") else -1
        most = max(most, running)
    return most


def report_then_block(started: str, release_fifo: str) -> str:
    """``taskorch.progress(3, 10, "three")``, announce, block until released, then a report
    that the rate limit drops (the first one of a task is always sent)."""
    import taskorch

    taskorch.progress(3, 10, "three")
    taskorch.progress(4, 10, "dropped: within the interval")
    announce(started)
    with open(release_fifo) as f:
        return f.read()



def bytes_of(n: int) -> bytes:
    """A result of ``n`` bytes, made in the worker (nothing that large travels in)."""
    return b"x" * n


def orphan_with_setsid(pid_file: str) -> int:
    """Leave a grandchild that left the worker's group and session (``_fork_orphan``), report
    its pid, and return normally."""
    pid = _fork_orphan(setsid=True)
    _write_atomically(pid_file, str(pid))
    return pid
