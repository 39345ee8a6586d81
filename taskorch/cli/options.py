"""What every ``taskorch`` command shares: exit codes, UsageError, the pool options (CLI,
parent process, main thread). Imports no other CLI module, so that each of them can import it.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from taskorch._parent.orchestrator import TaskOrchestrator

#: Exit statuses of every command (``--help`` and the README list them).
EXIT_OK = 0  # success
EXIT_FAILED = 1  # some task failed (run, demo), or the server could not be reached (status)
EXIT_USAGE = 2  # bad command-line input or input data (argparse's own code)
EXIT_OUTPUT = 3  # the output could not be written (a closed pipe, a full disk): records lost
EXIT_SIGINT, EXIT_SIGTERM = 130, 143  # stopped by a signal, after draining (128 + the signal)
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class UsageError(Exception):
    """Bad command-line input: printed without a traceback, exit code 2."""


def add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by every command that starts a pool."""
    pool = parser.add_argument_group("pool")
    pool.add_argument("--workers", type=positive_int, default=None, metavar="N",
                      help="worker processes (default: 2)")
    pool.add_argument("--backlog", type=positive_int, default=128, metavar="N",
                      help="tasks that may wait to start (default: 128)")
    pool.add_argument("--retries", type=non_negative_int, default=0, metavar="N",
                      help="attempts after the first, for exceptions, timeouts and crashes "
                           "(default: 0)")
    pool.add_argument("--timeout", type=positive_float, default=None, metavar="SECONDS",
                      help="limit per attempt (default: none)")
    pool.add_argument("--backoff-initial", type=non_negative_float, default=0.1, metavar="SECONDS",
                      help="wait before the first retry, doubling after (default: 0.1)")
    pool.add_argument("--backoff-max", type=non_negative_float, default=10.0, metavar="SECONDS",
                      help="longest wait between attempts (default: 10)")
    pool.add_argument("--drop", action="store_true",
                      help="drop tasks that find the backlog full (ALLOW_SYNC_TASK_DROP) "
                           "instead of waiting")
    pool.add_argument("--max-tasks-per-worker", type=positive_int, default=None, metavar="N",
                      help="recycle a worker after N tasks")
    pool.add_argument("--max-memory-per-worker", type=positive_float, default=None, metavar="MIB",
                      help="recycle a worker whose resident memory passed MIB after a task")
    pool.add_argument("--dask", metavar="ADDRESS", default=None,
                      help="run the tasks on a Dask cluster (scheduler address, e.g. "
                           "tcp://host:8786; needs taskorch[dask]) instead of local workers; "
                           "--workers then bounds the tasks in flight "
                           "(default: the cluster's threads)")
    parser.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS,
                        help="logging level on stderr (default: WARNING)")


def orchestrator_from_args(args: argparse.Namespace) -> TaskOrchestrator:
    """A TaskOrchestrator configured by ``add_pool_arguments``' options."""
    from taskorch import Features, OrchestratorBrokenError, Policy, TaskOrchestrator

    try:
        policy = Policy(retries=args.retries, timeout=args.timeout,
                        backoff_initial=args.backoff_initial, backoff_max=args.backoff_max)
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
        return TaskOrchestrator(
            worker_count=args.workers, max_backlog=args.backlog, policy=policy,
            features=Features.ALLOW_SYNC_TASK_DROP if args.drop else Features.NONE,
            max_tasks_per_worker=args.max_tasks_per_worker,
            max_memory_per_worker=args.max_memory_per_worker, backend=backend,
        )
    except ValueError as exc:  # e.g. an option a Dask cluster cannot honour
        raise UsageError(str(exc)) from exc
    except OrchestratorBrokenError as exc:  # e.g. no scheduler at the --dask address
        raise UsageError(str(exc)) from exc


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value
