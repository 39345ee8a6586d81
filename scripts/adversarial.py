"""Adversarial checks of taskorch, bounded in time, on this machine only (loopback and Unix
sockets): the attacks of the hardening issue, re-run, each printing what it measured.

    .venv/bin/python scripts/adversarial.py            # all, about a minute
    .venv/bin/python scripts/adversarial.py slow_drip  # one (names below)

Each scenario starts what it attacks itself (an orchestrator, or `taskorch serve` in a
subprocess) and stops it; every loop is bounded in count and time. Figures are measurements
on a noisy machine, not assertions; the regression tests live in tests/.
"""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import psutil

import taskorch
from taskorch import Policy, TaskOrchestrator

FAST = Policy(retries=0, timeout=None)
PYTHON = sys.executable


# -- tasks (sent by value: this file is __main__) ------------------------------------------------


def noop() -> None:
    return None


def fork_then_die(hold_seconds: float) -> None:
    """Leave a grandchild that keeps the worker's inherited descriptors (its channel, loky's
    sentinel pipe) for ``hold_seconds``, in a session of its own (so that no process-group
    kill reaches it), then crash."""
    middle = os.fork()
    if middle == 0:
        os.setsid()
        if os.fork() == 0:
            time.sleep(hold_seconds)
        os._exit(0)
    os.waitpid(middle, 0)
    os._exit(3)


def start_popen_child(pid_file: str) -> int:
    child = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(60)"])
    Path(pid_file).write_text(str(child.pid))
    return child.pid


class SlowToUnpickle:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __reduce__(self) -> Any:
        return (_slow_rebuild, (self.seconds,))


def _slow_rebuild(seconds: float) -> str:
    if os.environ.get("TASKORCH_ADVERSARIAL_PARENT") == str(os.getpid()):
        time.sleep(seconds)  # only in the parent: the worker pickles, the parent unpickles
    return "rebuilt"


def slow_result(seconds: float) -> SlowToUnpickle:
    return SlowToUnpickle(seconds)


def takes(blob: bytes) -> int:
    return len(blob)


# -- helpers ---------------------------------------------------------------------------------


