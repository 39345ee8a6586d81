"""The ``taskorch`` command (parent process, main thread): argument parsing and dispatch.

    taskorch run TARGET      run a function over JSON-lines inputs (taskorch.cli.run)
    taskorch serve           a long-running pool other processes submit to (taskorch.cli.serve)
    taskorch status          print a server's statistics (taskorch.cli.status)
    taskorch trigger NAME    run one of a server's schedules now (taskorch.cli.trigger)
    taskorch tasks|cancel|retry|purge   a server's tasks, by id (taskorch.cli.operate)
    taskorch demo            the main job: offload real cleanup work (taskorch.cli.demo)

Exit codes (``taskorch.cli.options``): 0 success, 1 some task failed, 2 usage error, 3 the
output could not be written, 130 / 143 after SIGINT / SIGTERM (once drained).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Sequence

from taskorch.cli.options import EXIT_OUTPUT, EXIT_USAGE, LOG_LEVELS, UsageError

__all__ = ["build_parser", "main"]

EPILOG = """exit status: 0 success; 1 some task failed (run, demo) or the server could not be
reached (status); 2 usage error or bad input; 3 the output could not be written (a closed
pipe, a full disk: records were lost); 130 / 143 stopped by SIGINT / SIGTERM, after draining
(serve: 1 if the drain timed out)"""


def build_parser() -> argparse.ArgumentParser:
    from taskorch import __version__
    from taskorch.cli import demo, operate, run, serve, status, trigger

    parser = argparse.ArgumentParser(
        prog="taskorch",
        description="Run CPU-heavy background work in crash-isolated worker processes, "
                    "with retries, timeouts and a bounded backlog.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"taskorch {__version__}")
    parser.add_argument("--log-level", default="WARNING", choices=LOG_LEVELS,
                        help="logging level on stderr (default: WARNING)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run.add_parser(sub)
    serve.add_parser(sub)
    status.add_parser(sub)
    trigger.add_parser(sub)
    operate.add_parsers(sub)
    demo.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the subcommand's parser, with its usage, not the top level's
        sub = _subcommand_parser(parser, args.command)
        (sub or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr,
    )
    try:
        code: int = args.handler(args)
        sys.stdout.flush()  # here, where a closed pipe can still be handled
    except UsageError as exc:
        parser.exit(EXIT_USAGE, f"taskorch {args.command}: error: {exc}\n")
    except BrokenPipeError:
        # The reader of stdout went away (`taskorch status | head -1`): what was written is
        # all it wanted. Python's exit-time flush of stdout must not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OUTPUT
    return code


def _subcommand_parser(parser: argparse.ArgumentParser,
                       command: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:  # (argparse keeps its subparsers there, and nowhere else)
        choices = action.choices if action.dest == "command" else None
        if isinstance(choices, dict):
            found = choices.get(command)
            return found if isinstance(found, argparse.ArgumentParser) else None
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
