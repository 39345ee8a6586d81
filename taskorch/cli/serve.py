"""``taskorch serve``: its options, and the translation of ``taskorch._service.server.serve()``
into messages and an exit status (CLI, server process, main thread).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from taskorch._errors import JournalError
from taskorch._service.addressing import (
    default_authkey_path,
    default_journal_path,
    load_or_create_authkey,
    normalize_address,
    parse_tcp_address,
)
from taskorch._service.journal import Journal
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
                        "code as this user, and the traffic is authenticated but not encrypted")
    p.add_argument("--authkey-file", metavar="PATH",
                   help="the shared key (default: PATH.authkey next to the socket; "
                        "~/.config/taskorch/authkey for TCP)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="at shutdown, how long tasks in flight may take before they are cancelled "
                        "or terminated (default: 30)")
    journal = p.add_mutually_exclusive_group()
    journal.add_argument("--journal", metavar="PATH",
                         help="the SQLite journal of accepted tasks (default: under "
                              "$XDG_STATE_HOME/taskorch, else ~/.local/state/taskorch, named "
                              "after the address; in memory for --tcp port 0). A task is "
                              "accepted once committed there; unfinished tasks run again after "
                              "a restart. One server per journal")
    journal.add_argument("--no-journal", action="store_true",
                         help="keep accepted tasks in memory only: a crash loses them")
    p.add_argument("--journal-sync", choices=("full", "normal"), default="full",
                   help="full (default): a commit survives a power loss (an fsync per group "
                        "commit); normal: it survives a crash of the server, not of the machine")
    p.add_argument("--result-ttl", type=float, default=3600.0, metavar="SECONDS",
                   help="how long outcomes stay in the journal for Client.result(task_id) "
                        "(default: 3600)")
    add_pool_arguments(p)
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    """``taskorch serve``: runs in the main thread until SIGTERM / SIGINT."""
    if not args.drain_timeout >= 0 or args.drain_timeout == float("inf"):
        raise UsageError(f"--drain-timeout must be a number >= 0, got {args.drain_timeout}")
    if not args.result_ttl >= 0 or args.result_ttl == float("inf"):
        raise UsageError(f"--result-ttl must be a number >= 0, got {args.result_ttl}")
    journal = _open_journal(args)
    try:
        listener = _bind(args)
    except BaseException:
        journal.close()
        raise
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
    except BaseException:
        listener.close()
        journal.close()
        raise
    if created:
        _say(f"generated a new authkey in {key_path} (mode 0600)")
    where = journal.path if journal.durable else "in memory"
    outcome = serve(orchestrator, listener, authkey, drain_timeout=args.drain_timeout, say=_say,
                    ready_details=f"authkey file {key_path}, journal {where}, ", journal=journal)
    if not outcome.drained:
        return EXIT_FAILED  # a thread died, stop() failed, or the drain timed out: said above
    return EXIT_SIGINT if outcome.signal == signal.SIGINT else EXIT_SIGTERM


def _open_journal(args: argparse.Namespace) -> Journal:
    """Open and lock the journal before anything else, so that a second server on it is
    refused before it binds; JournalError (corrupt, locked, unwritable) is a usage error."""
    path: str | None = None
    if args.journal:
        path = args.journal
    elif not args.no_journal:
        try:
            address = normalize_address(
                args.socket if args.tcp is None else parse_tcp_address(args.tcp))
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        default = default_journal_path(address)
        if default is None:
            _say("--tcp with port 0: the journal is in memory (pass --journal PATH to keep it)")
        else:
            default.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = str(default)
    try:
        return Journal(path, result_ttl=args.result_ttl, synchronous=args.journal_sync.upper())
    except JournalError as exc:
        raise UsageError(str(exc)) from exc


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