def serve(tmp: Path, *extra: str) -> tuple[subprocess.Popen[bytes], Any]:
    """`taskorch serve` on a free loopback port; returns the process and its address."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = tmp / "authkey"
    # Its log goes to a file: a pipe nobody reads would fill with the attack's warnings and
    # block the server's logging (and so the server) once 64 KiB are unread.
    log_file = open(tmp / "serve.log", "wb")
    proc = subprocess.Popen(
        [PYTHON, "-m", "taskorch", "serve", "--tcp", f"127.0.0.1:{port}", "--authkey-file",
         str(key), "--journal", str(tmp / "journal.sqlite3"), "--workers", "2", "--retries",
         "0", *extra],
        stdout=subprocess.DEVNULL, stderr=log_file,
    )
    log_file.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with taskorch.connect(("127.0.0.1", port), authkey_file=key, timeout=1):
                return proc, (("127.0.0.1", port), key)
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(f"taskorch serve exited: {(tmp / 'serve.log').read_text()}")
            time.sleep(0.05)
    raise RuntimeError("taskorch serve did not come up in 30 s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def report(name: str, **figures: Any) -> None:
    print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in figures.items()), flush=True)


# -- the scenarios --------------------------------------------------------------------------


def slow_drip(tmp: Path) -> None:
    """300 connections that send a length header then a byte a second, never a key; a good
    client connects every 0.2 s meanwhile. How many good connections are refused?"""
    proc, (address, key) = serve(tmp)
    attackers: list[socket.socket] = []
    stop = threading.Event()

    def drip() -> None:
        while not stop.wait(1.0):
            for s in list(attackers):
                try:
                    s.send(b"x")
                except OSError:
                    attackers.remove(s)

    try:
        for _ in range(300):
            s = socket.create_connection(address, timeout=2)
            s.send(b"\x00\x00\x00\x40")  # a 64-byte frame is coming...
            attackers.append(s)
        dripper = threading.Thread(target=drip, daemon=True)
        dripper.start()
        refused = tried = 0
        errors: set[str] = set()
        end = time.monotonic() + 15
        while time.monotonic() < end:
            tried += 1
            try:
                with taskorch.connect(address, authkey_file=key, timeout=5) as client:
                    client.stats()
            except Exception as exc:  # noqa: BLE001 - counted and described
                refused += 1
                errors.add(f"{type(exc).__name__}: {exc}"[:120])
            time.sleep(0.2)
        alive = sum(1 for s in attackers if _still_open(s))
        report("slow_drip", good_connections_refused=f"{refused} of {tried}",
               attackers_still_connected_after_15s=f"{alive} of 300",
               errors=sorted(errors) or "none")
    finally:
        stop.set()
        for s in attackers:
            s.close()
        stop_server(proc)


def _still_open(s: socket.socket) -> bool:
    try:
        s.setblocking(False)
        return s.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def crash_with_fork(tmp: Path) -> None:
    """A task forks a grandchild that keeps the worker's descriptors for 8 s, then its worker
    dies; no-op tasks stream meanwhile. The longest gap between two completions is the stall."""
    with TaskOrchestrator(worker_count=2, max_backlog=10_000, policy=FAST) as o:
        o.run(noop).result(30)  # type: ignore[union-attr]
        done: list[float] = []
        lock = threading.Lock()

        def on_done(_: Any) -> None:
            with lock:
                done.append(time.monotonic())

        crashed_at = time.monotonic()
        crashing = o.run(fork_then_die, 8.0)
        assert crashing is not None
        resolved_at: list[float] = []
        crashing.add_done_callback(lambda _: resolved_at.append(time.monotonic()))
        end = time.monotonic() + 3
        while time.monotonic() < end:
            f = o.run(noop)
            if f is not None:
                f.add_done_callback(on_done)
            time.sleep(0.002)
        crashing.exception(30)
        o.stop(30)
    resolved = resolved_at[0] - crashed_at
    gaps = [b - a for a, b in zip(done, done[1:])]
    report("crash_with_fork", longest_stall_ms=f"{max(gaps) * 1000:.0f}",
           crash_resolved_after_ms=f"{resolved * 1000:.0f}", tasks_completed=len(done))


def slow_unpickle(tmp: Path) -> None:
    """22 tasks whose results take 5 s each to unpickle in the parent; stop(timeout=0.5)."""
    os.environ["TASKORCH_ADVERSARIAL_PARENT"] = str(os.getpid())
    o = TaskOrchestrator(worker_count=2, max_backlog=100, policy=FAST)
    futures = [o.run(slow_result, 5.0) for _ in range(22)]
    unrelated_started = time.monotonic()
    unrelated = o.run(noop)
    assert unrelated is not None
    unrelated.result(60)
    unrelated_s = time.monotonic() - unrelated_started
    started = time.monotonic()
    o.stop(timeout=0.5)
    late = time.monotonic() - started - 0.5
    unresolved = sum(not f.done() for f in futures if f is not None)
    report("slow_unpickle", stop_late_by_s=f"{late:.2f}",
           futures_unresolved_at_return=f"{unresolved} of 22",
           unrelated_task_s=f"{unrelated_s:.2f}")


def finished_futures(tmp: Path) -> None:
    """What finished futures keep alive: fds (200 tasks, a new worker each) and memory (50
    tasks with 4 MiB arguments)."""
    me = psutil.Process()
    fds_before = me.num_fds()
    with TaskOrchestrator(worker_count=2, max_tasks_per_worker=1, max_backlog=300,
                          policy=FAST) as o:
        held = [o.run(noop) for _ in range(200)]
        for f in held:
            f.result(60)  # type: ignore[union-attr]
    fds_held = me.num_fds() - fds_before
    rss_before = me.memory_info().rss
    with TaskOrchestrator(worker_count=2, max_backlog=100, policy=FAST) as o:
        held2 = [o.run(takes, os.urandom(4 << 20)) for _ in range(50)]
        for f in held2:
            f.result(60)  # type: ignore[union-attr]
    rss_held = (me.memory_info().rss - rss_before) / 2**20
    report("finished_futures", fds_held_by_200=fds_held,
           rss_held_by_50x4MiB=f"{rss_held:.0f} MiB")
    del held, held2


def tcp_round_trip(tmp: Path) -> None:
    """The median time of a no-op run() + result() through `taskorch serve --tcp`."""
    proc, (address, key) = serve(tmp)
    try:
        with taskorch.connect(address, authkey_file=key) as client:
            for _ in range(20):
                client.run(noop).result(30)  # type: ignore[union-attr]
            times = []
            for _ in range(200):
                t0 = time.perf_counter()
                client.run(noop).result(30)  # type: ignore[union-attr]
                times.append(time.perf_counter() - t0)
        report("tcp_round_trip", median_ms=f"{statistics.median(times) * 1000:.2f}",
               p90_ms=f"{sorted(times)[int(len(times) * 0.9)] * 1000:.2f}")
    finally:
        stop_server(proc)


def leftovers_after_stop(tmp: Path) -> None:
    """A task starts a subprocess and returns; after stop(), is it still alive?"""
    pid_file = tmp / "popen.pid"
    with TaskOrchestrator(worker_count=1, policy=FAST) as o:
        o.run(start_popen_child, str(pid_file)).result(30)  # type: ignore[union-attr]
    pid = int(pid_file.read_text())
    alive = _wait_gone([pid], 5)
    report("leftovers_after_stop", processes_left=len(alive))
    _kill(alive)


PARENT_SCRIPT = """
import os, sys, time
from pathlib import Path
from taskorch import Policy, TaskOrchestrator

