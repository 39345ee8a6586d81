"""``taskorch serve``'s per-name limits: ``--limit NAME=concurrency:1,rate:10/s`` (repeatable)
and ``[[limit]]`` entries of ``--config`` (CLI, server process, main thread, before anything
starts).

    [[limit]]
    name = "myapp.jobs.purge"        # the task name: module and qualified name, dot-joined
    concurrency = 1                  # at most this many at once (optional)
    rate = "10/s"                    # at most this many starts: "N/s", "N/m" or "N/h" (optional)

Each becomes a ``taskorch.Limit`` for ``TaskOrchestrator(limits=...)``: the server's backlog
applies it to every task of that name, whichever client sent it. Every entry is checked and
every error returned (``--check-config`` lists them all), each naming the entry or the flag and
the field: an unknown field, a concurrency that is not an integer >= 1, a rate that is not
``N/s``, ``N/m`` or ``N/h``, neither of them, a name given twice in one place, a name with a
``:`` (a schedule target's ``module:function`` form: a task's name is dot-joined, so that one
would never match; the error names the dotted form). A name given both
on the command line and in the file takes the command line's limit (as any option does).
"""

from __future__ import annotations

import argparse
import difflib
from typing import Any

from taskorch._options import Limit

#: The fields of a ``[[limit]]`` entry but its ``name``: those of a ``--limit`` flag.
LIMIT_FIELDS = ("concurrency", "rate")


def _check_name(where: str, name: str) -> None:
    """ValueError for a name no task can have: ``module:function`` (a schedule's target)."""
    if ":" in name:
        raise ValueError(f"{where}: a limit names a task by its module and qualified name, "
                         f"dot-joined: {name.replace(':', '.')!r}, not {name!r} (the "
                         "module:function form is a schedule target's; it matches no task)")


def _check(where: str, fields: dict[str, Any]) -> Limit:
    """A ``Limit`` from an entry's fields (``name`` taken out); ValueError naming ``where``."""
    unknown = [k for k in fields if k not in LIMIT_FIELDS]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], LIMIT_FIELDS + ("name",), n=1)
        raise ValueError(f"{where}: unknown field {unknown[0]!r}"
                         + (f" (did you mean {hint[0]!r}?)" if hint else "")
                         + "; the fields are concurrency and rate")
    concurrency, rate = fields.get("concurrency"), fields.get("rate")
    if concurrency is None and rate is None:
        raise ValueError(f"{where}: give concurrency, rate, or both")
    if concurrency is not None and (isinstance(concurrency, bool) or not isinstance(
            concurrency, int) or concurrency < 1):
        raise ValueError(f"{where}: concurrency must be an integer >= 1, got {concurrency!r}")
    try:
        return Limit(concurrency=concurrency, rate=rate)
    except ValueError as exc:
        raise ValueError(f"{where}: {str(exc).removeprefix('Limit ')}") from None


def from_flag(text: str) -> tuple[str, Limit]:
    """One ``--limit NAME=concurrency:N,rate:N/s``; ValueError naming the flag."""
    where = f"--limit {text!r}"
    name, sep, spec = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"{where}: expected NAME=concurrency:N,rate:N/s (the task's module "
                         "and qualified name, dot-joined, then one or both fields)")
    fields: dict[str, Any] = {}
    for part in spec.split(","):
        field, colon, value = (s.strip() for s in part.partition(":"))
        if not colon or not field or not value:
            raise ValueError(f"{where}: {part.strip()!r} is not FIELD:VALUE (concurrency:N, "
                             "rate:N/s)")
        if field in fields:
            raise ValueError(f"{where}: {field!r} is given twice")
        fields[field] = value
    _check_name(where, name)
    concurrency = fields.get("concurrency")
    if concurrency is not None and concurrency.lstrip("-").isdigit():
        fields["concurrency"] = int(concurrency)  # (else _check names the text)
    return name, _check(where, fields)


def from_flags(flags: list[str]) -> tuple[dict[str, Limit], list[str]]:
    """Every ``--limit``: the limits by name, and every error (a name twice is one)."""
    limits: dict[str, Limit] = {}
    errors: list[str] = []
    names: set[str] = set()
    for text in flags:
        name = text.partition("=")[0].strip()
        if name and name in names:
            errors.append(f"--limit {text!r}: a limit for {name!r} is given twice")
            continue
        names.add(name)
        try:
            name, limit = from_flag(text)
        except ValueError as exc:
            errors.append(str(exc))
        else:
            limits[name] = limit
    return limits, errors


def from_file(path: str, data: dict[str, Any]) -> tuple[dict[str, Limit], list[str]]:
    """The ``[[limit]]`` entries of a parsed config file, and every error."""
    entries = data.get("limit", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        return {}, [f"--config {path}: 'limit' must be [[limit]] tables (name, concurrency, "
                    "rate)"]
    limits: dict[str, Limit] = {}
    errors: list[str] = []
    names: set[str] = set()  # (a wrong entry's too: its name twice is a second error)
    for number, entry in enumerate(entries, 1):
        name = entry.get("name")
        where = f"--config {path}: [[limit]] #{number}"
        if not isinstance(name, str) or not name:
            errors.append(f"{where}: 'name' is required (a task's module and qualified name, "
                          "such as 'myapp.jobs.purge')")
            continue
        where += f" ({name!r})"
        if name in names:
            errors.append(f"{where}: a limit for {name!r} is defined twice")
            continue
        names.add(name)
        try:
            _check_name(where, name)
            limits[name] = _check(where, {k: v for k, v in entry.items() if k != "name"})
        except ValueError as exc:
            errors.append(str(exc))
    return limits, errors


def describe(name: str, limit: Limit) -> str:
    """One line for ``--check-config``: ``myapp.jobs.purge: concurrency 1, rate 10/s``."""
    parts = ([f"concurrency {limit.concurrency}"] if limit.concurrency is not None else []) + (
        [f"rate {limit.rate}"] if limit.rate is not None else [])
    return f"{name}: {', '.join(parts)}"


def add_limit_argument(parser: argparse.ArgumentParser) -> None:
    """``serve --limit`` (read by ``from_flags``: its errors are listed with the file's)."""
    parser.add_argument(
        "--limit", action="append", default=[], metavar="NAME=LIMIT",
        help="a per-name limit for every client's tasks of NAME (the function's module and "
             "qualified name, e.g. myapp.jobs.purge): concurrency:N (at most N at once), "
             "rate:N/s, N/m or N/h (starts spread evenly), or both, comma-separated: --limit "
             "myapp.jobs.purge=concurrency:1,rate:10/s. Repeatable; [[limit]] entries in "
             "--config too (this wins for a name in both). A task over its limit waits (state "
             "'waiting') while other tasks pass it")
