"""Parent process, any thread: a worker's outcome while a future holds it still pickled
(``task.TaskFuture``: resolved with the bytes, unpickled by the first ``result()`` caller)."""

from __future__ import annotations

from typing import Any

from taskorch._errors import SerializationError
from taskorch._wire import decode_exception, decode_frame


class PickledError(Exception):
    """Stands in a future's ``_exception`` until the task's exception is unpickled, so that
    ``concurrent.futures.wait(return_when=FIRST_EXCEPTION)`` sees a failure at once. Never
    raised: ``result()`` and ``exception()`` replace it first."""


# A future resolved with a pickled result holds this as its `_result` until it is unpickled.
PICKLED_RESULT: Any = object()


def unpickled(kind: str, data: Any) -> tuple[Any, BaseException | None]:
    """A worker's outcome (``TaskFuture._undecoded``), unpickled (user code): (the result,
    None) or (None, the exception); a result that does not unpickle is a SerializationError."""
    if kind == "result":
        try:
            return decode_frame(data), None
        except KeyboardInterrupt:
            raise  # Ctrl-C in this thread, most likely: not the result's fault; retried next call
        except BaseException as exc:  # noqa: BLE001 - a __setstate__ may call sys.exit()
            error = SerializationError(
                f"the task's result could not be unpickled in the parent: "
                f"{type(exc).__name__}: {exc}")
            error.__cause__ = exc
            return None, error
    pickled, type_name, message, tb = data  # (a DescribedException)
    try:
        return None, decode_exception(pickled, type_name, message, tb)  # (or RemoteTaskError)
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001 - SystemExit from a __setstate__
        return None, decode_exception(None, type_name, message, tb)
