"""``taskorch serve --config FILE``: the server's options and its schedules from a TOML file
(CLI, server process, main thread, before anything starts).

    # taskorch.toml
    socket = "/run/myapp/taskorch.sock"      # any long option of `serve`, dashes and all
    workers = 4
    timeout = 600

    [[schedule]]
    name = "purge-sessions"
    target = "workers/sqlite_purge.py:purge_expired"   # relative to this file's folder
    kwargs = { db_path = "/var/lib/myapp/app.db", table = "sessions", column = "expires_at" }
    every = "10m"                            # or cron = "30 2 * * *" (and timezone = "...")

    [[limit]]                                # see ``limits``
    name = "sqlite_purge.purge_expired"
    concurrency = 1

A key of the file is a long option of ``taskorch serve`` (``workers``, ``max-tasks-per-worker``,
``retry-on``, ...), read as the command line would read it; an option given on the command
line wins over the file. ``[[schedule]]`` entries take ``name``, ``target``, ``args``,
``kwargs``, ``cron`` or ``every``, ``timezone``, ``jitter``, ``overlap``, ``misfire``,
``catch_up_limit``, ``retries`` and ``timeout`` (the schedule's own policy). ``[[limit]]``
entries take ``name``, ``concurrency`` and ``rate`` (``limits``). Anything wrong (a syntax
error with its line, an unknown key, a bad value, a cron expression, a target that does not
import, two schedules or limits with one name) is a ``UsageError`` that names the file and the
key; the entries' errors are listed all at once (``entries``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import tomllib
from pathlib import Path
from typing import Any, Callable

from taskorch._options import Limit
from taskorch.cli import limits as limit_entries
from taskorch.cli.options import UsageError

#: The keys of a ``[[schedule]]`` entry.
SCHEDULE_KEYS = ("name", "target", "args", "kwargs", "cron", "every", "timezone", "jitter",
                 "overlap", "misfire", "catch_up_limit", "retries", "timeout")
#: Options of ``serve`` that a file may not set (they steer this command, not the server).
NOT_IN_FILE = {"config", "check_config", "help", "handler", "log_level"}


@dataclasses.dataclass(frozen=True)
class ScheduleEntry:
    """One ``[[schedule]]``, checked: ready for ``TaskOrchestrator.schedule()``."""

    name: str
    fn: Callable[..., Any]
    target: str
    options: dict[str, Any]  # cron/every/timezone/jitter/overlap/misfire/catch_up_limit
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    policy: Any  # a taskorch.Policy, or None: the server's


def read_file(path: str) -> dict[str, Any]:
    """The parsed TOML file; UsageError with the file (and line) if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"--config {path}: cannot read it: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config {path}: not valid TOML: {exc}") from exc


def apply_options(path: str, data: dict[str, Any], args: argparse.Namespace,
                  parser: argparse.ArgumentParser) -> None:
    """Set each option the file gives on ``args``, unless the command line gave it (its value
    differs from the parser's default)."""
    actions = {a.dest: a for a in parser._actions if a.option_strings}  # noqa: SLF001
    names = {a.option_strings[-1].lstrip("-"): a for a in actions.values()
             if a.option_strings[-1].startswith("--") and a.dest not in NOT_IN_FILE}
    for key, value in data.items():
        if key in ("schedule", "limit"):  # (tables: ``entries``)
            continue
        action = names.get(key)
        if action is None:
            hint = difflib.get_close_matches(key, list(names) + ["schedule", "limit"], n=1)
            raise UsageError(f"--config {path}: unknown key {key!r}"
                             + (f" (did you mean {hint[0]!r}?)" if hint else "")
                             + "; the keys are the long options of 'taskorch serve'")
        converted = _convert(path, key, value, action)
        if getattr(args, action.dest) == parser.get_default(action.dest):
            setattr(args, action.dest, converted)


def _convert(path: str, key: str, value: Any, action: argparse.Action) -> Any:
    where = f"--config {path}: {key}"
    if action.nargs == 0:  # a flag (store_true / store_false)
        if not isinstance(value, bool):
            raise UsageError(f"{where}: must be true or false, got {value!r}")
        return value if action.const is True else not value
    values = value if isinstance(value, list) and isinstance(action, argparse._AppendAction) \
        else [value]  # noqa: SLF001
    converted = []
    for one in values:
        if isinstance(one, (dict, list)):
            raise UsageError(f"{where}: must be a single value, got {one!r}")
        text = str(one).lower() if isinstance(one, bool) else str(one)
        try:
            item = action.type(text) if callable(action.type) else text
        except (ValueError, TypeError, argparse.ArgumentTypeError, UsageError) as exc:
            raise UsageError(f"{where}: {exc}") from None
        if action.choices is not None and item not in action.choices:
            raise UsageError(f"{where}: must be one of {', '.join(map(str, action.choices))}, "
                             f"got {one!r}")
        converted.append(item)
    return converted if isinstance(action, argparse._AppendAction) else converted[0]  # noqa: SLF001


