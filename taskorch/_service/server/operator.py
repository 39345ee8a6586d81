"""``taskorch serve``'s operator requests (issue 25): list, show, cancel, retry and purge tasks
by id (server process).

``Operator`` answers ``operations``' requests for a connection's reader (C_ADMIN) and for the
HTTP server's threads: synchronously, in the calling thread, which waits for the journal's
writer (``Journal.run``) and, for a cancel or a retry, for the commit that makes it durable.
Never call it from the journal's writer (it would wait for itself).

- A cancel goes through the registry to the task's future (``TaskFuture.cancel``: the backlog
  takes it out, or a worker that holds it unstarted hands it back): a task that started is not
  cancelled (False), so that a cancel racing the start ends in exactly one of "cancelled" or
  "ran". True is answered once the cancelled outcome is committed: a kill -9 after the answer
  finds the task cancelled at the next start.
- A retry submits the old record's call bytes (kept for a task that did not succeed) as a new
  task, under this server's operator token, and notes the old id in the new record. It keeps
  the task's policy, priority and key, not its times nor its dependencies: it runs now,
  without waiting for anything (a retried dependant too). With its key it follows the key's
  rule: if an unfinished task holds the key, the retry joins it (that task's id is the
  answer, and no record says it retries the old one).
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any

from taskorch._errors import JournalError, TaskNotFoundError, TaskorchError
from taskorch._service.operations import MAX_PAGE, AdminRequest
from taskorch._service.protocol import (
    O_CANCELLED,
    ServerFrame,
    rejected_frame,
    stats_reply_frame,
)
from taskorch._service.server.callbacks import OneByOne
from taskorch._service.server.records import (
    info_of,
    list_rows,
    queued_ids,
    read_row,
    row_state,
    statuses_for,
)
from taskorch._service.values import decode_builtins
from taskorch._stats import TASK_STATES, TaskInfo

if TYPE_CHECKING:
    from taskorch._parent.orchestrator import TaskOrchestrator
    from taskorch._service.server.outcomes import Outcome
    from taskorch._service.server.registry import TaskRegistry

#: How long a request waits for the journal (a commit in progress, the batches before it).
JOURNAL_WAIT = 30.0
#: The rows a filtered listing reads at a time when the filter may leave queued rows out (a
#: page of "waiting" tasks among thousands queued): more rows per journal round trip, at the
#: cost of reading past the page's end (a few hundred rows: well under a millisecond).
LIST_CHUNK = 500
#: The ended states a task may be retried from.
RETRYABLE = ("failed", "cancelled", "abandoned", "expired")


class Operator:
    def __init__(self, registry: TaskRegistry) -> None:
        self._registry = registry
        self._journal = registry.journal
        self._token = b"taskorch-operator-" + os.urandom(8)  # (client, sub) of retries
        self._next_sub = 0
        self._sub_lock = threading.Lock()

    def answer(self, frame: AdminRequest) -> ServerFrame:
        """A C_ADMIN request's answer (S_STATS, or S_REJECTED with the error)."""
        try:
            answer = self.handle(frame.op, frame.args)
        except (TaskorchError, ValueError, LookupError, TimeoutError) as exc:
            return rejected_frame(frame.req, exc)
        return stats_reply_frame(frame.req, {"answer": answer})

    def handle(self, op: str, args: dict[str, Any]) -> Any:
        """The answer to ``op`` (see ``operations``); raises TaskNotFoundError, ValueError
        (a bad argument, a task that cannot be retried), TimeoutError (the journal is stuck),
        or the backlog's errors (a retry: QueueFullError, closed)."""
        if op == "tasks":
            return [info.to_dict() for info in self.tasks(
                tuple(args.get("states") or ()), _str(args.get("name")),
                _int(args.get("limit", 100)), args.get("before_id"))]
        if op == "purge":
            return self.purge(_str(args.get("name")))
        task_id = _int(args.get("id"))
        if op == "task":
            return self.task(task_id).to_dict()
        if op == "cancel":
            return self.cancel(task_id, bool(args.get("terminate", False)))
        if op == "retry":
            return self.retry(task_id)
        raise ValueError(f"unknown operation {op!r}")

    def tasks(self, states: tuple[str, ...] = (), name: str | None = None, limit: int = 100,
              before_id: int | None = None) -> list[TaskInfo]:
        unknown = set(states) - set(TASK_STATES)
        if unknown:
            raise ValueError(f"unknown states {sorted(unknown)}; states are {TASK_STATES}")
        if not 0 < limit <= MAX_PAGE:
            raise ValueError(f"limit must be between 1 and {MAX_PAGE}, got {limit}")
        if before_id is not None and not isinstance(before_id, int):
            raise ValueError(f"before_id must be an integer, got {before_id!r}")
        # The journal's status narrows the rows (its index); each row's state, the one rule
        # (``records.state_of``), decides: a queued row may be "waiting" (held back for a
        # time, a dependency or a limit), so a page may take more than one read, each of
        # ``LIST_CHUNK`` rows at least, and a row left out costs no TaskInfo.
        wanted, statuses = set(states), statuses_for(states)
        chunk = max(limit, LIST_CHUNK) if wanted and "queued" in statuses else limit
        found: list[TaskInfo] = []
        below = before_id
        while True:
            rows = self._read(lambda db, below=below: list_rows(db, statuses, name, chunk, below))
            for row in rows:
                waiting = self._waiting(row)
                if wanted and row_state(row, waiting, time.time()) not in wanted:
                    continue
                info = info_of(row, self._registry.progress_of(row[0]), waiting)
                if not wanted or info.state in wanted:  # (the same rule, a moment later)
                    found.append(info)
                if len(found) == limit:
                    return found
            if len(rows) < chunk:
                return found
            below = rows[-1][0]

    def task(self, task_id: int) -> Any:
        row = self._read(lambda db: read_row(db, task_id))
        if row is None:
            raise _not_found(task_id)
        return self._info(row)

    def _info(self, row: Any) -> TaskInfo:
        return info_of(row, self._registry.progress_of(row[0]), self._waiting(row))

    def _waiting(self, row: Any) -> bool | None:
        """What the backlog says of a queued row's task (``records.state_of``)."""
        return self._registry.waiting(row[0]) if row[2] == "queued" else None

    def cancel(self, task_id: int, terminate: bool = False) -> bool:
        """True once a queued or waiting task is cancelled and that is committed; False if it
        had ended, or started and runs on. With ``terminate``, a running attempt is killed
        (its worker replaced) and True once the task's cancelled outcome is committed (False:
        it ended otherwise first, or it cannot be killed: on Dask, a worker without a nanny
        cannot be restarted, the task runs on, and the pool's refusal answers at once)."""
        cancelled = self._registry.cancel(task_id)
        if cancelled is None:  # not live: ended, or unknown
            if self._read(lambda db: read_row(db, task_id)) is None:
                raise _not_found(task_id)
            return False
        if not cancelled and not (terminate and self._registry.terminate(task_id)):
            return False
        waiter = _Waiter()
        self._registry.watch(task_id, waiter, 0, True)  # its outcome, once committed
        outcome = waiter.wait()
        return bool(outcome.outcome == O_CANCELLED)

    def retry(self, task_id: int) -> int:
        found = self._read(lambda db: db.execute(
            "SELECT status, payload, policy, priority, key FROM tasks WHERE id=?",
            (task_id,)).fetchone())
        if found is None:
            raise _not_found(task_id)
        status, payload, policy, priority, key = found
        if status not in RETRYABLE or payload is None:
            raise ValueError(f"task {task_id} is {status}: only a task that ended "
                             f"{', '.join(RETRYABLE)} can be retried")
        wire_policy = None if policy is None else decode_builtins(policy)
        if not self._registry.reserve_slot("for a retry"):
            raise ValueError("the backlog is full (--drop): the retry was dropped")
        with self._sub_lock:
            self._next_sub += 1
            sub = self._next_sub
        waiter = _Waiter()
        self._registry.submit_reserved(self._token, sub, payload, wire_policy, waiter, 0,
                                       (priority, None, None), key)
        new_id = waiter.wait()
        assert isinstance(new_id, int)
        if not waiter.joined:
            self._read(lambda db: db.execute("UPDATE tasks SET retry_of=? WHERE id=?",
                                             (task_id, new_id)).rowcount)
        return new_id

    def purge(self, name: str | None = None) -> int:
        """Cancel every queued or waiting task (of ``name``); how many were. Committed when
        this returns, except a task a worker handed back later than its cancel (logged as
        any outcome: it is cancelled all the same)."""
        ids = self._read(lambda db: queued_ids(db, name))
        count = sum(1 for task_id in ids if self._registry.cancel(task_id))
        self._read(lambda db: None)  # the cancelled outcomes queued before it are committed
        return count

    def _read(self, fn: Any) -> Any:
        """``fn(db)`` in the journal's writer, waited for."""
        done = threading.Event()
        box: list[Any] = []

        def then(result: Any) -> None:
            box.append(result)
            done.set()

        self._journal.run(fn, then)
        if not done.wait(JOURNAL_WAIT):
            raise TimeoutError(f"the journal did not answer within {JOURNAL_WAIT:g} s")
        if isinstance(box[0], JournalError):
            raise box[0]
        return box[0]


