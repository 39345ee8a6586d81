"""The worker channel: everything that crosses between the parent and its workers. Imported by
both sides (the parent's dispatcher thread and callers; the worker's main thread). The service's
protocol (``taskorch serve`` <-> ``connect()``) is in ``taskorch._service.protocol``.

Each worker has a private duplex connection to the parent (a socketpair, no lock shared with
any other worker, so a worker killed mid-write can only corrupt its own channel). Frames are
``pickle`` bytes; the task itself travels inside as bytes already pickled in ``run()``
(``encode_call``: cloudpickle, or a cached reference to a module function and its arguments),
so the dispatcher never pickles user objects.

parent -> worker, one frame at a time:

    CALLS     a list of call items (``Call``), built by ``encode_calls`` from the parent's
              records and read by ``decode_calls`` in the worker.
    SHUTDOWN  an empty frame: finish what you hold, then exit.
    RECALL    the bytes ``RECALL``: hand back the calls you have not started (answered with
              ``Recalled``), so that an idle worker can take them.

worker -> parent, a frame is a list of events (several per frame when the worker is busy),
each built by the function named after it (``started()`` for ``Started``) and read by
``decode_events`` in the parent:

    Started(task_id, attempt, pid)               attempt ``attempt`` (1-based, over the whole
                                                 task) is about to run; for attempt 1 this is
                                                 the start ack that frees a backlog slot
                                                 (``pid``: a Dask worker's process, else None)
    Retrying(task_id, attempt, error, delay, timed_out)
                                                 attempt failed with ``error`` (a one-line
                                                 summary; ``timed_out``: it was a
                                                 TaskTimeoutError); the next starts in
                                                 ``delay`` s
    Succeeded(task_id, attempts, seconds, result)        ``result``: pickled return value
    Failed(task_id, attempts, seconds, exception, type_name, message, traceback)
                                                 ``exception``: pickled, or None when it does
                                                 not round-trip through pickle
                                                 (``encode_exception``; ``.error`` the four)
    Retiring(reason)                             the worker leaves after its current frame
                                                 (recycling); it takes no more calls
    Ready(pid)                                   sent once, when the worker has started: a
                                                 worker that dies before it failed to start
    Recalled(task_ids)                           the answer to RECALL: these calls were not
                                                 started and never will be here
    Reported(task_id, done, total, message, at)  ``taskorch.progress()`` in the running task
                                                 (rate-limited: ``_worker.progress``); sent at
                                                 once, from any thread of the task

On the wire a message is a plain tuple: a call item its fields, an event its tag then its
fields, in the order of its named type. Only this module builds or reads those tuples (see
"The messages" below for why they are not the named types themselves).

The Dask backend speaks the same events (``_worker.dask``), with its submission id in place
of the task id, carried by the scheduler instead of a socketpair (``decode_event``, one at a
time). Its call item is ``run_call``'s arguments.

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
from typing import Any, Callable, Iterable, NamedTuple, Protocol, Sequence, Union, cast

import cloudpickle

from taskorch._errors import RemoteTaskError, RemoteTraceback, SerializationError, explain_main
from taskorch._policy import decode_policy as decode_policy  # (the policy's bytes: see there)
from taskorch._policy import encode_policy as encode_policy

PROTOCOL = pickle.HIGHEST_PROTOCOL

SHUTDOWN = b""
RECALL = b"recall"  # never a pickle of a list


def encode_frame(obj: object) -> bytes:
    return pickle.dumps(obj, PROTOCOL)


decode_frame: Callable[[bytes], Any] = pickle.loads


# -- the messages ---------------------------------------------------------------------------
#
# Named types for reading, plain tuples on the wire. A NamedTuple instance pickles as a class
# reference plus its fields through two Python-level calls (``__getnewargs__`` out, the
# generated ``__new__`` in): measured on 3.11, a frame of events pickled ~1.5 us and unpickled
# ~0.4 us slower per event than plain tuples, and calls the same. A plain tuple pickles and
# unpickles in C; ``decode_*`` then make it the named type with ``tuple.__new__(type, fields)``
# (C as well, ~0.2 us an event: the parent's cost of the names). Worker side, the constructors
# below build the tuples; parent side, ``encode_calls`` builds the call items.

#: A task's exception as ``encode_exception`` describes it: (pickled exception or None, type
#: name, message, traceback text). Also what a raw task's future and ``taskorch serve`` carry.
DescribedException = tuple[Union[bytes, None], str, str, str]
#: A message as it travels (built only by this module's constructors).
WireMessage = tuple[Any, ...]

_new = tuple.__new__


class Call(NamedTuple):
    """A call item (parent -> worker): run ``payload`` (``encode_call`` bytes) under
    ``policy`` (``encode_policy`` bytes, None: the worker's default); ``attempts_done``
    attempts were charged already by earlier crashes (the budget left is ``max_attempts -
    attempts_done``)."""

    task_id: int
    payload: bytes
    policy: bytes | None
    attempts_done: int


class CallSource(Protocol):
    """What ``encode_calls`` reads of the parent's record of a task (``_parent.task.WorkItem``)."""

    @property
    def task_id(self) -> int: ...
    @property
    def payload(self) -> bytes: ...
    @property
    def policy_bytes(self) -> bytes | None: ...
    @property
    def attempts(self) -> int: ...


def encode_calls(items: Iterable[CallSource]) -> bytes:
    """A CALLS frame (parent, dispatcher thread): a call item per record, in order."""
    return encode_frame([(it.task_id, it.payload, it.policy_bytes, it.attempts) for it in items])


def decode_calls(frame: bytes) -> list[Call]:
    """The call items of a CALLS frame (worker, its call-reader thread)."""
    return [_new(Call, call) for call in decode_frame(frame)]


class Started(NamedTuple):
    """Attempt ``attempt`` (1-based, over the whole task) is about to run (see the module
    docstring); ``pid``: the Dask worker process that runs it, None from a local worker."""

    task_id: int
    attempt: int
    pid: int | None


class Retrying(NamedTuple):
    """Attempt ``attempt`` failed with ``error`` (``summarize``); the next starts in ``delay``
    seconds. ``timed_out``: the error was a TaskTimeoutError."""

    task_id: int
    attempt: int
    error: str
    delay: float
    timed_out: bool


class Succeeded(NamedTuple):
    """The task is over after ``attempts`` attempts and ``seconds`` of worker time (unpickling
    and pickling included); ``result``: its pickled return value (``encode_result``)."""

    task_id: int
    attempts: int
    seconds: float
    result: bytes


class Failed(NamedTuple):
    """The task is over and failed; its last error as ``encode_exception`` describes it."""

    task_id: int
    attempts: int
    seconds: float
    exception: bytes | None
    type_name: str
    message: str
    traceback: str

    @property
    def error(self) -> DescribedException:
        """The four fields of ``encode_exception``, as ``decode_exception`` takes them."""
        return (self.exception, self.type_name, self.message, self.traceback)


class Retiring(NamedTuple):
    """The worker leaves after its current frame (``reason``: why); it takes no more calls."""

    reason: str


class Ready(NamedTuple):
    """The worker (process ``pid``) has started; sent once, first."""

    pid: int


class Recalled(NamedTuple):
    """The answer to RECALL (or a Dask call taken back): these calls were not started and
    never will be there."""

    task_ids: list[int]


class Reported(NamedTuple):
    """``taskorch.progress()`` in task ``task_id`` (``at``: the worker's Unix time)."""

    task_id: int
    done: float
    total: float | None
    message: str | None
    at: float


Event = Union[Started, Retrying, Succeeded, Failed, Retiring, Ready, Recalled, Reported]
#: The events that end a task.
Outcome = Union[Succeeded, Failed]

# Each event's tag on the wire: its index here (no event has tag 0).
_EVENT_TYPES: tuple[Any, ...] = (
    None, Started, Retrying, Succeeded, Failed, Retiring, Ready, Recalled, Reported)
(_STARTED, _RETRYING, _SUCCEEDED, _FAILED, _RETIRING, _READY, _RECALLED, _REPORTED) = range(1, 9)

# The events' constructors, run by the workers (a local worker's main thread, and its reader
# thread for ``recalled``; a Dask worker's task threads).


def started(task_id: int, attempt: int, pid: int | None = None) -> WireMessage:
    return (_STARTED, task_id, attempt, pid)


def retrying(
    task_id: int, attempt: int, error: str, delay: float, timed_out: bool,
) -> WireMessage:
    return (_RETRYING, task_id, attempt, error, delay, timed_out)


def succeeded(task_id: int, attempts: int, seconds: float, result: bytes) -> WireMessage:
    return (_SUCCEEDED, task_id, attempts, seconds, result)


def failed(task_id: int, attempts: int, seconds: float, error: DescribedException) -> WireMessage:
    return (_FAILED, task_id, attempts, seconds, *error)


def retiring(reason: str) -> WireMessage:
    return (_RETIRING, reason)


def ready(pid: int) -> WireMessage:
    return (_READY, pid)


def recalled(task_ids: list[int]) -> WireMessage:
    return (_RECALLED, task_ids)


def reported(task_id: int, done: float, total: float | None, message: str | None,
             at: float) -> WireMessage:
    return (_REPORTED, task_id, done, total, message, at)


def decode_events(frames: list[bytes]) -> list[Event]:
    """The events of a worker's frames, in order (parent, dispatcher thread: every frame one
    read brought, in one call; no check beyond the one the tag lookup makes)."""
    events: list[Event] = []
    append = events.append
    types = _EVENT_TYPES
    for frame in frames:
        for event in decode_frame(frame):
            append(_new(types[event[0]], event[1:]))
    return events


def decode_event(raw: Sequence[Any]) -> Event:
    """One event as a Dask worker sent it: a list through the scheduler's event log, a tuple
    as a gathered return value. ValueError if it is none of ours (another taskorch version)."""
    try:
        kind = _EVENT_TYPES[raw[0]] if type(raw[0]) is int and raw[0] > 0 else None
        fields = tuple(raw[1:])
    except (TypeError, IndexError, KeyError):
        kind = None
    if kind is None or len(fields) != len(kind._fields):
        raise ValueError(f"not a taskorch worker event: {raw!r}")
    return cast(Event, _new(kind, fields))


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
# function -> (its module when decided, its payload's head or None: _reference_head)
_by_reference: weakref.WeakKeyDictionary[Callable[..., Any], tuple[ModuleType, bytes | None]] = (
    weakref.WeakKeyDictionary()
)


def function_reference(payload: bytes) -> bytes | None:
    """The plain pickle of the function (its module and name) inside ``encode_call`` bytes
    that carry it by reference, else None; nothing is unpickled (the metrics name tasks)."""
    if not payload.startswith(BY_REFERENCE):
        return None
    start = len(BY_REFERENCE) + _FN_LENGTH.size
    (length,) = _FN_LENGTH.unpack_from(payload, len(BY_REFERENCE))
    return payload[start:start + length]


def encode_call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes:
    """Pickle a task in the caller's thread, so that a bad task fails in run(), not later."""
    try:
        head = (
            _reference_head(fn)
            if type(fn) is FunctionType and not cloudpickle.list_registry_pickle_by_value()
            else None
        )
        if head is None:
            return cloudpickle.dumps((fn, args, kwargs), PROTOCOL)  # type: ignore[no-any-return]
        # (set.issuperset over map(type, ...): the check in C, no generator per call)
        if _PLAIN_TYPES.issuperset(map(type, args)) and (
                not kwargs or _PLAIN_TYPES.issuperset(map(type, kwargs.values()))):
            return head + pickle.dumps((args, kwargs), PROTOCOL)
        return head + cloudpickle.dumps((args, kwargs), PROTOCOL)  # type: ignore[no-any-return]
    except Exception as exc:
        name = getattr(fn, "__qualname__", None) or type(fn).__name__
        raise SerializationError(
            f"task {name!r} cannot be sent to a worker process: "
            f"{type(exc).__name__}: {exc}. Every argument must be picklable by cloudpickle "
            "(locks, open files, sockets and generators are not); pass paths or plain data, "
            "and open resources inside the task"
        ) from exc


def _reference_head(fn: FunctionType) -> bytes | None:
    """What a BY_REFERENCE payload of ``fn`` starts with (the marker, the length, ``fn``'s
    pickle) if cloudpickle would pickle it by reference now (then its pickle is the plain
    pickle of its module and name, the same bytes the C pickler makes), else None.

    As cloudpickle does on every call, it checks every time that ``fn`` is still what its
    module (still the one in sys.modules: not reloaded, not removed) holds under its name; a
    lambda, a closure or a __main__ function fails these checks before anything is pickled.
    The head itself is made once per function object and module."""
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
    result = (b"".join((BY_REFERENCE, _FN_LENGTH.pack(len(reference)), reference))
              if plain == reference and len(reference) <= _MAX_FN_LENGTH else None)
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


def encode_exception(exc: BaseException) -> DescribedException:
    """Describe a task's exception: pickled when it round-trips, always with name and text."""
    module = "" if type(exc).__module__ == "builtins" else f"{type(exc).__module__}."
    type_name = module + type(exc).__qualname__
    try:
        message = str(exc)
    except Exception:
        message = "<str() of the exception failed>"
    message = explain_main(exc, message)  # (a note in its traceback, and in the message)
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
