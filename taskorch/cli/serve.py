"""``taskorch serve``: its options, and the translation of ``taskorch._service.server.serve()``
into messages and an exit status (CLI, server process, main thread).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from taskorch._service.addressing import (
    default_authkey_path,
    load_or_create_authkey,
    parse_tcp_address,
)
from taskorch._service.listener import Listener, bind_tcp, bind_unix
from taskorch._service.server import serve
from taskorch.cli.options import (
    EXIT_FAILED,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    UsageError,
    add_pool_arguments,
    orchestrator_from_args,
)
from taskorch.cli.serve_http import add_http_arguments, http_service_from_args


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve", help="a long-running pool that other processes submit to (taskorch.connect)",
        description="Start a pool and serve it on a Unix socket or a loopback TCP port. Clients "
                    "(taskorch.connect(), taskorch status) authenticate with a shared key, read "
                    "from --authkey-file (created with 32 random bytes, mode 0600, if missing). "
                    "Prints 'taskorch serve: listening on ...' on stderr when ready. SIGTERM or "
                    "SIGINT: stop accepting, drain, exit 143 (SIGTERM) or 130 (SIGINT); 1 if the "
                    "drain timed out (tasks were cancelled or abandoned) or the server failed; "
                    "a second signal cuts the drain short. Task functions defined in modules "
                    "travel by name: the server's workers import them, so run the server where "
                    "the application's modules are importable (PYTHONPATH); lambdas and "
                    "__main__ functions travel by value.",
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", metavar="PATH",
                       help="listen on this Unix socket (its directory is created with mode 0700 "
                            "if missing)")
    where.add_argument("--tcp", metavar="HOST:PORT",
                       help="listen on TCP; only loopback addresses unless --allow-remote "
                            "(port 0: any free port)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a non-loopback --tcp address: anyone holding the key can then run "
                        "code as this user, and the traffic is authenticated but not encrypted "
                        "(and a non-loopback --http address, which then requires a token)")
    p.add_argument("--authkey-file", metavar="PATH",
                   help="the shared key (default: PATH.authkey next to the socket; "
                        "~/.config/taskorch/authkey for TCP)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="at shutdown, how long tasks in flight may take before they are cancelled "
                        "or terminated (default: 30)")
    add_http_arguments(p)
    add_pool_arguments(p)
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    """``taskorch serve``: runs in the main thread until SIGTERM / SIGINT."""
    if not args.drain_timeout >= 0 or args.drain_timeout == float("inf"):
        raise UsageError(f"--drain-timeout must be a number >= 0, got {args.drain_timeout}")
    listener = _bind(args)
    try:
        key_path = (
            Path(args.authkey_file)
            if args.authkey_file
            else default_authkey_path(listener.address)
        )
        try:
            authkey, created = load_or_create_authkey(key_path)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        orchestrator = orchestrator_from_args(args)
        try:
            http, http_note = http_service_from_args(args, orchestrator)
        except BaseException:
            orchestrator.stop(timeout=0)
            raise
    except BaseException:
        listener.close()
        raise
    if http_note:
        _say(http_note)
    if created:
        _say(f"generated a new authkey in {key_path} (mode 0600)")
    outcome = serve(orchestrator, listener, authkey, drain_timeout=args.drain_timeout, say=_say,
                    ready_details=f"authkey file {key_path}, ", http=http)
    if not outcome.drained:
        return EXIT_FAILED  # a thread died, stop() failed, or the drain timed out: said above
    return EXIT_SIGINT if outcome.signal == signal.SIGINT else EXIT_SIGTERM


def _bind(args: argparse.Namespace) -> Listener:
    try:
        if args.tcp is not None:
            host, port = parse_tcp_address(args.tcp)
            return bind_tcp(host, port, allow_remote=args.allow_remote)
        return bind_unix(args.socket)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _say(line: str) -> None:
    print(f"taskorch serve: {line}", file=sys.stderr, flush=True)
