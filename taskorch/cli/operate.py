"""``taskorch tasks``, ``cancel``, ``retry`` and ``purge``: an operator's view of a server's
tasks and actions on them by id (CLI, main thread of its own process; issue 25). Each is one
connection and a round trip per request (``Client.tasks`` ... ``Client.purge``).

Exit status: 0; 1 when an id is unknown or already ended (cancel), cannot be retried, or the
server cannot be reached; 2 on a usage error (argparse's, and ``purge`` without ``--yes``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from multiprocessing import AuthenticationError
from typing import TYPE_CHECKING, Any, Callable

from taskorch._errors import OrchestratorClosedError, TaskNotFoundError
from taskorch._stats import TASK_STATES, TaskInfo
from taskorch.cli.live import amount
from taskorch.cli.options import EXIT_FAILED, EXIT_OK, add_server_arguments, server_address

if TYPE_CHECKING:  # (the client is imported when a command runs)
    from taskorch._service.client.api import Client


def add_parsers(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "tasks", help="list a server's tasks, newest first",
        description="List the tasks a taskorch serve pool holds (queued, waiting, running, and "
                    "finished ones for its --result-ttl), newest first. Exit status: 0, or 1 "
                    "when the server cannot be reached.")
    p.add_argument("--state", action="append", choices=TASK_STATES, metavar="STATE",
                   help=f"only tasks in this state (repeatable): {', '.join(TASK_STATES)}")
    p.add_argument("--name", help="only tasks of this name (module.function)")
    p.add_argument("--limit", type=int, default=50, help="at most this many (default: 50)")
    p.add_argument("--before-id", type=int, metavar="ID", help="only ids below ID (next page)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    add_server_arguments(p)
    p.set_defaults(handler=_tasks)

    p = subparsers.add_parser(
        "cancel", help="cancel tasks by id",
        description="Cancel queued or waiting tasks (they never run); with --terminate, kill "
                    "running ones too (their worker is replaced). Exit status: 0 if every one "
                    "was cancelled; 1 if an id is unknown, already ended, or running without "
                    "--terminate.")
    p.add_argument("ids", type=int, nargs="+", metavar="ID")
    p.add_argument("--terminate", action="store_true", help="kill a running attempt")
    add_server_arguments(p)
    p.set_defaults(handler=_cancel)

    p = subparsers.add_parser(
        "retry", help="submit ended tasks again",
        description="Submit tasks that ended failed, cancelled, abandoned or expired again, as "
                    "new tasks; prints each new id. Exit status: 0, or 1 if an id is unknown "
                    "or in another state.")
    p.add_argument("ids", type=int, nargs="+", metavar="ID")
    add_server_arguments(p)
    p.set_defaults(handler=_retry)

    p = subparsers.add_parser(
        "purge", help="cancel every queued task",
        description="Cancel every queued or waiting task of the server (or those of --name). "
                    "Asks for --yes. Exit status: 0, 1 if the server cannot be reached, 2 "
                    "without --yes.")
    p.add_argument("--name", help="only tasks of this name (module.function)")
    p.add_argument("--yes", action="store_true", help="yes, cancel them")
    add_server_arguments(p)
    p.set_defaults(handler=_purge, parser=p)


def _tasks(args: argparse.Namespace) -> int:
    def act(client: Client) -> int:
        infos = client.tasks(args.state, args.name, args.limit, args.before_id)
        if args.json:
            for info in infos:
                print(json.dumps(info.to_dict()))
        else:
            print_table(infos, time.time())
        return EXIT_OK

    return _with_client("tasks", args, act)


def _cancel(args: argparse.Namespace) -> int:
    def act(client: Client) -> int:
        code = EXIT_OK
        for task_id in args.ids:
            try:
                cancelled = client.cancel(task_id, terminate=args.terminate)
            except TaskNotFoundError as exc:
                print(f"taskorch cancel: {exc}", file=sys.stderr)
                code = EXIT_FAILED
                continue
            if cancelled:
                print(f"task {task_id}: cancelled")
            else:
                state = client.task(task_id).state
                print(f"taskorch cancel: task {task_id} is {state}: not cancelled"
                      + (" (pass --terminate to kill it)" if state == "running" else ""),
                      file=sys.stderr)
                code = EXIT_FAILED
        return code

    return _with_client("cancel", args, act)


def _retry(args: argparse.Namespace) -> int:
    def act(client: Client) -> int:
        code = EXIT_OK
        for task_id in args.ids:
            try:
                print(f"task {task_id}: retried as task {client.retry(task_id)}")
            except (TaskNotFoundError, ValueError) as exc:
                print(f"taskorch retry: {exc}", file=sys.stderr)
                code = EXIT_FAILED
        return code

    return _with_client("retry", args, act)


def _purge(args: argparse.Namespace) -> int:
    if not args.yes:
        args.parser.error("purge cancels every queued task: pass --yes to confirm")
    return _with_client("purge", args, lambda client: _purged(client.purge(args.name)))


def _purged(count: int) -> int:
    print(f"{count} queued tasks cancelled")
    return EXIT_OK


def _with_client(command: str, args: argparse.Namespace,
                 act: Callable[[Client], int]) -> int:
    from taskorch._service.client.api import connect

    try:
        with connect(server_address(args), authkey_file=args.authkey_file,
                     timeout=args.timeout, reconnect_for=0) as client:
            return act(client)
    except ValueError as exc:  # the server refused an argument
        print(f"taskorch {command}: {exc}", file=sys.stderr)
    except (OSError, AuthenticationError, OrchestratorClosedError) as exc:
        print(f"taskorch {command}: cannot reach the server: {type(exc).__name__}: {exc}",
              file=sys.stderr)
    return EXIT_FAILED


#: The table's columns: heading, width (the last is as wide as it needs).
COLUMNS = (("ID", 8), ("NAME", 28), ("STATE", 10), ("TRIES", 5), ("AGE", 8), ("RUN", 8),
           ("WORKER", 7), ("PROGRESS", 14), ("ERROR", 0))


def print_table(infos: list[TaskInfo], now: float) -> None:
    print(" ".join(f"{head:<{width}}" for head, width in COLUMNS).rstrip())
    for info in infos:
        cells = [str(info.id), info.name, info.state, str(info.attempts),
                 _seconds(now - info.accepted_at), _run_time(info, now),
                 "" if info.worker_pid is None else str(info.worker_pid), _progress(info),
                 info.error or ""]
        print(" ".join(f"{cell[:width] if width else cell:<{width}}"
                       for cell, (_, width) in zip(cells, COLUMNS)).rstrip())


def _run_time(info: TaskInfo, now: float) -> str:
    if info.started_at is None:
        return ""
    return _seconds((info.finished_at or now) - info.started_at)


def _progress(info: TaskInfo) -> str:
    p = info.progress
    if p is None:
        return ""
    if p.total:
        return f"{amount(p.done)}/{amount(p.total)} {100 * p.done / p.total:.0f}%"
    return amount(p.done)


def _seconds(s: float) -> str:
    s = max(0.0, s)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{s / 60:.1f}m"
    return f"{s / 3600:.1f}h"
