"""Parent process, dispatcher threads: how the futures of tasks are resolved (``resolve_all``),
never under the backlog lock and never running user code (see ``task``'s docstring: "Which
thread runs user code")."""

from __future__ import annotations

import logging
from concurrent.futures import InvalidStateError
from typing import Any

from taskorch._parent.task import RawOutcome, WorkItem

log = logging.getLogger("taskorch")

#: What to do with an item's future: ("result", pickled value), ("error", encode_exception
#: tuple), ("exception", an exception object), or ("cancel", None).
Resolution = tuple[WorkItem, str, Any]
_new = tuple.__new__  # (a NamedTuple without its Python-level __new__: once per served task)


def resolve_all(resolutions: list[Resolution]) -> None:
    """Resolve futures (dispatcher threads), never under the backlog lock. No user code runs
    here: results and exceptions stay pickled until a caller asks for them, done-callbacks
    are queued for the "taskorch-callbacks" thread. Each item is then released: the
    dispatcher calls this only for items it is done with."""
    for item, kind, value in resolutions:
        try:
            _resolve(item, kind, value)
        except InvalidStateError:  # the caller resolved the future itself
            log.warning("task %d: its future was already resolved by someone else", item.task_id)
        except BaseException:  # noqa: BLE001 - a bug here must not end the dispatcher
            log.exception("task %d: resolving its future raised", item.task_id)
        finally:
            item.release()


def _resolve(item: WorkItem, kind: str, value: Any) -> None:
    future = item.future
    if item.raw and kind in ("result", "error"):
        future.set_result(_new(RawOutcome, (kind == "result", value)))
    elif kind == "result" or kind == "error":
        future.set_undecoded(kind, value)
    elif kind == "exception":
        future.set_exception(value)
    elif kind == "cancel":
        future.cancel_now()
    else:
        raise AssertionError(kind)
