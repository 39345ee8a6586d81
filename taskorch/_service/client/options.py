"""``Client.options(...)`` and ``Client.with_policy(...)``: one task's options on a
``taskorch serve`` client (client side, the caller's threads or event loop).

The options are checked at the ``options()`` call (a ``ValueError`` naming the option, nothing
sent) and travel in the ``Submit`` frame (``protocol.SubmitOptions``), where the server's
journal keeps them:

- the timing is resolved at each ``run()`` (``_options.Timing``: a delay counts from then);
- ``key``: the server dedups by it across its clients and its restarts (journal, not client);
- ``after``: futures this client's ``run()`` returned, or task ids. A future's id is known once
  the server committed its task: ``run()`` waits for that (``Session.accepted``) if it spent a
  credit and the commit has not been answered yet. A submission with ``after`` takes a round
  trip (never a credit), so that the server's checks (an id it does not know, or not one of a
  task accepted before this one) raise ``ValueError`` in ``run()``, with nothing enqueued.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Callable

from taskorch._options import Timing, check_after, check_key
from taskorch._parent.task import TaskFuture
from taskorch._policy import Policy
from taskorch._service.protocol import SubmitOptions
from taskorch._service.values import MAX_AFTER, encode_service_policy

if TYPE_CHECKING:
    from taskorch._service.client.session import Session

#: A dependency as ``options(after=...)`` takes it on a client.
Dependency = TaskFuture | int


class RemotePolicyOverride:
    """``run``/``run_async`` of a ``Client`` with one task's options (``Client.options``,
    ``Client.with_policy``); ``here`` is the client's session in this process."""

    def __init__(self, here: Callable[[], Session], policy: Policy | None,
                 timing: Timing | None = None, key: object = None,
                 after: object = None) -> None:
        if policy is not None and not isinstance(policy, Policy):
            raise ValueError(f"policy must be a taskorch.Policy, got {policy!r}")
        self._here = here
        # SerializationError here:
        self._wire_policy = None if policy is None else encode_service_policy(policy)
        self._timing = None if timing is None or timing.plain else timing
        self._key = check_key(key)
        # (futures of this client's tasks, or ids: ``_options.check_after``'s rule)
        self._after: tuple[Dependency, ...] | None = None if after is None else check_after(
            after, here(), ids=True, most=MAX_AFTER) or None

    def _options(self, session: Session) -> SubmitOptions | None:
        """What the Submit frame carries; ``after``'s futures as ids (committed by now)."""
        if self._timing is None and self._key is None and self._after is None:
            return None
        timing = None
        if self._timing is not None:
            resolved = self._timing.resolve(time.time())  # (ValueError: nothing was sent)
            timing = (resolved.priority, resolved.not_before, resolved.expires)
        after = None if self._after is None else tuple(dict.fromkeys(
            d if isinstance(d, int) else _task_id(d, session) for d in self._after))
        return SubmitOptions(timing, self._key, after)

    def _uncommitted(self) -> bool:
        return any(isinstance(d, TaskFuture) and not d.task_id for d in self._after or ())

    def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture | None:
        session = self._here()
        return session.submit(self._wire_policy, fn, args, kwargs, self._options(session))

    async def run_async(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> TaskFuture:
        session = self._here()
        if self._uncommitted():  # (waits for the server's commits: off the loop)
            options = await asyncio.to_thread(self._options, session)
        else:
            options = self._options(session)
        return await session.submit_async(self._wire_policy, fn, args, kwargs, options)


def _task_id(future: TaskFuture, session: Session) -> int:
    """The id of a dependency's task, once the server has committed it."""
    if future.task_id:
        return future.task_id
    try:
        return session.accepted(future, session.request_timeout)
    except TimeoutError:
        raise
    except Exception as exc:  # its submission was refused: nothing to run after
        raise ValueError(f"after: the task of {future!r} was not accepted by the server "
                         f"({type(exc).__name__}: {exc}); nothing was sent") from exc
