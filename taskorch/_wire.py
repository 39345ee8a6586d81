"""The worker channel: everything that crosses between the parent and its workers. Imported by
both sides (the parent's dispatcher thread and callers; the worker's main thread). The service's
protocol (``taskorch serve`` <-> ``connect()``) is in ``taskorch._service.protocol``.

Each worker has a private duplex connection to the parent (a socketpair, no lock shared with
any other worker, so a worker killed mid-write can only corrupt its own channel). Frames are
``pickle`` bytes; the task itself travels inside as bytes already pickled in ``run()``
(``encode_call``: cloudpickle, or a cached reference to a module function and its arguments),
so the dispatcher never pickles user objects.

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
                                                 the start ack that frees a backlog slot (a
                                                 Dask worker appends its pid)
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

The Dask backend speaks the same events (``_worker.dask``), with its submission id in place
of the task id, carried by the scheduler instead of a socketpair.

The names on each side: the parent holds a ``_parent.task.WorkItem`` (with the Future); a call
item is what goes to the worker; events are what come back.
"""

from __future__ import annotations

import pickle
import struct
import sys
import traceback
import weakref
from types import FunctionType, ModuleType
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


def split_frames(buffer: bytearray) -> list[bytes]:
    """Remove the complete frames at the front of ``buffer`` and return them.

    The framing is ``multiprocessing.connection.Connection.send_bytes``'s, which the workers
    send with: a 4-byte big-endian signed length, or -1 and then an 8-byte length for a frame
    of 2 GiB or more. The parent reads its channels in large chunks and splits them here: one
    ``read`` for every frame that has arrived, where ``recv_bytes`` costs two reads and a poll
    per frame (about one frame per task)."""
    frames: list[bytes] = []
    view = memoryview(buffer)
    pos, end = 0, len(buffer)
    try:
        while end - pos >= 4:
            size = _LENGTH.unpack_from(view, pos)[0]
            head = 4
            if size == -1:
                if end - pos < 12:
                    break
                size = _LONG_LENGTH.unpack_from(view, pos + 4)[0]
                head = 12
            if end - pos - head < size:
                break
            frames.append(bytes(view[pos + head:pos + head + size]))
            pos += head + size
    finally:
        view.release()
    del buffer[:pos]
    return frames


_LENGTH = struct.Struct("!i")
_LONG_LENGTH = struct.Struct("!Q")


# A call's payload (``encode_call``) is one of two forms, told apart by the first byte:
#
#   b"\x80..."            cloudpickle of ``(fn, args, kwargs)``: the general form;
#   BY_REFERENCE n fn a    a module-level Python function that cloudpickle pickles by reference
#                          (its module and name, nothing else): ``n`` (2 bytes, big-endian) is
#                          the length of ``fn``, its pickle, made once per function and cached
#                          in the parent; ``a`` is the pickle of ``(args, kwargs)``, by the C
#                          pickler when they are plain scalars. Same objects in the worker.
#
# The first form costs ~3.4 us a call, mostly cloudpickle deciding again, in Python, that the
# function is pickled by reference; the second ~1.5 us with plain arguments (measured). Nothing
# is cached for a function cloudpickle pickles by value (lambdas, closures, __main__ functions,
# modules registered for pickling by value): their pickle carries state that may change between
# calls, and they keep one pickle with their arguments, so objects shared between the two stay
# shared. While any module is registered with cloudpickle.register_pickle_by_value, the cache
# is not used.
# Hazard: whatever decodes calls must know the second form. A `taskorch serve` from before it
# speaks SERVICE_VERSION 1, and the client's handshake refuses it; Dask workers must run the
# same taskorch as the client, as for the rest of what crosses to them.
BY_REFERENCE = b"R"
_FN_LENGTH = struct.Struct("!H")
_MAX_FN_LENGTH = 0xFFFF
_PLAIN_TYPES = frozenset({int, float, str, bytes, bool, type(None)})
# function -> (its module when decided, its pickle or None)
_by_reference: weakref.WeakKeyDictionary[Callable[..., Any], tuple[ModuleType, bytes | None]] = (
    weakref.WeakKeyDictionary()
)


