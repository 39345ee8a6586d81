"""Worker process, main thread: runs one chunk of a ``map()``.

The chunk is one task under the policy; by default an item's exception fails the chunk (so
the policy retries the chunk), or, with ``return_exceptions``, it is returned in the item's
place, pickled alone so that one unpicklable exception cannot spoil its neighbours.
"""

from __future__ import annotations

from types import CoroutineType
from typing import Any, Callable

from taskorch._errors import TaskTimeoutError
from taskorch._wire import encode_exception


class ItemError:
    """An item's exception inside a ``return_exceptions`` chunk (decoded by the parent)."""

    __slots__ = ("described",)

    def __init__(self, described: tuple[bytes | None, str, str, str]) -> None:
        self.described = described

    def __reduce__(self) -> tuple[type[ItemError], tuple[tuple[bytes | None, str, str, str]]]:
        return (ItemError, (self.described,))


def run_chunk(
    fn: Callable[..., Any], chunk: list[Any], return_exceptions: bool, star: bool,
    kwargs: list[dict[str, Any]] | None = None,
) -> list[Any]:
    """For each item: ``fn(item)``, or with ``star`` ``fn(*item, **kwargs[i])`` (``kwargs``
    None: no keyword arguments). Plain items (one iterable) pickle far smaller than tuples."""
    results: list[Any] = []
    for i, item in enumerate(chunk):
        try:
            if not star:
                value = fn(item)
            elif kwargs is not None:
                value = fn(*item, **kwargs[i])
            else:
                value = fn(*item)
            if isinstance(value, CoroutineType):
                import asyncio

                value = asyncio.run(value)
        except Exception as exc:
            if not return_exceptions or isinstance(exc, TaskTimeoutError):
                raise  # a timeout ends the chunk's attempt, whichever item it hit
            value = ItemError(encode_exception(exc))
        results.append(value)
    return results