class _Waiter(OneByOne):
    """A ``registry.Sink`` that one thread waits on: the admission or the outcome."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._value: Any = None
        self.joined = False  # admitted as another submission's task (its key)

    def admitted(self, req: int, admission: int | BaseException, joined: bool = False) -> None:
        self._value = admission
        self.joined = joined
        self._event.set()

    def outcome(self, req: int, outcome: Outcome) -> None:
        self._value = outcome
        self._event.set()

    def rejected(self, req: int, error: BaseException) -> None:
        self._value = error
        self._event.set()

    def wait(self) -> Any:
        if not self._event.wait(JOURNAL_WAIT):
            raise TimeoutError(f"the journal did not commit within {JOURNAL_WAIT:g} s")
        if isinstance(self._value, BaseException):
            raise self._value
        return self._value


def trigger_answer(orchestrator: TaskOrchestrator, req: int, name: str) -> ServerFrame:
    """``taskorch trigger NAME`` (C_TRIGGER): the schedule runs now (the server's own task)."""
    try:
        future = orchestrator.trigger(name)
    except Exception as exc:  # no such schedule (KeyError), closed, broken
        return rejected_frame(req, ValueError(exc.args[0]) if isinstance(exc, KeyError) else exc)
    return stats_reply_frame(req, {"triggered": name, "submitted": future is not None})


def _not_found(task_id: int) -> TaskNotFoundError:
    return TaskNotFoundError(f"taskorch serve knows no task {task_id}: never accepted, or its "
                             "record was pruned (--result-ttl)")


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
