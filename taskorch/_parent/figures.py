"""Parent process: per-task figures for metrics and the dashboard, recorded by the dispatcher.

Two sides, one lock (the backlog's):

- the dispatcher thread records, with the backlog lock held, as a listener to the core's
  rules (``task.TaskListener``: started, finished, crashed): a few additions and a
  ``bisect`` per event, no allocation on the common path, no I/O, nothing that waits.
  ``Figures`` exists only once metrics were enabled (``enable``); until then the core pays an
  empty loop per event;
- a reader (a Prometheus scrape, the HTTP server's threads) copies everything under the same
  lock (``snapshot``, a few hundred integers) and does the rest (cumulative buckets, decoding
  failures, formatting) after releasing it.

Cardinality is bounded: tasks are labelled by their target's qualified name (``module.qualname``,
never the arguments), at most ``MAX_NAMES`` of them; later names are counted under ``OTHER``.
"""

from __future__ import annotations

import dataclasses
import pickletools
import time
from bisect import bisect_left
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

from taskorch._parent.task import TaskListener, TaskState
from taskorch._wire import function_reference

if TYPE_CHECKING:
    from taskorch._parent.backlog import Backlog
    from taskorch._parent.task import WorkItem

#: Distinct task names kept apart; the rest share ``OTHER``. Each name costs about 40 integers
#: per scrape and a few series in the exposition: a bound well above what a pool runs, and far
#: below what would hurt a Prometheus server if names came from data by mistake.
MAX_NAMES = 100
OTHER = "(other)"
#: The name of a task whose function travelled by value (a lambda, a closure, a ``__main__``
#: function sent by a client): the server cannot name it without unpickling it, which it never does.
BY_VALUE = "(by value)"
#: Failed tasks kept, with their tracebacks, for the dashboard and ``/api/failures``.
RECENT_FAILURES = 50
#: Histogram bucket bounds, seconds: from a no-op's fraction of a millisecond to minutes.
RUN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
               10.0, 30.0, 60.0, 300.0, 1800.0)
WAIT_BUCKETS = RUN_BUCKETS


class Histogram:
    """Counts per bucket (not cumulative: the reader sums them) and the sum of the values."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class TaskFigures:
    """One task name's figures."""

    __slots__ = ("run", "wait", "failed")

    def __init__(self) -> None:
        self.run = Histogram(RUN_BUCKETS)  # worker-side seconds of finished tasks (all attempts)
        self.wait = Histogram(WAIT_BUCKETS)  # acceptance to the first start ack
        self.failed = 0  # tasks of this name that ended failed (crashes included)


@dataclasses.dataclass(frozen=True)
class Failure:
    """A failed task, as the dashboard shows it."""

    at: float  # time.time() when the parent learnt of it
    task_id: int
    name: str
    attempts: int
    type: str
    message: str
    traceback: str


class Figures(TaskListener):
    """What the dispatcher records (a listener: backlog lock held) and readers copy (same
    lock)."""

    def __init__(self) -> None:
        self.by_name: dict[str, TaskFigures] = {}
        # Raw failures, newest last: (time, task_id, name, attempts, what), where ``what`` is
        # a Failed event's ``error`` (``encode_exception``'s) or an exception object (a crash).
        # Decoded by readers, never here.
        self.failures: deque[tuple[float, int, str, int, Any]] = deque(maxlen=RECENT_FAILURES)

    def _of(self, name: str) -> TaskFigures:
        figures = self.by_name.get(name)
        if figures is None:
            if len(self.by_name) >= MAX_NAMES:
                name = OTHER
                figures = self.by_name.get(name)
            if figures is None:
                figures = self.by_name[name] = TaskFigures()
        return figures

    # -- the dispatcher thread, backlog lock held ----------------------------------------------

    def started(self, item: WorkItem, now: float) -> None:
        """An attempt of ``item`` started: at its first (the state still QUEUED), its queue
        wait."""
        if item.accepted_at and item.state is TaskState.QUEUED:
            wait = (self.by_name.get(item.name) or self._of(item.name)).wait
            value = now - item.accepted_at
            wait.counts[bisect_left(wait.bounds, value)] += 1  # (Histogram.observe, inlined:
            wait.total += value  # this runs twice per task, on the dispatcher thread)

    def finished(self, item: WorkItem, seconds: float, error: Any) -> None:
        """An outcome event: ``error`` is the Failed event's ``error``, or None."""
        figures = self.by_name.get(item.name) or self._of(item.name)
        run = figures.run
        run.counts[bisect_left(run.bounds, seconds)] += 1
        run.total += seconds
        if error is not None:
            figures.failed += 1
            self.failures.append((time.time(), item.task_id, item.name, item.attempts, error))

    def crashed(self, item: WorkItem, error: BaseException, ended: bool) -> None:
        """A lost attempt; if it ``ended`` the task, a failure without an outcome event."""
        if not ended:
            return
        self._of(item.name).failed += 1
        self.failures.append((time.time(), item.task_id, item.name, item.attempts, error))

    # -- readers, backlog lock held -----------------------------------------------------------

    def copy_locked(self) -> tuple[dict[str, tuple[list[int], float, list[int], float, int]],
                                   list[tuple[float, int, str, int, Any]]]:
        """Everything, copied: {name: (run counts, run sum, wait counts, wait sum, failed)}."""
        tasks = {name: (list(f.run.counts), f.run.total, list(f.wait.counts), f.wait.total,
                        f.failed) for name, f in self.by_name.items()}
        return tasks, list(self.failures)


