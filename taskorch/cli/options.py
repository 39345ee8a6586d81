"""What every ``taskorch`` command shares: exit codes, UsageError, the pool options (CLI,
parent process, main thread). Imports no other CLI module, so that each of them can import it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskorch._options import Limit
    from taskorch._parent.orchestrator import TaskOrchestrator

#: Exit statuses of every command (``--help`` and docs/cli.md list them).
EXIT_OK = 0  # success
EXIT_FAILED = 1  # some task failed (run, demo), or the server could not be reached (status)
EXIT_USAGE = 2  # bad command-line input or input data (argparse's own code)
EXIT_OUTPUT = 3  # the output could not be written (a closed pipe, a full disk): records lost
EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # stopped by a signal, after draining (128 + the signal)
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class UsageError(Exception):
    """Bad command-line input: printed without a traceback, exit code 2."""


def add_pool_arguments(parser: argparse.ArgumentParser, *, backlog: int = 128) -> None:
    """The options shared by every command that starts a pool. The policy's defaults are
    ``Policy.default()``'s, as in the library: one default for both. ``backlog``: the
    command's default bound (``taskorch serve``'s is a service's: ``serve.SERVICE_BACKLOG``)."""
    from taskorch._policy import Policy

    d = Policy.default()
    pool = parser.add_argument_group("pool")
    pool.add_argument("--workers", type=positive_int, default=None, metavar="N",
                      help="worker processes (default: 2)")
    pool.add_argument("--backlog", type=positive_int, default=backlog, metavar="N",
                      help=f"tasks that may wait to start (default: {backlog:,})")
    pool.add_argument("--drop", action="store_true",
                      help="drop tasks that find the backlog full (ALLOW_SYNC_TASK_DROP); "
                           "without it, taskorch run waits for room and a client's run() "
                           "raises QueueFullError")
    pool.add_argument("--max-tasks-per-worker", type=positive_int, default=None, metavar="N",
                      help="recycle a worker after N tasks")
    pool.add_argument("--max-memory-per-worker", type=positive_float, default=None, metavar="MIB",
                      help="recycle a worker whose resident memory passed MIB after a task")
    pool.add_argument("--kill-grace", type=non_negative_float, default=1.0, metavar="SECONDS",
                      help="after an attempt's timeout, how long the worker has to interrupt it "
                           "before it is killed (default: 1)")
    pool.add_argument("--path", action="append", default=[], metavar="DIR",
                      help="put DIR first on the import path, here and in the workers, to find "
                           "task modules (repeatable; instead of PYTHONPATH)")
    pool.add_argument("--dask", metavar="ADDRESS", default=None,
                      help="run the tasks on a Dask cluster (scheduler address, e.g. "
                           "tcp://host:8786; needs taskorch[dask]) instead of local workers; "
                           "--workers then bounds the tasks in flight "
                           "(default: the cluster's threads)")
    policy = parser.add_argument_group(
        "policy", "Each task's retries and timeout. The defaults are Policy.default()'s, as in "
                  "the library: timeouts, crashes and OS errors other than 'not found' or "
                  "'permission denied' are retried; other exceptions fail at once.")
    policy.add_argument("--retries", type=non_negative_int, default=d.retries, metavar="N",
                        help=f"attempts after the first, for retryable errors, timeouts and "
                             f"crashes (default: {d.retries})")
    policy.add_argument("--timeout", type=timeout_seconds, default=d.timeout, metavar="SECONDS",
                        help=f"limit per attempt, or 'none' (default: {d.timeout:g})")
    policy.add_argument("--backoff-initial", type=non_negative_float, default=d.backoff_initial,
                        metavar="SECONDS",
                        help=f"wait before the first retry, doubling after, plus up to as much "
                             f"random jitter (default: {d.backoff_initial:g})")
    policy.add_argument("--backoff-max", type=non_negative_float, default=d.backoff_max,
                        metavar="SECONDS",
                        help=f"longest wait between attempts (default: {d.backoff_max:g})")
    policy.add_argument("--retry-on", default=None, metavar="NAMES",
                        help="retry only these exceptions (comma-separated: builtin names such "
                             "as OSError,ValueError, or module.Class; 'Exception' for all); "
                             "default: OSError")
    policy.add_argument("--retry-unless", default=None, metavar="NAMES",
                        help="never retry these, even if --retry-on covers them ('none' for no "
                             "exception); default: "
                             + ",".join(c.__name__ for c in d.retry_unless))
    breaker = parser.add_argument_group(
        "circuit breaker", "Off unless --breaker-failures or --breaker-ratio is given.")
    breaker.add_argument("--breaker-failures", type=positive_int, default=None, metavar="N",
                         help="open the circuit after N consecutive failed tasks")
    breaker.add_argument("--breaker-ratio", type=float, default=None, metavar="R",
                         help="open it when a share R (0 < R <= 1) of the tasks finished in "
                              "--breaker-window failed (at least --breaker-min-tasks of them)")
    breaker.add_argument("--breaker-window", type=positive_float, default=60.0, metavar="SECONDS",
                         help="the window of --breaker-ratio (default: 60)")
    breaker.add_argument("--breaker-min-tasks", type=positive_int, default=10, metavar="N",
                         help="tasks in the window before --breaker-ratio applies (default: 10)")
    breaker.add_argument("--breaker-duration", type=positive_float, default=30.0,
                         metavar="SECONDS", help="how long it stays open (default: 30)")
    breaker.add_argument("--breaker-probes", type=positive_int, default=1, metavar="N",
                         help="tasks let through when half-open (default: 1)")
    breaker.add_argument("--breaker-mode", choices=["fail", "hold"], default="fail",
                         help="while open, fail new tasks with CircuitOpenError (fail) or keep "
                              "them queued, so the backlog pushes back (hold) (default: fail)")
    parser.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS,
                        help="logging level on stderr (default: WARNING)")


