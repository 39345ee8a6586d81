"""Shared fixtures: orchestrators that are always stopped, and the no-leak check after every
test."""

from __future__ import annotations

import gc
import os
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import psutil
import pytest
from _tasks import Gate, scaled, wait_until

from taskorch import Policy, TaskOrchestrator

# A task must never wait on the default policy's 10-minute timeout in a test.
FAST = Policy(retries=0, timeout=None)


def _is_resource_tracker(proc: psutil.Process) -> bool:
    # loky and multiprocessing each keep one resource-tracker process per interpreter.
    try:
        return any("resource_tracker" in part for part in proc.cmdline())
    except psutil.Error:
        return True


def leftover_processes() -> list[psutil.Process]:
    me = psutil.Process()
    out = []
    for proc in me.children(recursive=True):
        try:
            if proc.status() == psutil.STATUS_ZOMBIE or _is_resource_tracker(proc):
                continue
        except psutil.NoSuchProcess:
            continue
        out.append(proc)
    return out


def taskorch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("taskorch-")]


def open_fds() -> dict[int, str]:
    """This process's open file descriptors: fd -> what it refers to (``readlink`` of
    ``/proc/self/fd/N``: a path, ``pipe:[inode]``, ``socket:[inode]``, ``anon_inode:[...]``)."""
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            # Closed between the listing and now: the listing's own directory fd always is.
            continue
    return fds


def process_lifetime_fds() -> set[int]:
    """The fds that a singleton opens on first use and keeps until the interpreter exits.

    The only exemptions from the fd check, each by its exact fd number (never by a pattern of
    targets), because the first test that starts a pool would otherwise be blamed for them:

    - the write end of the pipe to loky's resource tracker, and of the one to
      multiprocessing's (``_resource_tracker._fd``): one tracker per interpreter, started by
      the first pool; ``leftover_processes`` exempts the tracker *process* for the same reason.
    """
    fds = set()
    for module_name in ("loky.backend.resource_tracker", "multiprocessing.resource_tracker"):
        module = sys.modules.get(module_name)
        tracker = getattr(module, "_resource_tracker", None)
        fd = getattr(tracker, "_fd", None)
        if isinstance(fd, int):
            fds.add(fd)
    return fds


def leaked_fds(before: dict[int, str]) -> dict[int, str]:
    """The fds open now that were not open before (or now refer to something else), minus
    ``process_lifetime_fds``. Sets of (fd, target), not counts: an fd the test closed and one
    it opened never cancel out."""
    exempt = process_lifetime_fds()
    return {fd: target for fd, target in open_fds().items()
            if before.get(fd) != target and fd not in exempt}


# Set TASKORCH_STRICT_FDS=1 to fail a test whose fds only the garbage collector closed too.
STRICT_FDS = os.environ.get("TASKORCH_STRICT_FDS") == "1"
# (test node id, fds) of the tests whose fds only gc.collect() closed: listed after the run.
closed_only_by_gc: list[tuple[str, dict[int, str]]] = []