def enable(backlog: Backlog) -> Figures:
    """Start recording figures for the orchestrator of ``backlog`` (idempotent)."""
    with backlog.locked():
        for listener in backlog.listeners:
            if isinstance(listener, Figures):
                return listener
        figures = Figures()
        backlog.set_listeners_locked((*backlog.listeners, figures))
        return figures


def disable(backlog: Backlog) -> None:
    """Stop recording (the benchmark toggles metrics on one pool; tasks in flight across the
    switch are left out of the figures)."""
    with backlog.locked():
        backlog.set_listeners_locked(
            tuple(x for x in backlog.listeners if not isinstance(x, Figures)))


# -- naming tasks (the submitting thread) -------------------------------------------------------

def name_of(fn: Callable[..., Any]) -> str:
    """A task's label: its target's module and qualified name."""
    try:
        return _names_of_functions[fn]
    except (KeyError, TypeError):  # (TypeError: an unhashable callable)
        pass
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    module = getattr(fn, "__module__", None)
    name = f"{module}.{qualname}" if module else qualname
    try:
        if len(_names_of_functions) >= _NAME_CACHE:
            _names_of_functions.clear()  # lambdas made per call must not pile up
        _names_of_functions[fn] = name
    except TypeError:
        pass
    return name


#: Functions named lately (``name_of`` runs in the submitting threads: a dict's get and set
#: are atomic under the GIL). Holds the functions themselves, hence its small bound.
_NAME_CACHE = 256
_names_of_functions: dict[Any, str] = {}


_names_of_references: dict[bytes, str] = {}


def name_of_payload(payload: bytes) -> str:
    """A task's label from ``_wire.encode_call`` bytes, without unpickling anything: a function
    sent by reference is a plain pickle of its module and name, read here with ``pickletools``
    (which decodes opcodes and imports nothing). Functions sent by value are ``BY_VALUE``."""
    reference = function_reference(payload)
    return BY_VALUE if reference is None else name_of_reference(reference)


def name_of_reference(reference: bytes) -> str:
    """``name_of_payload`` for the function reference already read from a payload."""
    name = _names_of_references.get(reference)
    if name is None:
        name = _read_global(reference)
        if len(_names_of_references) < MAX_NAMES * 4:
            _names_of_references[reference] = name
    return name


def _read_global(reference: bytes) -> str:
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(reference):
            if isinstance(arg, str):
                strings.append(arg)
            if opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                return f"{strings[-2]}.{strings[-1]}"
            if opcode.name == "GLOBAL" and isinstance(arg, str):
                return arg.replace(" ", ".")
    except Exception:  # noqa: BLE001 - not a pickle we understand: no name, the task still runs
        pass
    return BY_VALUE


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorkerView:
    """One worker, as the dashboard shows it (``DispatcherCore.worker_views``)."""

    pid: int
    tasks_run: int | None = None  # outcomes it sent
    held: int | None = None  # calls handed to it and not finished (its running one included)
    task_id: int | None = None  # the task it runs now
    task_name: str | None = None  # its label (metrics on)
    running_for: float | None = None  # seconds since that attempt started
    retiring: bool = False
    attempt: int | None = None  # the attempt it runs now
    waiting_since: float | None = None  # acceptance of the first call it holds unstarted