def prepend_import_paths(paths: list[str]) -> None:
    """``--path``: each directory goes first on ``sys.path`` here and on ``PYTHONPATH`` for
    the processes started from now on (the workers, and what their tasks start), in the order
    given. Call it before importing any task module and before the pool starts."""
    if not paths:
        return
    absolute = []
    for path in paths:
        if not os.path.isdir(path):
            raise UsageError(f"--path {path}: not a directory")
        absolute.append(os.path.abspath(path))
    sys.path[:0] = [p for p in absolute if p not in sys.path]
    inherited = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(absolute + ([inherited] if inherited else []))


def orchestrator_from_args(args: argparse.Namespace,
                           limits: dict[str, Limit] | None = None) -> TaskOrchestrator:
    """A TaskOrchestrator configured by ``add_pool_arguments``' options, with ``limits``
    (``serve --limit``, checked)."""
    from taskorch import (
        BreakerMode,
        CircuitBreaker,
        Features,
        OrchestratorBrokenError,
        Policy,
        TaskOrchestrator,
    )

    default = Policy.default()
    try:
        policy = Policy(
            retries=args.retries, timeout=args.timeout, backoff_initial=args.backoff_initial,
            backoff_max=args.backoff_max,
            retry_on=(default.retry_on if args.retry_on is None
                      else exception_classes("--retry-on", args.retry_on)),
            retry_unless=(default.retry_unless if args.retry_unless is None
                          else exception_classes("--retry-unless", args.retry_unless)),
        )
        breaker = None
        if args.breaker_failures is not None or args.breaker_ratio is not None:
            breaker = CircuitBreaker(
                failure_threshold=args.breaker_failures or 5, failure_ratio=args.breaker_ratio,
                sampling_window=args.breaker_window, minimum_throughput=args.breaker_min_tasks,
                break_duration=args.breaker_duration, half_open_probes=args.breaker_probes,
                mode=BreakerMode(args.breaker_mode),
            )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    backend = None
    if args.dask:
        try:
            from taskorch.dask import DaskBackend

            backend = DaskBackend(args.dask)
        except (ImportError, ValueError) as exc:
            raise UsageError(f"--dask: {exc}") from exc
    try:
        orchestrator = TaskOrchestrator(
            worker_count=args.workers, max_backlog=args.backlog, policy=policy,
            features=Features.ALLOW_SYNC_TASK_DROP if args.drop else Features.NONE,
            max_tasks_per_worker=args.max_tasks_per_worker,
            max_memory_per_worker=args.max_memory_per_worker, backend=backend,
            kill_grace=args.kill_grace, circuit_breaker=breaker, limits=limits,
        )
        orchestrator.start()  # `serve` and `run` start their workers at once
        return orchestrator
    except ValueError as exc:  # e.g. an option a Dask cluster cannot honour
        raise UsageError(str(exc)) from exc
    except OrchestratorBrokenError as exc:  # e.g. no scheduler at the --dask address
        raise UsageError(str(exc)) from exc


def exception_classes(option: str, text: str) -> tuple[type[BaseException], ...]:
    """``--retry-on`` / ``--retry-unless``: comma-separated exception classes, each a builtin
    name or ``module.Class`` (imported here, after ``--path`` took effect: the workers must
    import it too); ``none`` for none. UsageError for a name that is not one."""
    import builtins
    import importlib

    if text.strip().lower() == "none":
        return ()
    classes: list[type[BaseException]] = []
    for name in (part.strip() for part in text.split(",")):
        module_name, _, attr = name.replace(":", ".").rpartition(".")
        try:
            if not module_name:
                found = getattr(builtins, attr)
            else:
                found = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError, ValueError) as exc:
            raise UsageError(f"{option}: no exception class {name!r} ({exc})") from exc
        if not (isinstance(found, type) and issubclass(found, BaseException)):
            raise UsageError(f"{option}: {name!r} is not an exception class")
        classes.append(found)
    return tuple(classes)


def timeout_seconds(text: str) -> float | None:
    """``--timeout``: a number of seconds > 0, or ``none`` for no limit."""
    if text.strip().lower() == "none":
        return None
    return positive_float(text)


def _integer(text: str, expected: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _number(text: str, expected: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _integer(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _integer(text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, "a number > 0")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, "a number >= 0")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a client command (status, trigger) finds a ``taskorch serve``, and its key."""
    from taskorch._service.client.api import CONNECT_TIMEOUT

    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH", help="the server's Unix socket")
    where.add_argument("--tcp", metavar="HOST:PORT", help="the server's TCP address")
    parser.add_argument("--authkey-file", metavar="PATH",
                        help="the key (default: PATH.authkey next to the socket; "
                             "~/.config/taskorch/authkey for TCP)")
    parser.add_argument("--timeout", type=float, default=CONNECT_TIMEOUT, metavar="SECONDS",
                        help=f"give up connecting after SECONDS (default: {CONNECT_TIMEOUT:g})")


def server_address(args: argparse.Namespace) -> str | tuple[str, int]:
    """``add_server_arguments``' address: a socket path or (host, port)."""
    from taskorch._service.addressing import parse_tcp_address

    if args.tcp is None:
        return str(args.socket)
    try:
        return parse_tcp_address(args.tcp)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
