"""``taskorch run``'s JSON lines: an input line parsed into a call's arguments, and the
record written for each input (CLI, parent process; ``parse_input`` on the reader thread,
the records on the writer thread). The record format is in docs/cli.md and ``run``'s help.
"""

from __future__ import annotations

import json
import traceback
from concurrent.futures import Future
from typing import Any

from taskorch._errors import RemoteTraceback, WorkerCrashedError
from taskorch._wire import decode_exception
from taskorch._worker.map import ItemError
from taskorch.cli.options import UsageError


def parse_input(line: str, line_number: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        shown = line.strip()
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise UsageError(f"input line {line_number}: not valid JSON ({exc.msg} at column "
                         f"{exc.colno}): {shown!r}") from None
    if isinstance(value, list):
        return tuple(value), {}
    if isinstance(value, dict):
        if value and set(value) <= {"args", "kwargs"}:
            args, kwargs = value.get("args", []), value.get("kwargs", {})
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise UsageError(
                    f'input line {line_number}: "args" must be an array and "kwargs" an object'
                )
            return tuple(args), kwargs
        return (), value
    raise UsageError(
        f"input line {line_number}: expected a JSON array or object, "
        f"got {type(value).__name__}"
    )


# -- records ---------------------------------------------------------------------------------


def record(
    index: int, future: Future[Any] | None, error: tuple[str, str] | None = None
) -> dict[str, Any]:
    """The output record of one input (see the module docstring)."""
    if future is None:
        assert error is not None
        return {"index": index, "ok": False,
                "error": {"type": error[0], "message": error[1]}, "attempts": 0}
    attempts = getattr(future, "attempts", 0)
    if future.cancelled():
        return {"index": index, "ok": False,
                "error": {"type": "Cancelled", "message": "never started: the run was interrupted"},
                "attempts": attempts}
    exc = future.exception()
    if exc is not None:
        return {"index": index, "ok": False, "error": error_of(exc), "attempts": attempts}
    out: dict[str, Any] = {"index": index, "ok": True, "result": future.result(),
                           "attempts": attempts,
                           "seconds": round(getattr(future, "seconds", None) or 0.0, 6)}
    return out


def error_of(exc: BaseException) -> dict[str, Any]:
    """A record's "error": type and message; and, for the joblog alone (the writer pops them
    before the record is written), "traceback" (the worker's) and "signal" (the number of the
    signal that killed the worker, else 0)."""
    type_name = getattr(exc, "type_name", None) or type(exc).__name__
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        tb = cause.tb
    else:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    exitcode = exc.exitcode if isinstance(exc, WorkerCrashedError) else None
    message = str(exc)
    for note in getattr(exc, "__notes__", ()):  # e.g. _wire's hint about __main__
        if isinstance(note, str) and note not in message:
            message += f" ({note})"
    return {"type": type_name, "message": message, "traceback": tb,
            "signal": -exitcode if exitcode is not None and exitcode < 0 else 0}


def records_of(indices: list[int], future: Future[Any] | None, error: tuple[str, str] | None,
               chunked: bool) -> list[dict[str, Any]]:
    """The records of one submission: one input, or a chunk of them (--chunksize > 1)."""
    if not chunked or future is None or future.cancelled() or future.exception() is not None:
        return [record(i, future, error) for i in indices]
    out = []
    attempts = getattr(future, "attempts", 0)
    for index, item in zip(indices, future.result()):
        if isinstance(item, ItemError):
            out.append({"index": index, "ok": False,
                        "error": error_of(decode_exception(*item.described)),
                        "attempts": attempts})
        else:
            out.append({"index": index, "ok": True, "result": item, "attempts": attempts})
    return out


def dump_record(rec: dict[str, Any]) -> str:
    try:
        return json.dumps(rec)
    except (TypeError, ValueError):
        rec["result"] = repr(rec["result"])
        rec["result_is_repr"] = True  # the result was not JSON-serializable
        return json.dumps(rec)