def entries(path: str | None, data: dict[str, Any], local_dirs: list[str],
            limit_flags: list[str]) -> tuple[list[ScheduleEntry], dict[str, Limit]]:
    """The ``[[schedule]]`` entries, each checked (its target imported), and the limits of
    ``[[limit]]`` and ``--limit`` (those win for a name in both); a UsageError lists every
    wrong entry and flag (``path`` None: no file, the flags alone)."""
    found, errors = ([], []) if path is None else _schedules(path, data, local_dirs)
    limits, limit_errors = ({}, []) if path is None else limit_entries.from_file(path, data)
    flagged, flag_errors = limit_entries.from_flags(limit_flags)
    errors += limit_errors + flag_errors
    if len(errors) == 1:
        raise UsageError(errors[0])
    if errors:
        raise UsageError(f"{len(errors)} errors in "
                         + (f"--config {path}" if path is not None else "--limit")
                         + (" and --limit" if path is not None and flag_errors else "")
                         + ":\n  " + "\n  ".join(errors))
    return found, {**limits, **flagged}


def _schedules(path: str, data: dict[str, Any], local_dirs: list[str],
               ) -> tuple[list[ScheduleEntry], list[str]]:
    """The good ``[[schedule]]`` entries and the errors of the others."""
    tables = data.get("schedule", [])
    if not isinstance(tables, list) or not all(isinstance(e, dict) for e in tables):
        return [], [f"--config {path}: 'schedule' must be [[schedule]] tables"]
    found: list[ScheduleEntry] = []
    errors: list[str] = []
    folder = os.path.dirname(os.path.abspath(path))
    for number, entry in enumerate(tables, 1):
        try:  # every entry is checked: all the errors are shown at once, not the first alone
            found.append(_schedule(path, number, entry, found, folder, local_dirs))
        except UsageError as exc:
            errors.append(str(exc))
    return found, errors


def _schedule(path: str, number: int, entry: dict[str, Any], found: list[ScheduleEntry],
              folder: str, local_dirs: list[str]) -> ScheduleEntry:
    """One ``[[schedule]]`` entry, checked; UsageError naming it if it is wrong."""
    from taskorch._parent.schedule import Schedule, parse_every
    from taskorch._policy import Policy
    from taskorch.cli.target import resolve_target

    where = f"--config {path}: [[schedule]] #{number}"
    name = entry.get("name")
    if isinstance(name, str) and name:
        where += f" ({name!r})"
    unknown = [k for k in entry if k not in SCHEDULE_KEYS]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], SCHEDULE_KEYS, n=1)
        raise UsageError(f"{where}: unknown key {unknown[0]!r}"
                         + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + f"; the keys are {', '.join(SCHEDULE_KEYS)}")
    for key in ("name", "target"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise UsageError(f"{where}: {key!r} is required (a string)")
    if any(e.name == name for e in found):
        raise UsageError(f"{where}: a schedule named {name!r} is defined twice")
    args, kwargs = entry.get("args", []), entry.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise UsageError(f"{where}: 'args' must be an array and 'kwargs' a table")
    options: dict[str, Any] = {k: entry[k] for k in (
        "cron", "timezone", "jitter", "overlap", "misfire", "catch_up_limit") if k in entry}
    try:
        if "every" in entry:
            options["every"] = parse_every(entry["every"])
        Schedule(name=entry["name"], **options)
        policy = None
        if "retries" in entry or "timeout" in entry:
            base = Policy.default()
            timeout = entry.get("timeout", base.timeout)
            policy = dataclasses.replace(
                base, retries=entry.get("retries", base.retries),
                timeout=None if timeout in ("none", None) else timeout)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{where}: {exc}") from None
    target = _relative_to(entry["target"], folder)
    try:
        fn = resolve_target(target, local_dirs)
    except UsageError as exc:
        raise UsageError(f"{where}: target: {exc}") from None
    return ScheduleEntry(entry["name"], fn, entry["target"], options, tuple(args), kwargs, policy)


def _relative_to(target: str, folder: str) -> str:
    """A path target (``path/file.py:function``) is read relative to the file's folder."""
    module_part, sep, attr = target.rpartition(":")
    if sep and (module_part.endswith(".py") or os.sep in module_part) and not os.path.isabs(
            module_part):
        return f"{Path(folder) / module_part}:{attr}"
    return target