def check_fds_closed(before: dict[int, str], test: str) -> None:
    """Fail if the test left an fd open; record (or, with TASKORCH_STRICT_FDS=1, fail) one
    that only the cyclic garbage collector closed.

    Called once the test's processes and threads are gone, so nothing of taskorch can still be
    about to close an fd. Known case of "only the garbage collector closes it" (reported to
    the owner of taskorch/_parent/process.py): loky closes a worker's sentinel pipe (the read
    end, ``Popen.sentinel``) with a ``util.Finalize`` that runs only when its ``Popen`` object is
    freed (loky's Popen has no ``close()``), and a stopped orchestrator is a reference cycle
    (Dispatcher <-> its Thread, WorkItem.worker -> WorkerProcess -> LokyProcess -> Popen), so
    that pipe, one per worker ever started, stays open until the next ``gc.collect``.
    """
    leaked = leaked_fds(before)
    if not leaked:
        return
    gc.collect()
    after_gc = leaked_fds(before)
    freed = {fd: target for fd, target in leaked.items() if after_gc.get(fd) != target}
    if freed:
        closed_only_by_gc.append((test, freed))
    if freed and STRICT_FDS:
        listing = "\n".join(f"  fd {fd} -> {target}" for fd, target in sorted(freed.items()))
        raise AssertionError(f"the test left {len(freed)} fd(s) that only gc.collect() "
                             f"closed (TASKORCH_STRICT_FDS=1):\n{listing}")
    try:  # another (non-taskorch) thread of the test may still be closing one
        wait_until(lambda: not leaked_fds(before), timeout=10,
                   what="every fd of the test to be closed")
    except AssertionError:
        left = leaked_fds(before)
        if left:
            listing = "\n".join(f"  fd {fd} -> {target}" for fd, target in sorted(left.items()))
            raise AssertionError(f"the test left {len(left)} file descriptor(s) open, even "
                                 f"after gc.collect():\n{listing}") from None


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """After every test: no child process, no taskorch thread, no file descriptor left open.

    Each is polled to a deadline (a deadlock guard, not a timing). The fd check compares this
    process's fds with the set before the test, pytest's own included: pytest's capture
    files, faulthandler's stderr dup and anything opened at session or module scope are open
    before the test starts and are never counted. What is exempt, and why:

    - the resource trackers' pipe ends, by fd number (``process_lifetime_fds``);
    - fds that only ``gc.collect()`` closes (``check_fds_closed``: a worker's sentinel pipe
      today): not failed by default but listed at the end of the run, by test; fatal with
      ``TASKORCH_STRICT_FDS=1``;
    - tests/test_dask.py is not fd-checked: its module-wide ``LocalCluster`` runs its
      scheduler in this process, opening and closing connections in its own thread at any
      time, and the module replaces this fixture with its own (processes, threads).
    """
    before = open_fds()
    yield
    try:
        wait_until(lambda: not leftover_processes(), timeout=10,
                   what="every worker process to be gone")
    except AssertionError:
        # One slow or failed test is one failure: its processes must not fail the leak
        # checks of every test after it. Kill them (SIGKILL, the whole tree) and report them.
        stopped, left = kill_leftover_processes()
        raise AssertionError(
            f"the test left {stopped} orchestrator(s) running (now stopped) and "
            f"{len(left)} process(es) after that (now killed): {left}") from None
    wait_until(lambda: not taskorch_threads(), timeout=10,
               what="every taskorch thread to be gone")
    check_fds_closed(before, request.node.nodeid)


def kill_leftover_processes() -> tuple[int, list[str]]:
    """Stop every orchestrator still running in this process (a test that failed or timed
    out before its stop(): its dispatcher would replace killed workers), then SIGKILL every
    process ``leftover_processes`` finds and wait for them; what they were."""
    from taskorch._parent import orchestrator

    running = [o for o in list(orchestrator._live) if o.worker_pids()]
    for o in running:  # (one never started stays so: stop() would close it for good)
        o.stop(timeout=0)
    procs = leftover_processes()
    described = []
    for proc in procs:
        try:
            described.append(f"{proc.pid} {' '.join(proc.cmdline()[:6])}")
            proc.kill()
        except psutil.Error:
            continue
    psutil.wait_procs(procs, timeout=scaled(10))
    return len(running), described


# The tests that ./scripts/test --quick leaves out (marked "slow" here, in one place): whole
# modules that start a cluster, a browser, a build or the benchmark, and the tests that took
# over about 1.5 s on 2 busy cores (load average 4-5; `./scripts/test --quick --durations=0`),
# mostly servers restarted or waited out in real time, and the docs' examples (each a
# subprocess). Measured (`time ./scripts/test --quick -q`, 2 shared cores): 4 min 2 s before
# (load average 3.2-3.4), 2 min 0 s after (pytest 117 s; load average 4.6 falling to 3.3).
SLOW_MODULES = {"test_bench_smoke.py", "test_bench_peers_smoke.py", "test_wheel.py",
                "test_dask.py", "test_dask_timeout.py", "test_dashboard.py",
                "test_cpython_executor.py"}
