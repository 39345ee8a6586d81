"""What service frames carry besides the call: a per-task policy, errors, statistics, each
encoded for the wire and decoded on the other side. Imported by both sides (no thread of its
own; see ``protocol`` for the frames)."""

from __future__ import annotations

import io
import math
import pickle
import struct
from typing import TYPE_CHECKING, Any

from taskorch._errors import RemoteTaskError
from taskorch._policy import Policy
from taskorch._wire import PROTOCOL, encode_exception, encode_policy, function_reference

if TYPE_CHECKING:
    from taskorch._parent.orchestrator import TaskOrchestrator
    from taskorch._stats import Stats

#: A per-task policy on the service wire: ``(policy_bytes, retries, timeout, backoff_initial,
#: backoff_max, jitter, retry_timeouts)``. ``policy_bytes`` (``encode_policy()``) goes to the
#: worker unopened; the plain fields rebuild, in the server, the part of the Policy the parent
#: itself uses (the attempt budget, the backoff before retrying a crashed attempt, the hard
#: timeout, and whether a hard timeout is retried: ``retry_timeouts``). Should the parent ever
#: read another Policy field, it must be added here (and SERVICE_VERSION raised).
WirePolicy = tuple[bytes, int, "float | None", float, float, bool, bool]



def encode_service_policy(policy: Policy) -> WirePolicy:
    from taskorch._errors import TaskTimeoutError

    return (
        encode_policy(policy), policy.retries, policy.timeout, policy.backoff_initial,
        policy.backoff_max, policy.jitter, policy.retries_type(TaskTimeoutError),
    )


def decode_service_policy(wire: WirePolicy) -> tuple[Policy, bytes]:
    """The server's view of a client's policy, and the bytes to forward to the worker.

    The Policy object is rebuilt from plain fields: its ``retry_on`` is reduced to what the
    parent tests it against (a hard ``TaskTimeoutError``); the worker applies the client's own
    ``retry_on`` from ``policy_bytes``. ValueError: the fields are not a valid Policy.
    """
    from taskorch._errors import TaskTimeoutError

    policy_bytes, retries, timeout, backoff_initial, backoff_max, jitter, retry_timeouts = wire
    policy = Policy(
        retries=retries, timeout=timeout, backoff_initial=backoff_initial,
        backoff_max=backoff_max, jitter=jitter,
        retry_on=(TaskTimeoutError,) if retry_timeouts else (),
    )
    return policy, policy_bytes


def encode_service_error(exc: BaseException) -> bytes:
    """Pickle a taskorch error (they all define ``__reduce__``) for the client to raise."""
    try:
        return pickle.dumps(exc, PROTOCOL)
    except Exception:
        _, type_name, message, tb = encode_exception(exc)
        return pickle.dumps(RemoteTaskError(type_name, message, tb), PROTOCOL)


def decode_service_error(data: bytes) -> BaseException:
    try:
        exc = pickle.loads(data)
    except Exception as err:
        return RemoteTaskError(
            "taskorch.TaskorchError", f"an error from the server did not unpickle: {err}"
        )
    if not isinstance(exc, BaseException):
        return RemoteTaskError(
            "taskorch.TaskorchError", f"the server sent {type(exc).__name__} as an error"
        )
    return exc


def encode_stats(stats: Stats) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(stats)


def encode_status(orchestrator: TaskOrchestrator, journal: str | None = None) -> dict[str, Any]:
    """The S_STATS answer: ``encode_stats()``'s fields, plus ``worker_details``,
    ``oldest_queued_seconds`` and ``journal`` ("ok", or why it cannot commit: ``journal``
    given) for ``taskorch status`` (extra keys, which ``decode_stats`` and older clients
    ignore)."""
    import dataclasses

    details = orchestrator.status_details()
    return {**encode_stats(orchestrator.stats()), "worker_details": details["workers"],
            "oldest_queued_seconds": details["oldest_queued_seconds"],
            "next_delayed_at": details.get("next_delayed_at"),
            "schedules": [dataclasses.asdict(s) for s in orchestrator.schedules()],
            "journal": journal or "ok"}


def decode_stats(fields: dict[str, Any]) -> Stats:
    """A ``taskorch.Stats`` from ``encode_stats()``'s dict (fields this version lacks ignored)."""
    import dataclasses

    from taskorch._stats import Stats

    known = {f.name for f in dataclasses.fields(Stats)}
    return Stats(**{k: v for k, v in fields.items() if k in known})


def is_wire_policy(value: object) -> bool:
    if not isinstance(value, tuple) or len(value) != 7:
        return False
    policy_bytes, retries, timeout, backoff_initial, backoff_max, jitter, retry_timeouts = value
    return (
        isinstance(policy_bytes, bytes) and isinstance(retries, int)
        and not isinstance(retries, bool) and 0 <= retries < 2**31
        and (timeout is None or isinstance(timeout, (int, float)))
        and isinstance(backoff_initial, (int, float)) and isinstance(backoff_max, (int, float))
        and isinstance(jitter, bool) and isinstance(retry_timeouts, bool)
    )


#: Integers a client sends are request numbers, task ids and counts: each must fit a signed
#: 64-bit SQLite integer (the journal stores them), checked when a frame is decoded rather
#: than where SQLite would raise OverflowError.
MAX_INT = 2**63 - 1


def is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_INT


def is_whole_call(payload: bytes) -> bool:
    """Not cut short where the server reads it: the function reference the metrics name (a
    whole pickle ends with STOP, ".")."""
    try:
        reference = function_reference(payload)
    except struct.error:  # not even its length
        return False
    return reference is None or reference.endswith(b".")


def is_wire_timing(value: object) -> bool:
    """A submission's timing (priority, not_before, expires): a priority SQLite can store,
    finite epoch times or None."""
    return (isinstance(value, tuple) and len(value) == 3 and isinstance(value[0], int)
            and not isinstance(value[0], bool) and -2**63 <= value[0] < 2**63
            and all(t is None or (isinstance(t, float) and math.isfinite(t)) for t in value[1:]))


#: Most tasks one submission may run after (``options(after=)``): a fan-in of thousands of
#: shards fits; the journal reads them all at each submission and at a restart.
MAX_AFTER = 10_000


def is_wire_key(value: object) -> bool:
    """``options(key=)``: a non-empty str of at most 1024 characters (``_options.check_key``)."""
    return isinstance(value, str) and 0 < len(value) <= 1024


def is_wire_after(value: object) -> bool:
    """``options(after=)`` ids: a non-empty tuple of task ids (ints >= 1), at most MAX_AFTER."""
    return (isinstance(value, tuple) and 0 < len(value) <= MAX_AFTER
            and all(is_count(i) and i > 0 for i in value))


class _BuiltinsOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"a client frame may not reference {module}.{name}")


def decode_builtins(data: bytes) -> Any:
    """Unpickle data that may hold builtins only (a client's frames, and the journal's policy
    and outcome columns): the server never unpickles a user object."""
    return _BuiltinsOnlyUnpickler(io.BytesIO(data)).load()  # (each client frame: io imported once)
