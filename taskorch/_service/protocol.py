"""The service protocol: ``taskorch serve`` <-> ``taskorch.connect()``. Imported by both sides.

No thread of its own: its functions run in the server's connection threads and in the
client's callers and reader thread.

A second boundary, between processes that share nothing but a socket (a Unix socket, or TCP
on loopback unless the operator allowed remote clients). Server side: ``_service.server``
(per connection, a reader thread and a writer thread). Client side: ``_service.client`` (the
caller's threads send and wait for their answer; one reader thread receives).

Transport: ``multiprocessing.connection`` framing (a 4-byte big-endian signed length, or -1
and an 8-byte length, then the body). First, multiprocessing's HMAC challenge, both ways
(the server runs ``deliver_challenge`` then ``answer_challenge``, the client the reverse),
whose frames are read with a 256-byte limit: nothing an unauthenticated peer sends reaches
pickle. After that every frame is one pickled tuple whose first element is its tag. A frame
longer than SERVICE_MAX_FRAME is refused from its length alone (the body is never read) and
the connection closed; senders check first and turn an oversized frame into an error for
the one call concerned (``SerializationError``), nothing sent.

Client frames hold builtins only (tuple, bytes, str, int, float, bool, None): the server
decodes them with ``decode_client_frame``, an unpickler that refuses every global, so nothing
a client sends imports a module or runs code in the server. The call travels as
``encode_call()`` bytes that the server hands to a worker unopened; the per-task policy as
``encode_policy()`` bytes for the worker plus the plain fields the parent needs (WirePolicy).

server -> client, once, right after authentication:

    (S_HELLO, version, info)              ``version``: SERVICE_VERSION (the client refuses
                                          another); ``info``: a dict of plain data: pid,
                                          taskorch (version), python ("3.11"), workers,
                                          max_backlog, drop

client -> server (``req``: an int the client picks, unique among its requests for the life of
the client, across reconnections):

    (C_SUBMIT, req, payload, policy, wait, client, retry, credit)
                                          ``payload``: ``encode_call()`` bytes; ``policy``:
                                          None (the server's policy) or a WirePolicy;
                                          ``wait`` False: run() semantics, answered as soon as
                                          the task is journaled (ACCEPTED) or at once
                                          (DROPPED or REJECTED); True: run_async() semantics,
                                          answered when there is room and it is journaled.
                                          ``client``: the client's token (16 random bytes,
                                          the same over every connection of one Client);
                                          ``(client, req)`` names the submission: the server
                                          journals it once. ``retry`` True: this submission
                                          may have been sent on an earlier connection; if
                                          the journal has it, the answer is its ACCEPTED (and
                                          later DONE) again, nothing new is enqueued.
                                          ``credit`` True: run() spent one of its credits
                                          (below) and did not wait: the server journals the
                                          task in that slot (never QueueFullError); its
                                          answer still comes (ACCEPTED, or REJECTED with a
                                          JournalError or a closed error), the caller's
                                          future already returned
    (C_RETURN, n)                         the answer to S_RECALL: ``n`` credits not spent,
                                          given back (the client now holds none)
    (C_RESULT, req, task_id, wait)        wait for task ``task_id``'s outcome (any client's):
                                          answered by S_DONE when it ends (at once if it
                                          has), or S_REJECTED with TaskNotFoundError; with
                                          ``wait`` False, a task that has not ended is
                                          answered at once: S_REJECTED with TimeoutError
    (C_WITHDRAW, req)                     the client stopped waiting (run_async() cancelled):
                                          a request still waiting for room is dropped
                                          (nothing enqueued); one already accepted is
                                          cancelled if it has not left the backlog; a C_RESULT
                                          wait is dropped. No answer.
    (C_STATS, req)                        answered by S_STATS
    (C_TRIGGER, req, name)                run the schedule ``name`` now (``taskorch trigger``):
                                          answered by S_STATS with ``{"triggered": name,
                                          "submitted": bool}`` (False: the backlog was full),
                                          or S_REJECTED (no such schedule)

server -> client:

    (S_CREDIT, n)                         ``n`` more credits (after S_HELLO)
    (S_RECALL,)                           give back the credits not spent (C_RETURN)
    (S_ACCEPTED, req, task_id, grant)     committed to the journal and in the backlog as task
                                          ``task_id`` (the journal's id: stable across server
                                          restarts); its S_DONE always comes later on the same
                                          connection, unless the connection ends first.
                                          ``grant``: more credits (0 or more)
    (S_DROPPED, req)                      backlog full and the server runs with --drop:
                                          run() returns None
    (S_REJECTED, req, error)              ``error``: ``encode_service_error()`` bytes of the
                                          exception the caller raises (QueueFullError,
                                          OrchestratorClosedError, OrchestratorBrokenError,
                                          SerializationError, JournalError: the journal
                                          could not commit it, TaskNotFoundError)
    (S_DONE, req, outcome, attempts, seconds, data)
                                          the server's TaskFuture resolved; ``attempts`` and
                                          ``seconds`` as on it; by ``outcome``, ``data`` is:
                                            O_RESULT     the pickled return value
                                            O_RAISED     ``encode_exception()``'s tuple
                                            O_ERROR      ``encode_service_error()`` bytes of
                                                         a taskorch error (WorkerCrashedError,
                                                         TaskTimeoutError, TaskAbandonedError,
                                                         CircuitOpenError, ...)
                                            O_CANCELLED  None
    (S_STATS, req, fields)                ``encode_status()``: the Stats fields as a dict,
                                          plus worker_details, oldest_queued_seconds,
                                          schedules
    (S_BATCH, messages)                   a tuple of the frames above (never S_BATCH), in
                                          order: what the server's writer found queued, in
                                          one frame and one pickle (``frame_batch``); a batch
                                          over SERVICE_MAX_FRAME goes as separate frames

Credits (``_service.credits`` has the rules): a credit is a backlog slot the server holds for
one connection, so that run() needs no round trip and the bound stays exact across clients:
queued tasks plus every connection's credits never exceed ``max_backlog``. The server grants
a few on connecting and with each ACCEPTED, recalls them when a round-trip submission finds
the backlog full, and frees what a connection holds when it ends; the client spends one per
run() while it has any, else submits with a round trip (QueueFullError decided there). After
a reconnection the client holds none until granted; a credit submission sent on a link that
was lost is sent again with ``wait`` True (it must not be refused for room: run() returned).

Either side closes the connection to end it; there is no goodbye frame. The server ends a
connection (and logs why on the "taskorch" logger) on a failed challenge, a frame over the
limit, a frame that does not decode or has the wrong layout; tasks that connection submitted
run to the end all the same, and count in the stats.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any

from taskorch._errors import RemoteTaskError, SerializationError
from taskorch._policy import Policy
from taskorch._wire import PROTOCOL, encode_exception, encode_policy

if TYPE_CHECKING:
    from taskorch._parent.orchestrator import TaskOrchestrator
    from taskorch._stats import Stats

#: 2: calls may come in encode_call's by-reference form, which version 1 workers cannot read.
#: 3: the journal: client tokens and retried submissions in C_SUBMIT, C_RESULT; credits.
#: 4: S_BATCH.
SERVICE_VERSION = 4

#: Largest frame either side sends or accepts: 64 MiB. A call, its arguments or a result
#: beyond it fails alone with SerializationError; a peer that announces a longer frame is
#: disconnected before its body is read, so one connection can make the server allocate at
#: most this much. Large data belongs in files, passed by path.
SERVICE_MAX_FRAME = 64 * 1024 * 1024

# Client frame tags.
C_SUBMIT = 1
C_WITHDRAW = 2
C_STATS = 3
C_RESULT = 4
C_RETURN = 5
C_TRIGGER = 6
# Server frame tags.
S_HELLO = 11
S_ACCEPTED = 12
S_DROPPED = 13
S_REJECTED = 14
S_DONE = 15
S_STATS = 16
S_CREDIT = 17
S_RECALL = 18
S_BATCH = 19
# S_DONE outcomes.
O_RESULT = 1
O_RAISED = 2
O_ERROR = 3
O_CANCELLED = 4

#: A per-task policy on the service wire: ``(policy_bytes, retries, timeout, backoff_initial,
#: backoff_max, jitter, retry_timeouts)``. ``policy_bytes`` (``encode_policy()``) goes to the
#: worker unopened; the plain fields rebuild, in the server, the part of the Policy the parent
#: itself uses (the attempt budget, the backoff before retrying a crashed attempt, the hard
#: timeout, and whether a hard timeout is retried: ``retry_timeouts``). Should the parent ever
#: read another Policy field, it must be added here (and SERVICE_VERSION raised).
WirePolicy = tuple[bytes, int, "float | None", float, float, bool, bool]


class ServiceProtocolError(ValueError):
    """A peer sent a frame that is not part of the service protocol."""


class _BuiltinsOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"a client frame may not reference {module}.{name}")


def encode_service_frame(message: tuple[Any, ...]) -> bytes:
    return pickle.dumps(message, PROTOCOL)


def decode_client_frame(data: bytes) -> tuple[Any, ...]:
    """Decode and check one client frame in the server: builtins only, known layouts only."""
    import io

    try:
        message = _BuiltinsOnlyUnpickler(io.BytesIO(data)).load()
    except Exception as exc:
        raise ServiceProtocolError(f"undecodable frame: {type(exc).__name__}: {exc}") from exc
    if not isinstance(message, tuple) or not message:
        raise ServiceProtocolError(
            f"a frame must be a non-empty tuple, got {type(message).__name__}"
        )
    tag = message[0]
    if tag == C_SUBMIT and len(message) == 8:
        _, req, payload, policy, wait, client, retry, credit = message
        if (_is_req(req) and isinstance(payload, bytes) and isinstance(wait, bool)
                and (policy is None or _is_wire_policy(policy))
                and isinstance(client, bytes) and 0 < len(client) <= 64
                and isinstance(retry, bool) and isinstance(credit, bool)):
            return message
    elif (tag == C_RESULT and len(message) == 4 and _is_req(message[1]) and _is_req(message[2])
          and isinstance(message[3], bool)):
        return message
    elif tag in (C_WITHDRAW, C_STATS, C_RETURN) and len(message) == 2 and _is_req(message[1]):
        return message
    elif (tag == C_TRIGGER and len(message) == 3 and _is_req(message[1])
          and isinstance(message[2], str) and 0 < len(message[2]) <= 1000):
        return message
    raise ServiceProtocolError(f"unknown frame layout (tag {tag!r}, {len(message)} fields)")


class FrameReader:
    """Reads ``multiprocessing.connection`` frames from a blocking fd, many per ``read()``
    (the reader threads of both sides, after the handshake, which reads exactly its own
    frames). ``Connection.recv_bytes`` costs two reads per frame; a burst of small frames
    here costs one read for all of them. A length over ``maxlength`` raises
    ``OSError("bad message length")``, as ``recv_bytes`` does, before the body is read."""

    CHUNK = 256 * 1024

    def __init__(self, fd: int, maxlength: int = SERVICE_MAX_FRAME) -> None:
        self._fd = fd
        self._maxlength = maxlength
        self._buf = bytearray()
        self._pos = 0  # start of the first unread byte in _buf

    def read(self) -> bytes:
        import os
        import struct

        while True:
            buf, pos = self._buf, self._pos
            avail = len(buf) - pos
            need = 4
            if avail >= 4:
                (size,) = struct.unpack_from("!i", buf, pos)
                if size < 0 or size > self._maxlength:
                    raise OSError("bad message length")
                need = 4 + size
                if avail >= need:
                    self._pos = pos + need
                    return bytes(buf[pos + 4:pos + need])
            if pos:
                del buf[:pos]  # drop what was consumed before reading more
                self._pos = 0
            chunk = os.read(self._fd, max(self.CHUNK, need - avail))
            if not chunk:
                raise EOFError
            buf += chunk


def frame_bytes(message: tuple[Any, ...]) -> bytes:
    """``message`` encoded and framed as ``Connection.send_bytes`` would (frames < 2 GiB). An
    S_DONE over SERVICE_MAX_FRAME becomes an O_ERROR outcome (SerializationError) for its
    caller; any other frame over it raises SerializationError."""
    import struct

    body = encode_service_frame(message)
    if len(body) > SERVICE_MAX_FRAME:
        return _oversized(message, len(body))
    return struct.pack("!i", len(body)) + body


def _oversized(message: tuple[Any, ...], size: int) -> bytes:
    error = SerializationError(
        f"the task's outcome is {size / 2**20:.1f} MiB pickled, over taskorch serve's "
        f"{SERVICE_MAX_FRAME // 2**20} MiB frame limit; return large data in a file and pass "
        "its path")
    if message[0] != S_DONE:
        raise error
    tag, req, _, attempts, seconds, _ = message
    return frame_bytes((tag, req, O_ERROR, attempts, seconds, encode_service_error(error)))


def frame_batch(messages: list[tuple[Any, ...]]) -> bytes | None:
    """Several server messages as one framed S_BATCH (one pickle for all: a writer that finds
    hundreds of S_ACCEPTED and S_DONE queued spends one ``dumps`` and the client one
    ``loads``); None if the batch would exceed SERVICE_MAX_FRAME (send them one by one)."""
    import struct

    body = encode_service_frame((S_BATCH, tuple(messages)))
    if len(body) > SERVICE_MAX_FRAME:
        return None
    return struct.pack("!i", len(body)) + body


def decode_builtins(data: bytes) -> Any:
    """Unpickle data that may hold builtins only (the journal's policy and outcome columns)."""
    import io

    return _BuiltinsOnlyUnpickler(io.BytesIO(data)).load()


def decode_server_frame(data: bytes) -> tuple[Any, ...]:
    """Decode one server frame in the client (the client trusts the server it authenticated)."""
    message = pickle.loads(data)
    if not isinstance(message, tuple) or not message:
        raise ServiceProtocolError(
            f"a frame must be a non-empty tuple, got {type(message).__name__}"
        )
    return message


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


def encode_status(orchestrator: TaskOrchestrator) -> dict[str, Any]:
    """The S_STATS answer: ``encode_stats()``'s fields, plus ``worker_details`` and
    ``oldest_queued_seconds`` for ``taskorch status`` (extra keys, which ``decode_stats``
    and older clients ignore)."""
    import dataclasses

    details = orchestrator._status_details()
    return {**encode_stats(orchestrator.stats()), "worker_details": details["workers"],
            "oldest_queued_seconds": details["oldest_queued_seconds"],
            "schedules": [dataclasses.asdict(s) for s in orchestrator.schedules()]}


def decode_stats(fields: dict[str, Any]) -> Stats:
    """A ``taskorch.Stats`` from ``encode_stats()``'s dict (fields this version lacks ignored)."""
    import dataclasses

    from taskorch._stats import Stats

    known = {f.name for f in dataclasses.fields(Stats)}
    return Stats(**{k: v for k, v in fields.items() if k in known})


def _is_req(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_wire_policy(value: object) -> bool:
    if not isinstance(value, tuple) or len(value) != 7:
        return False
    policy_bytes, retries, timeout, backoff_initial, backoff_max, jitter, retry_timeouts = value
    return (
        isinstance(policy_bytes, bytes) and _is_req(retries)
        and (timeout is None or isinstance(timeout, (int, float)))
        and isinstance(backoff_initial, (int, float)) and isinstance(backoff_max, (int, float))
        and isinstance(jitter, bool) and isinstance(retry_timeouts, bool)
    )
