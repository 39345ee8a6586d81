"""The exception tree. Imported by both sides of the process boundary; imports nothing of ours.

    TaskorchError                          every error taskorch raises itself
    ├── QueueFullError(queue.Full)         run(): max_backlog tasks are already queued
    ├── OrchestratorClosedError(RuntimeError)   run() after stop(): you closed it
    ├── OrchestratorBrokenError(RuntimeError)   no worker process can be started: it broke
    ├── SerializationError(TypeError)      a task, result or exception does not pickle
    ├── TaskTimeoutError(TimeoutError)     an attempt ran past Policy.timeout
    ├── TaskAbandonedError                 stop(timeout) expired while the task ran
    ├── TaskExpiredError                   the task was not started by its ``expires`` time:
    │                                      it never ran
    ├── DependencyFailedError              a task it was to run after (``options(after=)``)
    │                                      failed, was cancelled or expired: it never ran
    ├── WorkerCrashedError                 the worker process died while running the task
    ├── CircuitOpenError                   the circuit breaker rejected the task
    ├── RemoteTaskError                    the task raised something that cannot be rebuilt
    │                                      here (or a SystemExit/KeyboardInterrupt)
    ├── JournalError(OSError)              taskorch serve could not commit the task to its
    │                                      journal (a full disk): it was not accepted
    ├── TaskNotFoundError(LookupError)     Client.result(): no such task id (or pruned)
    ├── ServerUnavailableError(ConnectionError)   a Client is disconnected (reconnecting,
    │                                      or gave up): nothing was sent
    └── ServerTimeoutError(TimeoutError)   a Client call got no answer within its timeout

A task's own exception reaches its future as itself when it pickles, with the remote traceback
as ``__cause__`` (a ``RemoteTraceback``), as in ``concurrent.futures.process``. Subclassing the
built-in whose meaning matches keeps existing ``except TimeoutError:`` clauses working.
"""

from __future__ import annotations

import queue

__all__ = [
    "CircuitOpenError",
    "DependencyFailedError",
    "JournalError",
    "OrchestratorBrokenError",
    "OrchestratorClosedError",
    "QueueFullError",
    "RemoteTaskError",
    "RemoteTraceback",
    "SerializationError",
    "ServerTimeoutError",
    "ServerUnavailableError",
    "TaskAbandonedError",
    "TaskExpiredError",
    "TaskNotFoundError",
    "TaskTimeoutError",
    "TaskorchError",
    "WorkerCrashedError",
]


class TaskorchError(Exception):
    """Base class of every error raised by taskorch itself."""


class QueueFullError(TaskorchError, queue.Full):
    """run() found ``max_backlog`` tasks queued; nothing was enqueued.

    Back off and try again, use ``run_async()`` (which waits for room), raise ``max_backlog``,
    or set ``Features.ALLOW_SYNC_TASK_DROP`` to drop such tasks with a logged warning.
    """

    def __init__(self, max_backlog: int) -> None:
        super().__init__(
            f"the backlog is full ({max_backlog} tasks queued, not yet started); "
            "nothing was enqueued: retry later, await run_async(), or raise max_backlog"
        )
        self.max_backlog = max_backlog

    def __reduce__(self) -> tuple[type[QueueFullError], tuple[int]]:
        return (type(self), (self.max_backlog,))


class OrchestratorClosedError(TaskorchError, RuntimeError):
    """The orchestrator was stopped: it takes no new tasks."""


class OrchestratorBrokenError(TaskorchError, RuntimeError):
    """Worker processes cannot be started any more (e.g. the interpreter cannot be spawned)."""


class SerializationError(TaskorchError, TypeError):
    """A task, its arguments, its result or its exception could not be (un)pickled."""


class TaskTimeoutError(TaskorchError, TimeoutError):
    """An attempt ran longer than the policy's per-attempt timeout and was interrupted."""


class TaskAbandonedError(TaskorchError):
    """stop(timeout) expired while this task was running; its worker was terminated.

    The task may have had side effects before it was terminated.
    """


class TaskExpiredError(TaskorchError):
    """The task was not started by its ``expires`` time (``options(expires=...)``): it ended
    ``expired`` without running, never to run (not after a crash retry, nor after a restart
    of ``taskorch serve``). Raise the expiry, raise the priority, or add workers."""


class DependencyFailedError(TaskorchError):
    """A task listed in this one's ``options(after=[...])`` did not succeed (it failed, was
    cancelled or expired), so this one ended without running, and so do the tasks after it.
    ``dependency`` is that task's id; ``__cause__`` is its exception (a ``CancelledError`` for
    a cancelled one)."""

    def __init__(self, task_id: int, dependency: int, what: str = "failed") -> None:
        self.task_id = task_id
        self.dependency = dependency
        self.what = what
        super().__init__(
            f"task {task_id} did not run: task {dependency}, which it was to run after "
            f"(options(after=...)), {what}; see __cause__ for why")

    def __reduce__(self) -> tuple[type[DependencyFailedError], tuple[int, int, str]]:
        return (type(self), (self.task_id, self.dependency, self.what))


