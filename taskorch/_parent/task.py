"""Parent process: one accepted task (``WorkItem``) and the Future handed to the caller.

Life of a task (each accepted task ends in exactly one terminal state, and its future is
resolved then):

    queued --start ack--> running --> succeeded | failed
      |                      |  \\
      |                      |   crash or hard timeout, budget left: re-dispatched, still running
      |                      +--> abandoned   (stop's timeout expired while it ran)
      +--> cancelled          (future.cancel() before hand-over, or stop's timeout expired)

"queued" covers both the parent's backlog and a worker's prefetch (handed over, no start ack
yet): a task handed to a worker that dies before starting it goes back to the front of the
backlog with no attempt charged.
"""

from __future__ import annotations

import enum
import logging
from concurrent.futures import Future, InvalidStateError
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from taskorch._errors import SerializationError
from taskorch._wire import decode_exception, decode_frame

if TYPE_CHECKING:
    from taskorch._parent.process import WorkerProcess
    from taskorch._policy import Policy


class TaskState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    ABANDONED = "abandoned"


class TaskFuture(Future[Any]):
    """The ``concurrent.futures.Future`` of one task, with what the worker reported.

    ``attempts`` (attempts started so far) and ``seconds`` (worker-side time of the last
    run, all its attempts included) are set before the future resolves. ``cancel()`` succeeds
    only while the task waits in the parent's backlog; once handed to a worker it returns
    False, as for ``concurrent.futures`` executors.
    """

    def __init__(self) -> None:
        super().__init__()
        self.task_id = 0
        self.attempts = 0
        self.seconds: float | None = None
        # Set by the orchestrator: removes the task from the backlog if it is still there.
        self._cancel_hook: Callable[[TaskFuture], bool] | None = None

    def cancel(self) -> bool:
        hook = self._cancel_hook
        if hook is None or self.done():
            return super().cancel()
        return hook(self)

    def _cancel_now(self) -> None:
        """Cancel for real (the orchestrator decided) and wake wait()/as_completed() callers."""
        Future.cancel(self)
        self.set_running_or_notify_cancel()


class RawOutcome(NamedTuple):
    """A raw task's result: the worker's outcome, still pickled, for a process that forwards
    it (``taskorch serve``) and must not unpickle user objects itself. ``ok``: ``data`` is the
    pickled return value; else ``data`` is ``_wire.encode_exception()``'s tuple."""

    ok: bool
    data: Any


class WorkItem:
    """The parent's record of an accepted task. Fields are guarded by the backlog's lock,
    except ``started_on``, ``attempts`` and ``attempt_started`` (dispatcher thread only)."""

    __slots__ = ("task_id", "future", "payload", "policy", "policy_bytes", "raw", "state",
                 "worker", "started_on", "attempts", "attempt_started")

    def __init__(
        self, task_id: int, future: TaskFuture, payload: bytes, policy: Policy,
        policy_bytes: bytes | None, raw: bool = False,
    ) -> None:
        self.task_id = task_id
        self.future = future
        self.payload = payload
        self.policy = policy
        self.policy_bytes = policy_bytes  # None: the workers' default policy
        # Raw: the future gets the worker's pickled outcome, undecoded (see RawOutcome).
        self.raw = raw
        self.state = TaskState.QUEUED
        self.worker: WorkerProcess | None = None  # set while handed over to a worker
        self.started_on: WorkerProcess | None = None  # the worker running its current attempt
        self.attempts = 0  # attempts started (and so charged) so far
        self.attempt_started = 0.0  # time.monotonic() of the current attempt's start ack

    def __repr__(self) -> str:
        return f"<WorkItem {self.task_id} {self.state.value} attempts={self.attempts}>"


#: What to do with an item's future: ("result", pickled value), ("error", encode_exception
#: tuple), ("exception", an exception object), or ("cancel", None).
Resolution = tuple[WorkItem, str, Any]

log = logging.getLogger("taskorch")


def resolve_all(resolutions: list[Resolution]) -> None:
    """Resolve futures (dispatcher threads), never under the backlog lock: done-callbacks are
    user code and run here, so a slow one delays every other task's dispatch."""
    for item, kind, value in resolutions:
        try:
            _resolve(item, kind, value)
        except InvalidStateError:  # the caller resolved the future itself
            log.warning("task %d: its future was already resolved by someone else", item.task_id)
        except BaseException:  # a done-callback that raised SystemExit, say: not our thread's end
            log.exception("task %d: resolving its future raised", item.task_id)


def _resolve(item: WorkItem, kind: str, value: Any) -> None:
    future = item.future
    if item.raw and kind in ("result", "error"):
        future.set_result(RawOutcome(kind == "result", value))
    elif kind == "result":
        try:
            result = decode_frame(value)
        except BaseException as exc:  # noqa: BLE001 - a __setstate__ may call sys.exit()
            err = SerializationError(
                f"the task's result could not be unpickled in the parent: "
                f"{type(exc).__name__}: {exc}"
            )
            err.__cause__ = exc
            future.set_exception(err)
        else:
            future.set_result(result)
    elif kind == "error":
        future.set_exception(decode_exception(*value))
    elif kind == "exception":
        future.set_exception(value)
    elif kind == "cancel":
        future._cancel_now()
    else:
        raise AssertionError(kind)
