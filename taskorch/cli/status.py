"""``taskorch status``: print a server's statistics (CLI, main thread of its own process)."""

from __future__ import annotations

import argparse
import json
import sys
from multiprocessing import AuthenticationError
from typing import Any

from taskorch._errors import OrchestratorClosedError
from taskorch._service.addressing import Address, parse_tcp_address
from taskorch._service.client import CONNECT_TIMEOUT, fetch_status
from taskorch._service.protocol import encode_stats
from taskorch.cli.options import EXIT_FAILED, EXIT_OK, UsageError


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "status", help="print a server's statistics",
        description="Connect to a taskorch serve pool and print its statistics. Exit status: 0, "
                    "or 1 when the server cannot be reached or refuses the key or the connection.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH", help="the server's Unix socket")
    where.add_argument("--tcp", metavar="HOST:PORT", help="the server's TCP address")
    p.add_argument("--authkey-file", metavar="PATH",
                   help="the key (default: PATH.authkey next to the socket; "
                        "~/.config/taskorch/authkey for TCP)")
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    p.add_argument("--timeout", type=float, default=CONNECT_TIMEOUT, metavar="SECONDS",
                   help=f"give up connecting after SECONDS (default: {CONNECT_TIMEOUT:g})")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    address: Address
    if args.tcp is not None:
        try:
            address = parse_tcp_address(args.tcp)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
    else:
        address = args.socket
    try:
        stats, info, where = fetch_status(
            address, authkey_file=args.authkey_file, timeout=args.timeout
        )
    except (OSError, AuthenticationError, OrchestratorClosedError) as exc:
        notes = "".join(f"; {note}" for note in getattr(exc, "__notes__", ()))
        print(f"taskorch status: cannot get the statistics of {address}: "
              f"{type(exc).__name__}: {exc}{notes}",
              file=sys.stderr)
        return EXIT_FAILED
    fields = encode_stats(stats)
    if args.json:
        print(json.dumps(fields))
        return EXIT_OK
    print(f"taskorch serve at {where} (pid {info.get('pid')}, taskorch {info.get('taskorch')}, "
          f"{info.get('workers')} workers, backlog {info.get('max_backlog')}"
          f"{', --drop' if info.get('drop') else ''})")
    width = max(len(name) for name in fields)
    for name, value in fields.items():
        print(f"  {name:<{width}}  {value}")
    return EXIT_OK
