"""Everything that crosses the process boundary, in one place. Imported by both sides.

Each worker has a private duplex connection to the parent (a socketpair, no lock shared with
any other worker, so a worker killed mid-write can only corrupt its own channel). Frames are
``pickle`` bytes; the task itself travels inside as bytes already pickled by cloudpickle in
``run()``, so the dispatcher never pickles user objects.

parent -> worker, one frame at a time:

    CALLS     a list of call items ``(task_id, payload, policy, attempts_done)``:
              ``payload`` is ``encode_call()`` bytes, ``policy`` is ``None`` (the worker's
              default) or ``encode_policy()`` bytes, ``attempts_done`` the attempts already
              charged to the task by earlier crashes (the budget left is ``max_attempts -
              attempts_done``).
    SHUTDOWN  an empty frame: finish what you hold, then exit.
    RECALL    the bytes ``RECALL``: hand back the calls you have not started (answered with
              RECALLED), so that an idle worker can take them.

worker -> parent, a frame is a list of events (several per frame when the worker is busy):

    (STARTED, task_id, attempt)                  attempt ``attempt`` (1-based, over the whole
                                                 task) is about to run; for attempt 1 this is
                                                 the start ack that frees a backlog slot
    (RETRYING, task_id, attempt, error, delay, timed_out)
                                                 attempt failed with ``error`` (a one-line
                                                 summary; ``timed_out``: it was a
                                                 TaskTimeoutError); the next starts in
                                                 ``delay`` s
    (SUCCEEDED, task_id, attempts, seconds, result)      ``result``: pickled return value
    (FAILED, task_id, attempts, seconds, exc, type_name, message, traceback_text)
                                                 ``exc``: pickled exception, or None when it
                                                 does not round-trip through pickle
    (RETIRING, reason)                           the worker leaves after its current frame
                                                 (recycling); it takes no more calls
    (READY, pid)                                 sent once, when the worker has started: a
                                                 worker that dies before it failed to start
    (RECALLED, [task_id, ...])                   the answer to RECALL: these calls were not
                                                 started and never will be here

The names on each side: the parent holds a ``_parent_task.WorkItem`` (with the Future); a call
item is what goes to the worker; events are what come back.
"""

from __future__ import annotations

import pickle
import traceback
from typing import Any, Callable

import cloudpickle

from taskorch._errors import RemoteTaskError, RemoteTraceback, SerializationError
from taskorch._policy import Policy

PROTOCOL = pickle.HIGHEST_PROTOCOL

SHUTDOWN = b""
RECALL = b"recall"  # never a pickle of a list

# Event tags (the first element of each event tuple).
STARTED = 1
RETRYING = 2
SUCCEEDED = 3
FAILED = 4
RETIRING = 5
READY = 6
RECALLED = 7

CallItem = tuple[int, bytes, "bytes | None", int]
Event = tuple[Any, ...]


def encode_frame(obj: object) -> bytes:
    return pickle.dumps(obj, PROTOCOL)


decode_frame: Callable[[bytes], Any] = pickle.loads


def encode_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle a task in the caller's thread, so that a bad task fails in run(), not later."""
    try:
        return cloudpickle.dumps((fn, args, kwargs), PROTOCOL)  # type: ignore[no-any-return]
    except Exception as exc:
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        raise SerializationError(
            f"task {name!r} cannot be sent to a worker process: "
            f"{type(exc).__name__}: {exc}. Every argument must be picklable by cloudpickle "
            "(locks, open files, sockets and generators are not); pass paths or plain data, "
            "and open resources inside the task"
        ) from exc


def decode_call(payload: bytes) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    fn, args, kwargs = pickle.loads(payload)
    return fn, args, kwargs


def encode_policy(policy: Policy) -> bytes:
    try:
        return cloudpickle.dumps(policy, PROTOCOL)  # type: ignore[no-any-return]
    except Exception as exc:
        raise SerializationError(f"policy {policy!r} cannot be pickled: {exc}") from exc


def decode_policy(data: bytes) -> Policy:
    policy = pickle.loads(data)
    assert isinstance(policy, Policy)
    return policy


def encode_result(value: object) -> bytes:
    """Pickle a task's return value in the worker; plain pickle first, cloudpickle for the rest."""
    try:
        return pickle.dumps(value, PROTOCOL)
    except Exception:
        pass
    try:
        return cloudpickle.dumps(value, PROTOCOL)  # type: ignore[no-any-return]
    except Exception as exc:
        raise SerializationError(
            f"the task returned a {type(value).__qualname__} that cannot be pickled back to the "
            f"parent: {type(exc).__name__}: {exc}. Return plain data (or write the result to a "
            "file and return its path)"
        ) from exc


def encode_exception(exc: BaseException) -> tuple[bytes | None, str, str, str]:
    """Describe a task's exception: pickled when it round-trips, always with name and text."""
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    if type(exc).__module__ == "builtins":
        type_name = type(exc).__qualname__
    try:
        message = str(exc)
    except Exception:
        message = "<str() of the exception failed>"
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    data: bytes | None = None
    if isinstance(exc, Exception):  # SystemExit / KeyboardInterrupt must not re-raise in the parent
        try:
            data = cloudpickle.dumps(exc, PROTOCOL)
            pickle.loads(data)  # an exception whose __init__ needs other args fails only here
        except Exception:
            data = None
    return data, type_name, message, tb


def decode_exception(
    data: bytes | None, type_name: str, message: str, tb: str
) -> BaseException:
    """Rebuild a task's exception in the parent, with the remote traceback as its cause."""
    exc: BaseException | None = None
    if data is not None:
        try:
            exc = pickle.loads(data)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        exc = RemoteTaskError(type_name, message, tb)
    exc.__cause__ = RemoteTraceback(tb)
    return exc


def summarize(exc: BaseException) -> str:
    """One line for logs: ``TypeName: message``."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
