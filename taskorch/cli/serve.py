"""``taskorch serve``: its options, and the translation of
``taskorch._service.server.serving.serve()`` into messages and an exit status (CLI, server
process, main thread).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from taskorch._errors import JournalError
from taskorch._options import Limit
from taskorch._service.addressing import (
    default_authkey_path,
    default_journal_path,
    load_or_create_authkey,
    normalize_address,
    parse_tcp_address,
)
from taskorch._service.server.journal import MAX_RESULT_BYTES, Journal
from taskorch._service.server.listener import Listener, bind_tcp, bind_unix
from taskorch._service.server.outbox import OUTBOX_LIMIT
from taskorch._service.server.schedules import JournalScheduleStore
from taskorch._service.server.serving import serve
from taskorch.cli import config
from taskorch.cli.config import ScheduleEntry
from taskorch.cli.limits import add_limit_argument
from taskorch.cli.options import (
    EXIT_FAILED,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    UsageError,
    add_pool_arguments,
    orchestrator_from_args,
    prepend_import_paths,
)
from taskorch.cli.serve_http import add_http_arguments, http_service_from_args

#: ``taskorch serve``'s default ``--backlog``: a service's, far above an in-process pool's 128.
#: A queued task is committed to the journal, on disk, before it is accepted: a restart loses
#: none of them, however many, so the bound is not what keeps them safe; it only says how many
#: the server holds in memory at once (about 2.7 KiB each with small arguments: 27 MiB) and
#: how long the last one may wait. What a small bound costs a service is throughput: producers
#: that meet a full backlog wait for room (a round trip each for a remote one, once its credits
#: are spent), and at 128 the workers ran dry between those waits (issue 23: remote run() at
#: 0.25-0.35x a local pool). With 10,000, a producer that waits for room keeps the workers fed.
SERVICE_BACKLOG = 10_000


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
                    "the application's modules are importable (--path DIR, or PYTHONPATH); "
                    "lambdas and __main__ functions travel by value.",
    )
    p.add_argument("--config", metavar="FILE", default=None,
                   help="read options and [[schedule]] entries from a TOML file (keys: the long "
                        "options of serve; options on the command line win; see "
                        "docs/schedules.md)")
    p.add_argument("--check-config", action="store_true",
                   help="check --config (its options, schedules and their targets, limits), "
                        "print the next fire times of each schedule and the limits, and exit: 0 "
                        "if it is good, 2 if not")
    add_limit_argument(p)
    where = p.add_mutually_exclusive_group()
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
    p.add_argument("--socket-mode", type=file_mode, default=None, metavar="MODE",
                   help="the socket's permissions, in octal (e.g. 660 to let --socket-group "
                        "connect; default: as the umask leaves them, in a 0700 directory)")
    p.add_argument("--socket-group", metavar="GROUP", default=None,
                   help="give the socket, its directory (if created here: mode 0710) and the "
                        "authkey file (mode 0640) to GROUP, so that its members (say a web "
                        "server's user) can connect; give --socket-mode 660 too")
    p.add_argument("--pidfile", metavar="PATH", default=None,
                   help="write the server's pid to PATH once it listens; removed at exit")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="at shutdown, how long tasks in flight may take before they are cancelled "
                        "or terminated (default: 30)")
    add_http_arguments(p)
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
    p.add_argument("--max-result-bytes", type=int, default=MAX_RESULT_BYTES, metavar="BYTES",
                   help="largest pickled result a task may return; a larger one fails that "
                        "task with SerializationError (default: 64 MiB less 4 KiB, one frame)")
    p.add_argument("--max-outbox-bytes", type=int, default=OUTBOX_LIMIT, metavar="BYTES",
                   help="per client, most bytes of outcomes held in memory for it; past it "
                        "they wait in the journal until it reads (default: 64 MiB)")
    p.add_argument("--recover-damaged", action="store_true",
                   help="start on a journal that is damaged (its -wal garbled or missing, the "
                        "file emptied: refused by default, naming the accepted tasks lost) "
                        "and run what is left in it")
    p.add_argument("--result-ttl", type=float, default=3600.0, metavar="SECONDS",
                   help="how long outcomes stay in the journal for Client.result(task_id) "
                        "(default: 3600)")
    add_pool_arguments(p, backlog=SERVICE_BACKLOG)
    p.set_defaults(handler=main, serve_parser=p)


def main(args: argparse.Namespace) -> int:
    """``taskorch serve``: runs in the main thread until SIGTERM / SIGINT."""
    entries, limits = _read_config(args)
    if args.check_config:
        return _print_schedules(entries, limits)
    if (args.socket is None) == (args.tcp is None):
        raise UsageError("give one of --socket PATH and --tcp HOST:PORT (on the command line "
                         "or in --config)")
    if not args.drain_timeout >= 0 or args.drain_timeout == float("inf"):
        raise UsageError(f"--drain-timeout must be a number >= 0, got {args.drain_timeout}")
    if args.tcp is not None and (args.socket_mode is not None or args.socket_group is not None):
        raise UsageError("--socket-mode and --socket-group apply to --socket, not --tcp")
    if not args.result_ttl >= 0 or args.result_ttl == float("inf"):
        raise UsageError(f"--result-ttl must be a number >= 0, got {args.result_ttl}")
    gid = None if args.socket_group is None else _group_id(args.socket_group)
    prepend_import_paths(args.path)
    socket_dir_existed = args.socket is not None and os.path.isdir(
        os.path.dirname(os.path.abspath(args.socket)))
    journal = _open_journal(args)
    try:
        listener = _bind(args)
    except BaseException:
        journal.close()
        raise
    pidfile: Path | None = None
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
        if listener.unix_path is not None:
            _share_socket(listener.unix_path, key_path, args.socket_mode, gid,
                          not socket_dir_existed)
        if args.pidfile is not None:
            pidfile = _write_pidfile(Path(args.pidfile))
        orchestrator = orchestrator_from_args(args, limits)
        try:
            http, http_note = http_service_from_args(args, orchestrator)
        except BaseException:
            orchestrator.stop(timeout=0)
            raise
    except BaseException:
        listener.close()
        journal.close()
        if pidfile is not None:
            _remove_pidfile(pidfile)
        raise
    if http_note:
        _say(http_note)
    if created:
        _say(f"generated a new authkey in {key_path} (mode 0600)")
    where = journal.path if journal.durable else "in memory"
    try:
        outcome = serve(orchestrator, listener, authkey, drain_timeout=args.drain_timeout,
                        say=_say, ready_details=f"authkey file {key_path}, journal {where}, ",
                        http=http, journal=journal,
                        before_accepting=lambda: _add_schedules(orchestrator, journal, entries))
    finally:
        if pidfile is not None:
            _remove_pidfile(pidfile)
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
        return Journal(path, result_ttl=args.result_ttl, synchronous=args.journal_sync.upper(),
                       recover_damaged=args.recover_damaged,
                       max_result_bytes=args.max_result_bytes,
                       outbox_bytes=args.max_outbox_bytes)
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


def file_mode(text: str) -> int:
    """``--socket-mode``: permissions in octal, e.g. ``660`` or ``0o660``."""
    try:
        mode = int(text.removeprefix("0o"), 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an octal mode such as 660, got {text}") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"must be between 000 and 777, got {text}")
    return mode


def _group_id(name: str) -> int:
    import grp

    try:
        return grp.getgrnam(name).gr_gid if not name.isdigit() else grp.getgrgid(int(name)).gr_gid
    except KeyError:
        raise UsageError(f"--socket-group: no group {name!r}") from None


def _share_socket(
    path: str, key_path: Path, mode: int | None, gid: int | None, created_dir: bool
) -> None:
    """``--socket-mode`` / ``--socket-group``: who besides this user may connect. A member of
    the group needs to reach the socket (the directory's x bit), to connect (the socket's w
    bit) and to read the key."""
    try:
        if gid is not None:
            os.chown(path, -1, gid)
            os.chown(key_path, -1, gid)
            os.chmod(key_path, 0o640)
            if created_dir:  # a directory of the operator's own is left as it is
                directory = os.path.dirname(path)
                os.chown(directory, -1, gid)
                os.chmod(directory, 0o710)
        if mode is not None:
            os.chmod(path, mode)
    except OSError as exc:
        raise UsageError(f"cannot give the socket {path} to its group or mode: {exc}") from exc


def _write_pidfile(path: Path) -> Path:
    """Write our pid to ``path`` (atomically: a reader never sees it half written). A pidfile
    whose process is alive belongs to another server: refused."""
    try:
        other = int(path.read_text().strip())
    except (OSError, ValueError):
        other = None
    if other is not None and other != os.getpid():
        try:
            os.kill(other, 0)
        except ProcessLookupError:
            pass  # left by a server that died
        except PermissionError:
            raise UsageError(f"--pidfile {path}: process {other} (another user's) holds it")
        else:
            raise UsageError(f"--pidfile {path}: process {other} is running and holds it")
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        temporary.write_text(f"{os.getpid()}\n")
        os.replace(temporary, path)
    except OSError as exc:
        raise UsageError(f"cannot write --pidfile {path}: {exc}") from exc
    return path


def _remove_pidfile(path: Path) -> None:
    """Remove our pidfile, unless another process has written its own there since."""
    try:
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def _say(line: str) -> None:
    print(f"taskorch serve: {line}", file=sys.stderr, flush=True)


def _add_schedules(orchestrator: Any, journal: Journal, entries: list[ScheduleEntry]) -> None:
    """Arm the config's schedules (``serve()``, once the journal is recovered and its writer
    runs: a tick missed in the downtime fires now, after the recovered tasks)."""
    if entries:  # their last fires live in the journal (in memory with --no-journal)
        orchestrator.keep_schedule_state(JournalScheduleStore(journal))
    for entry in entries:
        orchestrator.schedule(entry.fn, name=entry.name, args=entry.args, kwargs=entry.kwargs,
                              policy=entry.policy, **entry.options)


def _read_config(args: argparse.Namespace) -> tuple[list[ScheduleEntry], dict[str, Limit]]:
    """``--config``: its options onto ``args`` (the command line wins); its schedules, and
    its limits with ``--limit``'s."""
    if args.config is None:
        if args.check_config:
            raise UsageError("--check-config needs --config FILE")
        return config.entries(None, {}, args.path, args.limit)
    data = config.read_file(args.config)
    config.apply_options(args.config, data, args, args.serve_parser)
    prepend_import_paths(args.path)  # the schedules' targets may live there
    return config.entries(args.config, data, args.path, args.limit)


def _print_schedules(entries: list[ScheduleEntry], limits: dict[str, Limit],
                     count: int = 3) -> int:
    import time

    from taskorch._parent.schedule import Schedule, describe_time
    from taskorch.cli.limits import describe

    out = sys.stdout
    out.write(f"config ok: {len(entries)} schedule(s), {len(limits)} limit(s)\n")
    for name, limit in limits.items():
        out.write(f"limit {describe(name, limit)}\n")
    for entry in entries:
        spec = Schedule(name=entry.name, **entry.options)
        when = spec.cron and f"cron {spec.cron!r} ({spec.timezone or 'UTC'})" or (
            f"every {spec.every:g} s")
        out.write(f"{entry.name}: {entry.target}, {when}; next:")
        tick = time.time()
        for _ in range(count):
            tick = spec.next_tick(tick)
            out.write(f" {describe_time(tick)}")
        out.write("\n")
    return 0