def encode_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle a task in the caller's thread, so that a bad task fails in run(), not later."""
    try:
        fn_bytes = (
            _reference_pickle(fn)
            if type(fn) is FunctionType and not cloudpickle.list_registry_pickle_by_value()
            else None
        )
        if fn_bytes is None:
            return cloudpickle.dumps((fn, args, kwargs), PROTOCOL)  # type: ignore[no-any-return]
        if all(type(a) in _PLAIN_TYPES for a in args) and all(
            type(v) in _PLAIN_TYPES for v in kwargs.values()
        ):
            rest = pickle.dumps((args, kwargs), PROTOCOL)
        else:
            rest = cloudpickle.dumps((args, kwargs), PROTOCOL)
        return b"".join((BY_REFERENCE, _FN_LENGTH.pack(len(fn_bytes)), fn_bytes, rest))
    except Exception as exc:
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        raise SerializationError(
            f"task {name!r} cannot be sent to a worker process: "
            f"{type(exc).__name__}: {exc}. Every argument must be picklable by cloudpickle "
            "(locks, open files, sockets and generators are not); pass paths or plain data, "
            "and open resources inside the task"
        ) from exc


def _reference_pickle(fn: FunctionType) -> bytes | None:
    """``fn``'s pickle if cloudpickle would pickle it by reference now (then it is the plain
    pickle of its module and name, the same bytes the C pickler makes), else None.

    As cloudpickle does on every call, it checks every time that ``fn`` is still what its
    module (still the one in sys.modules: not reloaded, not removed) holds under its name; a
    lambda, a closure or a __main__ function fails these checks before anything is pickled.
    The pickle itself is made once per function object and module."""
    module_name, qualname = fn.__module__, fn.__qualname__
    if module_name == "__main__" or "<locals>" in qualname:
        return None
    module = sys.modules.get(module_name) if module_name else None
    if module is None:
        return None
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is not fn:
        return None
    cached = _by_reference.get(fn)
    if cached is not None and cached[0] is module:
        return cached[1]
    reference = cloudpickle.dumps(fn, PROTOCOL)
    try:
        plain: bytes | None = pickle.dumps(fn, PROTOCOL)
    except Exception:  # noqa: BLE001 - then cloudpickle's decision stands
        plain = None
    result = reference if plain == reference and len(reference) <= _MAX_FN_LENGTH else None
    _by_reference[fn] = (module, result)
    return result


def decode_call(payload: bytes) -> tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]:
    """Unpickle a task in a worker; a failure is the task's SerializationError."""
    try:
        if payload[:1] == BY_REFERENCE:
            view = memoryview(payload)
            end = 1 + _FN_LENGTH.size + _FN_LENGTH.unpack_from(view, 1)[0]
            fn = pickle.loads(view[1 + _FN_LENGTH.size:end])
            args, kwargs = pickle.loads(view[end:])
        else:
            fn, args, kwargs = pickle.loads(payload)
    except Exception as exc:
        raise SerializationError(
            f"the task could not be unpickled in the worker: {type(exc).__name__}: {exc}. "
            "Its function and arguments must be importable there (a module on the worker's "
            "sys.path; on Dask, installed on every worker), or defined in __main__, a lambda or "
            "a closure (sent by value)"
        ) from exc
    return fn, args, kwargs


def encode_policy(policy: Policy) -> bytes:
    try:
        return cloudpickle.dumps(policy, PROTOCOL)  # type: ignore[no-any-return]
    except Exception as exc:
        raise SerializationError(f"policy {policy!r} cannot be pickled: {exc}") from exc


def decode_policy(data: bytes) -> Policy:
    """Unpickle a policy in a worker; a failure is the task's SerializationError."""
    try:
        policy = pickle.loads(data)
    except Exception as exc:
        raise SerializationError(
            f"the task's policy could not be unpickled in the worker: {type(exc).__name__}: "
            f"{exc}. The exception classes in its retry_on must be importable there"
        ) from exc
    if not isinstance(policy, Policy):
        raise SerializationError(f"expected a pickled taskorch.Policy, got {type(policy).__name__}")
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
