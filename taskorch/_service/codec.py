"""The service frames as bytes: ``protocol``'s named frames pickled as plain tuples, and read
back. Imported by both sides; no thread of its own (the server's connection readers decode
client frames, the client's reader decodes server frames, any sender encodes).

A named frame pickles as its class: ``encode_service_frame`` sends the plain tuple of its
fields instead, since the server's unpickler accepts builtins only (``values.decode_builtins``).
``decode_client_frame`` checks a client frame's layout and every field's type and range (a
frame of a known layout with a valid request number and a bad field is a ``BadRequest``: that
request alone is refused); ``decode_server_frames`` trusts the server it authenticated but not
its layouts, and unpacks an S_BATCH.
"""

from __future__ import annotations

import pickle
from typing import Any

from taskorch._service.operations import C_ADMIN, AdminRequest, is_valid_admin
from taskorch._service.protocol import (
    C_RESULT,
    C_RETURN,
    C_STATS,
    C_SUBMIT,
    C_TRIGGER,
    C_WITHDRAW,
    S_ACCEPTED,
    S_BATCH,
    S_CREDIT,
    S_DONE,
    S_DROPPED,
    S_HELLO,
    S_RECALL,
    S_REJECTED,
    S_STATS,
    SERVICE_VERSION,
    Accepted,
    BadRequest,
    ClientFrame,
    CreditGrant,
    CreditRecall,
    CreditReturn,
    Done,
    Dropped,
    Hello,
    Rejected,
    ResultRequest,
    ServerFrame,
    ServiceProtocolError,
    StatsReply,
    StatsRequest,
    Submit,
    TriggerRequest,
    Withdraw,
)
from taskorch._service.values import (
    MAX_INT,
    decode_builtins,
    is_count,
    is_whole_call,
    is_wire_after,
    is_wire_key,
    is_wire_policy,
    is_wire_timing,
)
from taskorch._wire import PROTOCOL

#: A frame from its fields (see ``protocol``: ``tuple.__new__`` in C).
_new = tuple.__new__

_UNKNOWN: tuple[Any, int] = (None, -1)

#: Tag -> (its frame's type, its number of fields); the server's frames by tag.
_CLIENT_FRAMES: dict[int, tuple[Any, int]] = {
    tag: (kind, len(kind._fields)) for tag, kind in (
        (C_SUBMIT, Submit), (C_WITHDRAW, Withdraw), (C_STATS, StatsRequest),
        (C_RESULT, ResultRequest), (C_RETURN, CreditReturn), (C_TRIGGER, TriggerRequest),
        (C_ADMIN, AdminRequest))}
_SERVER_FRAMES: dict[int, Any] = {
    tag: kind for tag, kind in (
        (S_HELLO, Hello), (S_ACCEPTED, Accepted), (S_DROPPED, Dropped), (S_REJECTED, Rejected),
        (S_DONE, Done), (S_STATS, StatsReply), (S_CREDIT, CreditGrant), (S_RECALL, CreditRecall))}


def encode_service_frame(frame: tuple[Any, ...]) -> bytes:
    """A frame's bytes: its fields as a plain tuple (a named frame pickles as its class)."""
    return pickle.dumps(tuple(frame), PROTOCOL)


def decode_client_frame(data: bytes) -> ClientFrame:
    """Decode and check one client frame in the server: builtins only, known layouts only."""
    try:
        message = decode_builtins(data)
    except Exception as exc:
        raise ServiceProtocolError(f"undecodable frame: {type(exc).__name__}: {exc}") from exc
    if not isinstance(message, tuple) or not message:
        raise ServiceProtocolError(
            f"a frame must be a non-empty tuple, got {type(message).__name__}"
        )
    tag = message[0]
    kind, size = _CLIENT_FRAMES.get(tag, _UNKNOWN) if isinstance(tag, int) else _UNKNOWN
    if len(message) == size:
        frame: ClientFrame = _new(kind, message)
        if _is_valid(frame):
            return frame
        if kind is not CreditReturn and is_count(message[1]):
            raise BadRequest(message[1], f"invalid fields in a {kind.__name__} frame (a type, "
                             f"a range: integers 0 to 2**63-1, or a size)")
    raise ServiceProtocolError(f"unknown frame layout (tag {tag!r}, {len(message)} fields)")


def _is_valid(frame: ClientFrame) -> bool:
    if isinstance(frame, Submit):  # (one per task: ``is_count`` inline, exactly an int)
        req = frame.req
        return (type(req) is int and 0 <= req <= MAX_INT and isinstance(frame.payload, bytes)
                and is_whole_call(frame.payload) and isinstance(frame.wait, bool)
                and (frame.policy is None or is_wire_policy(frame.policy))
                and isinstance(frame.client, bytes) and 0 < len(frame.client) <= 64
                and isinstance(frame.retry, bool) and isinstance(frame.credit, bool)
                and (frame.timing is None or is_wire_timing(frame.timing))
                and (frame.key is None or is_wire_key(frame.key))
                and (frame.after is None or is_wire_after(frame.after)))
    if isinstance(frame, ResultRequest):
        return is_count(frame.req) and is_count(frame.task_id) and isinstance(frame.wait, bool)
    if isinstance(frame, TriggerRequest):
        return (is_count(frame.req) and isinstance(frame.name, str)
                and 0 < len(frame.name) <= 1000)
    if isinstance(frame, CreditReturn):
        return is_count(frame.n)
    if isinstance(frame, AdminRequest):
        return is_valid_admin(frame)
    return is_count(frame.req)  # Withdraw, StatsRequest


def decode_server_frames(data: bytes) -> tuple[ServerFrame, ...]:
    """Decode one server frame in the client: its messages (an S_BATCH holds several; the
    client trusts the server it authenticated, but not its layouts)."""
    message = pickle.loads(data)
    messages = (message[1] if isinstance(message, tuple) and len(message) == 2
                and message[0] == S_BATCH else (message,))
    known = _SERVER_FRAMES
    try:  # (a layout of the wrong length fails where a field is read: IndexError)
        return tuple([_new(known[m[0]], m) for m in messages])
    except (LookupError, TypeError) as exc:
        raise ServiceProtocolError(f"unexpected frame from the server ({exc!r})") from None


def decode_hello(data: bytes) -> Hello:
    """The server's first frame, in the client's handshake; ServiceProtocolError unless it
    is a hello of this SERVICE_VERSION."""
    try:
        frames = decode_server_frames(data)
    except ServiceProtocolError as exc:
        raise ServiceProtocolError(f"not a hello: {exc}") from exc
    hello = frames[0] if len(frames) == 1 else None
    if (not isinstance(hello, Hello) or len(hello) != len(Hello._fields)
            or hello.version != SERVICE_VERSION):
        got = (hello.tag, hello.version) if isinstance(hello, Hello) else "another frame"
        raise ServiceProtocolError(f"got {got!r}")
    return hello
