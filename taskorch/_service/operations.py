"""The operator's requests to ``taskorch serve`` (issue 25): one client frame, C_ADMIN,
imported by both sides (``codec`` decodes and checks it). No thread of its own.

    (C_ADMIN, req, op, args)              ``op``: one of OPS; ``args``: a dict of plain data
                                          (str keys; None, bool, int, float, str values, or a
                                          tuple of str). Answered by S_STATS whose fields
                                          hold the answer under "answer", or S_REJECTED
                                          (TaskNotFoundError, ValueError)

    op          args                                  answer
    "tasks"     states (tuple), name, limit,          a list of ``TaskInfo.to_dict()``,
                before_id                             newest first
    "task"      id                                    one ``TaskInfo.to_dict()``
    "cancel"    id, terminate                         True: cancelled (committed); False:
                                                      it had started, or ended
    "retry"     id                                    the new task's id
    "purge"     name                                  how many queued tasks were cancelled
"""

from __future__ import annotations

from typing import Any, NamedTuple

from taskorch._service.values import MAX_INT, is_count

C_ADMIN = 7
OPS = frozenset({"tasks", "task", "cancel", "retry", "purge"})
#: Most records one "tasks" request returns (a page); bounds the answer's frame.
MAX_PAGE = 1000

_PLAIN = (type(None), bool, int, float, str)


class AdminRequest(NamedTuple):
    """C_ADMIN: an operator's request (``admin_request_frame``)."""

    tag: int
    req: int
    op: str
    args: dict[str, Any]


def admin_request_frame(req: int, op: str, args: dict[str, Any]) -> AdminRequest:
    return tuple.__new__(AdminRequest, (C_ADMIN, req, op, args))


def is_valid_admin(frame: AdminRequest) -> bool:
    """Its layout and types, integers in SQLite's range as in every frame (``values.is_count``;
    the values' meaning is checked where they are used)."""
    return (is_count(frame.req)
            and frame.op in OPS and isinstance(frame.args, dict) and len(frame.args) <= 16
            and all(isinstance(k, str) and (_is_plain(v) or (
                isinstance(v, tuple) and len(v) <= 16 and all(isinstance(x, str) for x in v)))
                for k, v in frame.args.items()))


def _is_plain(value: object) -> bool:
    return isinstance(value, _PLAIN) and (not isinstance(value, int)
                                          or -MAX_INT <= value <= MAX_INT)
