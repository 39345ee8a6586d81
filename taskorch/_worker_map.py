"""Worker process, main thread: runs one chunk of a ``map()``.

The chunk is one task under the policy; by default an item's exception fails the chunk (so
the policy retries the chunk), or, with ``return_exceptions``, it is returned in the item's
place, pickled alone so that one unpicklable exception cannot spoil its neighbours.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from taskorch._wire import encode_exception


class ItemError:
    """An item's exception inside a ``return_exceptions`` chunk (decoded by the parent)."""

    __slots__ = ("described",)

    def __init__(self, described: tuple[bytes | None, str, str, str]) -> None:
        self.described = described

    def __reduce__(self) -> tuple[type[ItemError], tuple[tuple[bytes | None, str, str, str]]]:
        return (ItemError, (self.described,))


def run_chunk(
    fn: Callable[..., Any], chunk: list[tuple[Any, ...]], return_exceptions: bool,
    kwargs: list[dict[str, Any]] | None = None,
) -> list[Any]:
    """``fn(*chunk[i], **kwargs[i])`` for each item (``kwargs`` None: no keyword arguments)."""
    results: list[Any] = []
    for i, args in enumerate(chunk):
        try:
            value = fn(*args, **kwargs[i]) if kwargs is not None else fn(*args)
            if inspect.iscoroutine(value):
                import asyncio

                value = asyncio.run(value)
        except Exception as exc:
            if not return_exceptions:
                raise
            value = ItemError(encode_exception(exc))
        results.append(value)
    return results
