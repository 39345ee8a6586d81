"""``taskorch trigger NAME``: run one of a server's schedules now (CLI, its own process)."""

from __future__ import annotations

import argparse
import sys
from multiprocessing import AuthenticationError
from typing import Any

from taskorch._errors import OrchestratorClosedError
from taskorch._service.client.api import trigger_schedule
from taskorch.cli.options import EXIT_FAILED, EXIT_OK, add_server_arguments, server_address


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "trigger", help="run one of a server's schedules now",
        description="Ask a taskorch serve pool to run the schedule NAME now, outside its ticks "
                    "(its overlap rule does not apply: you asked). Exit status: 0 submitted; 1 "
                    "no such schedule, the backlog was full, or the server cannot be reached.",
    )
    p.add_argument("name", metavar="NAME", help="the schedule's name (see taskorch status)")
    add_server_arguments(p)
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    address = server_address(args)
    try:
        submitted = trigger_schedule(address, args.name, authkey_file=args.authkey_file,
                                     timeout=args.timeout)
    except ValueError as exc:
        print(f"taskorch trigger: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (OSError, AuthenticationError, OrchestratorClosedError) as exc:
        print(f"taskorch trigger: cannot reach the server: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return EXIT_FAILED
    if not submitted:
        print(f"taskorch trigger: the server's backlog is full; {args.name!r} was not run",
              file=sys.stderr)
        return EXIT_FAILED
    print(f"taskorch trigger: {args.name!r} submitted")
    return EXIT_OK