def fork_and_hold(path):
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    Path(path).write_text(str(pid))
    time.sleep(60)

o = TaskOrchestrator(worker_count=2, policy=Policy(retries=0, timeout=None))
o.run(fork_and_hold, sys.argv[1])
while not Path(sys.argv[1]).exists():
    time.sleep(0.01)
Path(sys.argv[2]).write_text(" ".join(map(str, o.worker_pids())))
time.sleep(60)
"""


def leftovers_after_parent_sigkill(tmp: Path) -> None:
    """An application whose task forked a grandchild is SIGKILLed: what outlives it?"""
    script = tmp / "app.py"
    script.write_text(PARENT_SCRIPT)
    grandchild_file, workers_file = tmp / "grandchild.pid", tmp / "workers.pids"
    app = subprocess.Popen([PYTHON, str(script), str(grandchild_file), str(workers_file)])
    deadline = time.monotonic() + 30
    while not workers_file.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    descendants = [p.pid for p in psutil.Process(app.pid).children(recursive=True)]
    app.kill()
    app.wait()
    alive = _wait_gone(descendants, 5)
    report("leftovers_after_parent_sigkill",
           processes_left=f"{len(alive)} of {len(descendants)} descendants",
           left=[_describe(pid) for pid in alive] or "none")
    _kill(alive)


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    end = time.monotonic() + seconds
    while True:
        alive = [pid for pid in pids if _alive(pid)]
        if not alive or time.monotonic() > end:
            return alive
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _describe(pid: int) -> str:
    try:
        return f"{pid} ({' '.join(psutil.Process(pid).cmdline())[:60]})"
    except psutil.Error:
        return str(pid)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def make_bytes(n: int) -> bytes:
    return b"x" * n


def oversized_integer(tmp: Path) -> None:
    """An honest client streams 3,000 tasks while another asks for result(2**63) 50 times:
    how many honest tasks resolve, how many hostile requests are refused?"""
    proc, (address, key) = serve(tmp, "--backlog", "5000")
    try:
        with taskorch.connect(address, authkey_file=key) as honest, \
                taskorch.connect(address, authkey_file=key) as hostile:
            futures = [honest.run(noop) for _ in range(3000)]
            refused = 0
            for _ in range(50):
                try:
                    hostile.result(2**63, timeout=10)
                except ValueError:
                    refused += 1
            done = sum(1 for f in futures if f is not None and _resolves(f, 60))
        report("oversized_integer", honest_resolved=f"{done}/3000", hostile_refused=refused)
    finally:
        stop_server(proc)


def _resolves(future: Any, timeout: float) -> bool:
    try:
        future.result(timeout)
    except Exception:  # noqa: BLE001 - a failure resolves it too; a timeout does not
        return bool(future.done())
    return True


def lock_file_deleted(tmp: Path) -> None:
    """The journal's lock file is deleted while its server runs: does a second server start?"""
    proc, _ = serve(tmp)
    try:
        os.unlink(tmp / "journal.sqlite3.lock")
        second = subprocess.run(
            [PYTHON, "-m", "taskorch", "serve", "--socket", str(tmp / "s2.sock"),
             "--authkey-file", str(tmp / "authkey"), "--journal", str(tmp / "journal.sqlite3")],
            capture_output=True, text=True, timeout=30)
        report("lock_file_deleted", second_server_exit=second.returncode,
               refused="in use by another" in second.stderr)
    finally:
        stop_server(proc)


