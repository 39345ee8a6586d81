"""The ``taskorch`` command (parent process, main thread): argument parsing and dispatch.

    taskorch run TARGET      run a function over JSON-lines inputs (taskorch.cli.run)
    taskorch serve           a long-running pool other processes submit to (taskorch._service.server)
    taskorch status          print a server's statistics (taskorch._service.client)
    taskorch demo            the main job: offload real cleanup work (taskorch.cli.demo)

Exit codes: 0 success, 1 some task failed, 2 usage error, 130 / 143 after SIGINT / SIGTERM.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_SIGINT, EXIT_SIGTERM = 130, 143
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class UsageError(Exception):
    """Bad command-line input: printed without a traceback, exit code 2."""


def add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    """The options shared by every command that starts a pool."""
    pool = parser.add_argument_group("pool")
    pool.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                      help="worker processes (default: 2)")
    pool.add_argument("--backlog", type=_positive_int, default=128, metavar="N",
                      help="tasks that may wait to start (default: 128)")
    pool.add_argument("--retries", type=_non_negative_int, default=0, metavar="N",
                      help="attempts after the first, for exceptions, timeouts and crashes (default: 0)")
    pool.add_argument("--timeout", type=_positive_float, default=None, metavar="SECONDS",
                      help="limit per attempt (default: none)")
    pool.add_argument("--backoff-initial", type=_non_negative_float, default=0.1, metavar="SECONDS",
                      help="wait before the first retry, doubling after (default: 0.1)")
    pool.add_argument("--backoff-max", type=_non_negative_float, default=10.0, metavar="SECONDS",
                      help="longest wait between attempts (default: 10)")
    pool.add_argument("--drop", action="store_true",
                      help="drop tasks that find the backlog full (ALLOW_SYNC_TASK_DROP) instead of waiting")
    pool.add_argument("--max-tasks-per-worker", type=_positive_int, default=None, metavar="N",
                      help="recycle a worker after N tasks")
    pool.add_argument("--max-memory-per-worker", type=_positive_float, default=None, metavar="MIB",
                      help="recycle a worker whose resident memory passed MIB after a task")
    pool.add_argument("--dask", metavar="ADDRESS", default=None,
                      help="run the tasks on a Dask cluster (scheduler address, e.g. "
                           "tcp://host:8786; needs taskorch[dask]) instead of local workers; "
                           "--workers then bounds the tasks in flight (default: the cluster's threads)")
    parser.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS,
                        help="logging level on stderr (default: WARNING)")


def orchestrator_from_args(args: argparse.Namespace) -> Any:
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


def build_parser() -> argparse.ArgumentParser:
    from taskorch import __version__

    parser = argparse.ArgumentParser(
        prog="taskorch",
        description="Run CPU-heavy background work in crash-isolated worker processes, "
                    "with retries, timeouts and a bounded backlog.",
    )
    parser.add_argument("--version", action="version", version=f"taskorch {__version__}")
    parser.add_argument("--log-level", default="WARNING", choices=LOG_LEVELS,
                        help="logging level on stderr (default: WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from taskorch._service import client as service_client
    from taskorch._service import server as service_server
    from taskorch.cli import demo as cli_demo
    from taskorch.cli import run as cli_run

    cli_run.add_parser(sub)
    service_server.add_parser(sub)
    service_client.add_status_parser(sub)
    cli_demo.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr,
    )
    try:
        code: int = args.handler(args)
    except UsageError as exc:
        parser.exit(EXIT_USAGE, f"taskorch {args.command}: error: {exc}\n")
    return code


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