SLOW_TESTS = {
    # (1.5-17 s each with load 4-5 on 2 cores, issue 26's measure)
    "test_example_runs_as_written",  # (the README's and docs' examples, each a subprocess)
    "test_status_lists_workers_what_they_run_and_the_oldest_queued_task",
    "test_priority_delay_and_expiry_survive_a_sigkill_and_restart",
    "test_dashboard_cancels_a_queued_task_and_retries_a_failed_one",
    "test_a_client_that_does_not_read_costs_the_server_only_its_outbox_bound",
    "test_a_trigger_whose_answer_was_lost_is_not_sent_again_after_a_reconnect",
    "test_status_shows_delayed_tasks_and_when_the_next_is_due",
    "test_the_cli_lists_cancels_retries_and_purges_with_exit_codes",
    "test_run_async_waits_for_the_reconnection",
    "test_map_waits_for_the_reconnection",
    "test_task_exceptions_cross_with_their_type",
    "test_results_by_id_from_another_process_and_after_a_restart",
    "test_a_real_server_runs_its_schedule_and_the_command_line_wins",
    "test_a_stopped_server_makes_calls_fail_within_their_timeout",
    "test_finished_futures_keep_no_arguments_alive",
    "test_serve_http_end_to_end",
    "test_a_bad_config_is_refused_with_the_file_and_the_key",
    "test_serve_refuses_a_non_loopback_http_address_without_allow_remote",
    "test_the_last_fire_survives_restarts_and_missed_ticks_coalesce",
    "test_with_wait_rides_out_a_restart_and_times_out_only_past_its_seconds",
    "test_task_api_lists_shows_and_acts_with_the_token_and_origin_rules",
    "test_a_retry_backoff_longer_than_kill_grace_is_not_a_hang",
    "test_taskorch_status_shows_one_task",
    # (earlier: over about 4 s)
    "test_chaos_random_worker_kills_and_crashing_tasks",
    "test_finished_futures_keep_no_worker_fds_open",
    "test_a_module_beside_the_user_reaches_the_dask_workers",
    "test_retry_on_and_retry_unless",
    "test_default_policy_on_the_command_line_fails_not_found_at_once_and_retries_transient",
    "test_path_puts_a_directory_on_the_import_path_of_the_cli_and_its_workers",
    "test_resume_skips_what_has_a_record_and_resume_failed_reruns_failures",
    "test_a_run_that_died_resumes_where_it_stopped",
    "test_a_joblog_of_another_input_is_refused",
    "test_resume_needs_a_joblog_and_a_joblog_file",
    "test_the_demo_runs",
    "test_gunicorn_preload_with_an_orchestrator_and_a_client_made_at_import",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the slow tests (``SLOW_*``); give pytest-timeout's deadline (``timeout`` in
    pyproject.toml) scaled like every other deadline of the suite (``TASKORCH_TEST_SCALE``,
    tests/_tasks.py) to the tests that do not set their own (written with ``scaled``)."""
    for item in items:
        if item.path.name in SLOW_MODULES or getattr(item, "originalname", None) in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
    default = config.getini("timeout")
    if not default or config.getoption("timeout", None) is not None:
        return  # none set, or --timeout on the command line wins
    for item in items:  # (a slow test: 18 s on an idle machine for the chaos run)
        if item.get_closest_marker("timeout") is None:
            slow = item.get_closest_marker("slow") is not None
            item.add_marker(pytest.mark.timeout(scaled(float(default) * (3 if slow else 1))))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not closed_only_by_gc:
        return
    fds = sum(len(freed) for _, freed in closed_only_by_gc)
    terminalreporter.section("file descriptors closed only by the garbage collector")
    terminalreporter.write_line(
        f"{len(closed_only_by_gc)} tests left {fds} fds that only gc.collect() closed (see "
        "check_fds_closed in tests/conftest.py; TASKORCH_STRICT_FDS=1 fails them):")
    for test, freed in closed_only_by_gc:
        terminalreporter.write_line(f"  {test}: " + ", ".join(sorted(set(freed.values()))))


@pytest.fixture
def make_orchestrator() -> Iterator[Callable[..., TaskOrchestrator]]:
    made: list[TaskOrchestrator] = []

    def make(*args: Any, **kwargs: Any) -> TaskOrchestrator:
        kwargs.setdefault("policy", FAST)
        o = TaskOrchestrator(*args, **kwargs)
        made.append(o)
        o.start()  # its workers now, as tests that look at them expect (lazy start: its own tests)
        return o

    yield make
    for o in made:
        o.stop(timeout=scaled(5))


@pytest.fixture
def gates(tmp_path: Path) -> Callable[[str], Gate]:
    return lambda name: Gate(tmp_path, name)


@pytest.fixture
def fifo(tmp_path: Path) -> Callable[[str], str]:
    def make(name: str) -> str:
        path = tmp_path / name
        os.mkfifo(path)
        return str(path)

    return make


# The job module of the command-line tests (tests/test_cli.py, test_process_tree.py): a file
# that `taskorch run` imports by path.
@pytest.fixture
def jobfile(tmp_path: Path) -> Path:
    path = tmp_path / "jobs.py"
    path.write_text(textwrap.dedent("""
        import os, time

        def scale(x, factor=1):
            if x == 3:
                raise ValueError("three is not allowed")
            return x * factor

        def a_set(x):
            return {x}

        def gated(i, directory):
            # inputs 0 and 1 block their workers until the test writes to their FIFO
            if i < 2:
                tmp = os.path.join(directory, f"{i}.tmp")
                with open(tmp, "w") as f:
                    f.write(str(os.getpid()))
                os.replace(tmp, os.path.join(directory, f"{i}.started"))
                with open(os.path.join(directory, f"{i}.fifo")) as f:
                    return f.read()
            return i
    """))
    return path
