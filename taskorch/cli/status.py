"""``taskorch status``: print a server's statistics (CLI, main thread of its own process)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from multiprocessing import AuthenticationError
from typing import Any

from taskorch._errors import OrchestratorClosedError
from taskorch._service.addressing import Address
from taskorch._service.client.api import fetch_status
from taskorch._service.values import decode_stats, encode_stats
from taskorch.cli.options import EXIT_FAILED, EXIT_OK, add_server_arguments, server_address


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "status", help="print a server's statistics",
        description="Connect to a taskorch serve pool and print its statistics. Exit status: 0, "
                    "or 1 when the server cannot be reached or refuses the key or the connection.",
    )
    add_server_arguments(p)
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    p.add_argument("--task", type=int, metavar="ID",
                   help="show one task instead: whether it ended, and its result or error "
                        "(from the server's journal; exit status 1 if it is unknown)")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    address = server_address(args)
    if isinstance(address, str):
        if not os.path.exists(address):
            return _cannot(address, "no server is there: the socket does not exist (is "
                                    f"`taskorch serve --socket {address}` running?)")
    if args.task is not None:
        return _show_task(address, args)
    try:
        fields, info, where = fetch_status(
            address, authkey_file=args.authkey_file, timeout=args.timeout
        )
    except ConnectionRefusedError as exc:
        if exc.errno is None:  # the server answered and refused: its reason
            return _cannot(address, f"the server refused the connection: {exc}")
        return _cannot(address, "no server is listening there (connection refused: a server "
                                "that stopped may have left its socket)")
    except AuthenticationError as exc:
        return _cannot(address, f"the server refused the key ({exc}); pass the key it uses "
                                "with --authkey-file")
    except (OSError, OrchestratorClosedError) as exc:
        filename = getattr(exc, "filename", None)
        if isinstance(exc, OSError) and filename is not None and "authkey" in "".join(
            getattr(exc, "__notes__", ())
        ):
            return _cannot(address, f"cannot read the authkey file {filename} "
                                    f"({exc.strerror}); pass --authkey-file (the server prints "
                                    "where its key is)")
        return _cannot(address, f"{type(exc).__name__}: {exc}")
    if args.json:
        print(json.dumps(fields))
        return EXIT_OK
    stats = encode_stats(decode_stats(fields))
    print(f"taskorch serve at {where} (pid {info.get('pid')}, taskorch {info.get('taskorch')}, "
          f"{info.get('workers')} workers, backlog {info.get('max_backlog')}"
          f"{', --drop' if info.get('drop') else ''})")
    width = max(len(name) for name in stats)
    for name, value in stats.items():
        print(f"  {name:<{width}}  {value}")
    oldest = fields.get("oldest_queued_seconds")
    if "oldest_queued_seconds" in fields:
        print(f"  {'oldest queued':<{width}}  "
              + ("none queued" if oldest is None else f"{oldest:.3f} s ago"))
    if fields.get("delayed"):
        print(f"  {'next delayed due':<{width}}  {_when(fields.get('next_delayed_at'))}")
    if fields.get("journal", "ok") != "ok":
        print(f"  {'journal':<{width}}  NOT READY: {fields['journal']}")
    details = fields.get("worker_details")
    if details:
        print("  worker processes:")
        for worker in details:
            rss = worker.get("rss_mib")
            running = worker.get("running")
            doing = ("idle" if running is None else
                     f"running task {running['task_id']} (attempt {running['attempt']}, "
                     f"{running['seconds']:.3f} s)")
            print(f"    pid {worker['pid']:<8} rss {'?' if rss is None else f'{rss:.1f}'} MiB"
                  f"  tasks run {worker['tasks']:<6} prefetched {worker['prefetched']:<3} "
                  f"{doing}")
    schedules = fields.get("schedules")
    if schedules:
        print("  schedules:")
        for sched in schedules:
            print(f"    {sched['name']}: next {_when(sched.get('next_run'))}; last "
                  f"{_when(sched.get('last_run'))}"
                  + (f" ({sched['last_outcome']}"
                     + (f", {sched['last_seconds']:.3f} s" if sched.get("last_seconds") is not None
                        else "") + ")" if sched.get("last_outcome") else "")
                  + (", running now" if sched.get("running") else ""))
    return EXIT_OK


def _when(t: float | None) -> str:
    from taskorch._parent.schedule import describe_time

    return "never" if t is None else describe_time(t)


def _cannot(address: Address, why: str) -> int:
    shown = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
    print(f"taskorch status: cannot get the statistics of {shown}: {why}", file=sys.stderr)
    return EXIT_FAILED


def _show_task(address: Address, args: argparse.Namespace) -> int:
    """``--task ID``: one line about the task (its outcome unpickled here, if it can be)."""
    from taskorch._errors import TaskNotFoundError
    from taskorch._service.client.api import connect

    try:
        with connect(address, authkey_file=args.authkey_file, timeout=args.timeout,
                     reconnect_for=0) as client:
            try:
                value = client.result(args.task, timeout=0)
            except TaskNotFoundError as exc:
                print(f"taskorch status: {exc}", file=sys.stderr)
                return EXIT_FAILED
            except TimeoutError:
                state, detail = "pending", "queued or running"
            except Exception as exc:  # the task's own error, or a taskorch one
                state, detail = "failed", f"{type(exc).__name__}: {exc}"
            else:
                state, detail = "succeeded", repr(value)
    except (OSError, AuthenticationError, OrchestratorClosedError) as exc:
        print(f"taskorch status: cannot reach {address}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps({"task": args.task, "state": state, "detail": detail}))
    else:
        print(f"task {args.task}: {state}: {detail}")
    return EXIT_OK