def damaged_journal(tmp: Path) -> None:
    """300 tasks accepted behind a blocked worker, kill -9, then the -wal deleted or garbled,
    or the file emptied: is the restart refused, naming the tasks lost?"""
    for damage in ("delete -wal", "garble -wal", "empty file"):
        where = tmp / damage.replace(" ", "_")
        where.mkdir()
        proc, (address, key) = serve(where, "--backlog", "1000")
        try:
            with taskorch.connect(address, authkey_file=key) as client:
                client.run(time.sleep, 600)
                client.run(time.sleep, 600)
                for f in [client.run(noop) for _ in range(300)]:
                    assert f is not None
                    client.accepted(f, 30)
        finally:  # the kill -9 of the scenario, and the cleanup if it failed before it
            proc.kill()
            proc.wait()
        journal, wal = where / "journal.sqlite3", where / "journal.sqlite3-wal"
        if damage == "garble -wal":
            with open(wal, "r+b") as fh:
                fh.seek(wal.stat().st_size // 2)
                fh.write(os.urandom(4096))
        else:
            wal.unlink()
            if damage == "empty file":
                journal.write_bytes(b"")
        again = subprocess.run(
            [PYTHON, "-m", "taskorch", "serve", "--socket", str(where / "s.sock"),
             "--authkey-file", str(key), "--journal", str(journal)],
            capture_output=True, text=True, timeout=30)
        said = [line for line in again.stderr.splitlines() if "would be lost" in line]
        report("damaged_journal", damage=damage, exit=again.returncode,
               message=(said[0][:160] if said else "(no loss named)"))


def stalled_reader(tmp: Path) -> None:
    """A client submits 300 tasks returning 1 MiB each and never reads (SIGSTOP-like): how
    much does the server's RSS grow (default --max-outbox-bytes, 64 MiB)?"""
    from multiprocessing.connection import Client as RawClient

    from taskorch._service.protocol import submit_frame
    from taskorch._wire import encode_call

    proc, (address, key) = serve(tmp, "--backlog", "1000")
    raw = None
    try:
        server = psutil.Process(proc.pid)
        before = server.memory_info().rss
        raw = RawClient(address, authkey=key.read_bytes())
        call = encode_call(make_bytes, (1 << 20,), {})
        import pickle

        for req in range(1, 301):
            raw.send_bytes(pickle.dumps(tuple(submit_frame(
                req, call, None, wait=False, client=b"s" * 16, retry=False, credit=False))))
        peak = before
        with taskorch.connect(address, authkey_file=key) as observer:
            deadline = time.monotonic() + 120
            while observer.stats().succeeded < 300 and time.monotonic() < deadline:
                peak = max(peak, server.memory_info().rss)
                time.sleep(0.1)
        for _ in range(20):
            peak = max(peak, server.memory_info().rss)
            time.sleep(0.1)
        report("stalled_reader", rss_before_mib=before >> 20, rss_peak_mib=peak >> 20,
               outcomes_mib=300)
    finally:
        if raw is not None:
            raw.close()
        stop_server(proc)


SCENARIOS: dict[str, Callable[[Path], None]] = {
    "slow_drip": slow_drip,
    "crash_with_fork": crash_with_fork,
    "slow_unpickle": slow_unpickle,
    "finished_futures": finished_futures,
    "tcp_round_trip": tcp_round_trip,
    "leftovers_after_stop": leftovers_after_stop,
    "leftovers_after_parent_sigkill": leftovers_after_parent_sigkill,
    "oversized_integer": oversized_integer,
    "lock_file_deleted": lock_file_deleted,
    "damaged_journal": damaged_journal,
    "stalled_reader": stalled_reader,
}


def main(argv: list[str]) -> int:
    names = argv or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}",
              file=sys.stderr)
        return 2
    for name in names:
        with tempfile.TemporaryDirectory(prefix=f"taskorch-{name}-") as tmp:
            try:
                SCENARIOS[name](Path(tmp))
            except Exception as exc:  # noqa: BLE001 - one scenario's failure is a finding
                report(name, failed=f"{type(exc).__name__}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