class WorkerCrashedError(TaskorchError):
    """The worker process running this task died (os._exit, a segfault, a kill from outside).

    ``pid``, ``exitcode`` and ``signal_name`` (``"SIGKILL"``, ``"SIGSEGV"``, or ``None`` for a
    plain exit) say how. The task's attempts were spent; other tasks were not affected.
    """

    def __init__(
        self, pid: int | None, exitcode: int | None, attempts: int = 1, reason: str = ""
    ) -> None:
        self.pid = pid
        self.exitcode = exitcode
        self.attempts = attempts
        self.reason = reason
        self.signal_name = signal_name(exitcode)
        how = (
            f"was killed by {self.signal_name}"
            if self.signal_name
            else f"exited with code {exitcode}"
        )
        text = f"the worker process (pid {pid}) {how} while running this task"
        if reason:
            text += f" ({reason})"
        text += (
            f"; {attempts} attempt(s) spent. A segfault or os._exit in the task, an out-of-memory"
            " kill, or a signal from outside are the usual causes; other tasks were not affected"
        )
        super().__init__(text)

    def __reduce__(
        self,
    ) -> tuple[type[WorkerCrashedError], tuple[int | None, int | None, int, str]]:
        return (type(self), (self.pid, self.exitcode, self.attempts, self.reason))


class CircuitOpenError(TaskorchError):
    """The circuit breaker is open after repeated failures: the task was not run."""


class RemoteTaskError(TaskorchError):
    """A task failed with an exception that cannot be rebuilt in this process.

    Raised for exceptions that do not pickle or unpickle, and for ``SystemExit`` and
    ``KeyboardInterrupt`` raised by a task (re-raising those here would end the caller).
    ``type_name``, ``message`` and ``traceback_text`` describe the original.
    """

    def __init__(self, type_name: str, message: str, traceback_text: str = "") -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text

    def __reduce__(self) -> tuple[type[RemoteTaskError], tuple[str, str, str]]:
        return (type(self), (self.type_name, self.message, self.traceback_text))


class JournalError(TaskorchError, OSError):
    """``taskorch serve`` could not commit a submission to its journal (a full disk, an I/O
    error): the task was not accepted and will never run. Free space on the server, then retry.
    Also raised by the server at start for a journal it cannot use (corrupt, locked by another
    server, unwritable); nothing in the file is changed then."""

    def __reduce__(self) -> tuple[type[JournalError], tuple[str]]:
        return (type(self), (str(self),))


class TaskNotFoundError(TaskorchError, LookupError):
    """``Client.result(task_id)``: the server knows no task by that id (never accepted, or its
    outcome was pruned after ``--result-ttl``)."""

    def __reduce__(self) -> tuple[type[TaskNotFoundError], tuple[str]]:
        return (type(self), (str(self),))


class ServerUnavailableError(TaskorchError, ConnectionError):
    """The ``taskorch.Client`` is not connected to its server now (it is reconnecting, or gave
    up): nothing was sent. ``run()`` raises it at once instead of waiting; retry later, or use
    ``run_async()``, which waits for the reconnection."""


class ServerTimeoutError(TaskorchError, TimeoutError):
    """The server did not answer within the client's timeout (stopped, overloaded, or a
    network that drops packets). A submission may or may not have been accepted."""


class RemoteTraceback(Exception):
    """Carries the worker-side traceback text; set as ``__cause__`` of a task's exception."""

    def __init__(self, tb: str) -> None:
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return f'\n"""\n{self.tb}"""'


#: Added to a task's PicklingError / AttributeError about ``__main__``: the usual cause is a
#: task that starts its own stdlib pool (spawn, forkserver) on functions of ``__main__``.
MAIN_HINT = (
    "hint: in a taskorch worker, __main__ is the worker, not your script: a task that starts "
    "its own multiprocessing pool (spawn, forkserver) cannot send it functions defined in "
    "__main__; define them in an importable module and import them from there"
)


def explain_main(exc: BaseException, message: str) -> str:
    """A task's PicklingError / AttributeError about ``__main__`` gets ``MAIN_HINT`` as a note
    (its traceback shows it) and in ``message`` (returned), for when it does not unpickle."""
    import pickle

    if isinstance(exc, (pickle.PicklingError, AttributeError)) and "__main__" in message:
        exc.add_note(MAIN_HINT)
        return f"{message} ({MAIN_HINT})"
    return message


def signal_name(exitcode: int | None) -> str | None:
    """The name of the signal that ended a process (``SIGKILL``), from its exit code; None
    when it exited on its own."""
    if exitcode is None or exitcode >= 0:
        return None
    import signal

    try:
        return signal.Signals(-exitcode).name
    except ValueError:
        return f"signal {-exitcode}"
