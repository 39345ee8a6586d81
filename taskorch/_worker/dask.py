"""Dask worker process, a task thread of the Dask worker's executor: runs one taskorch call.

The parent's Dask dispatcher (``_parent.dask``) submits ``run_call`` as a Dask task, pinned
to one Dask worker, with the call as the bytes ``run()`` made (``_wire.encode_call``): they are
unpickled only here, and the outcome is pickled here, so that user objects are decoded only in
the parent. Everything else runs as in a local worker (``_worker.main``): tenacity drives the
attempts under the task's policy, so an ordinary retry costs no round trip.

What goes back: the events of ``_wire`` (the local workers' vocabulary, built by its
constructors), with the submission's ``sub_id`` where a local worker puts the task id, and how:

    events, each as ``{"ev": [the event's wire fields]}`` through ``Worker.log_event`` to the
    dispatcher's own topic (scheduler -> client):
        Started(sub_id, attempt, pid)            before every attempt; for attempt 1 this is
                                                 the start ack
        Retrying(sub_id, attempt, error, delay, timed_out)
        Succeeded | Failed                       a small outcome (INLINE_OUTCOME_BYTES), sent
                                                 before the task returns None
    the outcome, as the Dask task's return value otherwise (fetched by the parent with a gather):
        Succeeded(sub_id, attempts, seconds, result_bytes)
        Failed(sub_id, attempts, seconds, exc_bytes_or_None, type_name, message, traceback)
        Recalled([sub_id])    the parent took the call back before it started
                              (``recall_unstarted``); nothing ran

Events travel on the worker's batched stream, the one that later reports the task finished, so
the parent sees a task's events before its outcome, and an inline outcome before the scheduler
says the task finished: the parent then releases the task instead of gathering its None, which
saves a round trip through the scheduler to this worker per task. Larger outcomes are gathered:
the scheduler keeps each topic's last events (``distributed.admin.low-level-log-length``), and
is no place for bulk data.

The per-attempt timeout: Dask runs tasks in threads, where no signal handler runs, so the
SIGALRM timer of ``_worker.attempts`` cannot serve. ``ThreadTimer`` (one daemon thread per
worker process, "taskorch-attempt-timer", started on demand, gone when idle) raises
``TaskTimeoutError`` in the attempt's thread with ``PyThreadState_SetAsyncExc``. Hazards,
accepted and written down:

- The exception is delivered only when the thread runs Python bytecode: a call blocked in C
  (``time.sleep(60)``, a socket read, a C extension) is interrupted only when it returns to
  Python. Nothing can kill it: the thread belongs to Dask, and the process to the cluster.
- It lands between two bytecodes of the task, wherever it is (in a ``finally``, holding a
  lock): the attempt is over, its partial side effects stay (as with SIGALRM locally).
- A task that catches ``Exception`` and carries on swallows it, as it would swallow the local
  worker's ``TaskTimeoutError``.
- The timer and the attempt's end race: the timer fires only while the attempt is armed
  (under ``ThreadTimer._lock``), and an attempt that ends after the timer fired clears a
  still-pending exception (``PyThreadState_SetAsyncExc(tid, NULL)``), so it never escapes into
  Dask's own code in this thread. Delivered after the task returned, it turns that attempt
  into a timeout: it was still running at its deadline.
- The exception may land inside Python-level library code the attempt called, e.g. in
  ``threading.Condition.__enter__`` just after it acquired its lock, which then stays held.
  SIGALRM has the same hazard locally; taskorch's own arming and disarming use only C-level
  primitives (see ``ThreadTimer``), so they can neither deadlock nor be left half-done.

This module imports only the worker side (``_wire``, ``_errors``, ``_policy``) and starts no
thread at import; ``distributed`` is imported when a task runs (it is loaded already in a Dask
worker), tenacity when a task has attempts left to retry.
"""

from __future__ import annotations

import ctypes
import math
import os
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from taskorch._errors import TaskTimeoutError
from taskorch._policy import Policy
from taskorch._wire import (
    WireMessage,
    decode_call,
    decode_policy,
    encode_exception,
    encode_result,
    failed,
    recalled,
    retrying,
    started,
    succeeded,
    summarize,
)
from taskorch._worker.attempts import call_to_completion, new_retrying, run_attempts

if TYPE_CHECKING:  # tenacity is imported on a task's first retry
    from tenacity import RetryCallState

#: The timer thread exits after this long with no attempt armed; the next attempt with a
#: timeout starts it again. Longer keeps a thread that nothing needs; shorter restarts it
#: between the tasks of a slow stream.
TIMER_IDLE_EXIT = 2.0
#: Outcomes up to this size (pickled result or exception text, in bytes) go to the parent in an
#: event instead of through a gather. Larger saves more gathers (one scheduler round trip and
#: worker request each) but puts more bytes in the scheduler's event log, which keeps the last
#: 1000 events of each topic.
INLINE_OUTCOME_BYTES = 1024
#: Decoded policies kept per process, by their pickled bytes.
_POLICY_CACHE_SIZE = 64

Emit = Callable[[WireMessage], None]


def run_call(
    sub_id: int, payload: bytes, policy_bytes: bytes | None, attempts_done: int, *,
    topic: str, default_policy: bytes,
) -> WireMessage | None:
    """The Dask task: run one call's attempts (``attempts_done`` were charged already by
    crashes) and return its outcome. Never raises: everything after the start event fails only
    this task and is in the outcome (a policy or call that does not unpickle here, the task's
    exceptions, a result that does not pickle). Unpickling the call and pickling the result are
    timed too, each on a clock of its own (a local worker puts them on the first and the last
    attempt's clock; here the parent has no hard timeout that they must fit in)."""
    if _take_recall_mark(topic, sub_id):
        return recalled([sub_id])
    began = time.perf_counter()
    emit = _emitter(topic)
    runner = _Runner(sub_id, attempts_done, emit)
    runner.announce(attempts_done + 1)
    outcome: WireMessage
    try:
        policy = _policy(policy_bytes if policy_bytes is not None else default_policy)
        timeout = policy.timeout
        fn, args, kwargs = TIMER.call(lambda: decode_call(payload), timeout)
        value = runner.run(fn, args, kwargs, policy)
        result = TIMER.call(lambda: encode_result(value), timeout)
    except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt fail the task only
        error = encode_exception(exc)
        size = sum(len(part) for part in error if part is not None)
        outcome = failed(sub_id, runner.attempt, time.perf_counter() - began, error)
    else:
        size = len(result)
        outcome = succeeded(sub_id, runner.attempt, time.perf_counter() - began, result)
    if size <= INLINE_OUTCOME_BYTES:
        try:
            emit(outcome)
        except Exception:
            return outcome  # then it goes the long way
        return None
    return outcome


def _emitter(topic: str) -> Emit:
    from distributed import get_worker

    worker = get_worker()
    # thread-safe: hops to the worker's loop. (A dict: the scheduler adds the worker's address.)
    return lambda event: worker.log_event(topic, {"ev": list(event)})


_policies: dict[bytes, Policy] = {}


def _policy(data: bytes) -> Policy:
    policy = _policies.get(data)
    if policy is None:
        policy = decode_policy(data)  # SerializationError: this task fails
        if len(_policies) >= _POLICY_CACHE_SIZE:
            _policies.clear()
        _policies[data] = policy  # a race only decodes twice
    return policy


class _Runner:
    """One call's attempts under tenacity, in the calling thread (one per call: Dask runs
    several calls at once in one process)."""

    def __init__(self, sub_id: int, attempts_done: int, emit: Emit) -> None:
        self._sub_id = sub_id
        self._attempts_done = attempts_done
        self._emit = emit
        self.attempt = attempts_done + 1

    def announce(self, attempt: int) -> None:
        self.attempt = attempt
        self._emit(started(self._sub_id, attempt, os.getpid()))

    def run(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], policy: Policy,
    ) -> Any:
        timeout = policy.timeout

        def attempt() -> Any:  # a coroutine gets a fresh loop in this thread, not Dask's
            return TIMER.call(lambda: call_to_completion(fn, args, kwargs), timeout)

        budget = policy.max_attempts - self._attempts_done
        return run_attempts(attempt, policy, budget, lambda: new_retrying(
            policy, budget, self._before_attempt, self._before_sleep))

    def _before_attempt(self, state: RetryCallState) -> None:
        if state.attempt_number > 1:  # attempt 1 was announced before the call was unpickled
            self.announce(self._attempts_done + state.attempt_number)

    def _before_sleep(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        self._emit(retrying(self._sub_id, self.attempt, summarize(error) if error else "?",
                            float(delay), isinstance(error, TaskTimeoutError)))


# -- the per-attempt timeout in threads -----------------------------------------------------


class AttemptInterrupted(TaskTimeoutError):
    """Raised asynchronously in an attempt's thread at its deadline (no message: the C API
    instantiates it without arguments); ``ThreadTimer.call`` turns it into a TaskTimeoutError
    that says which timeout."""


# A private prototype: setting argtypes on ctypes.pythonapi's shared function would change it
# for every other user in the process.
_set_async_exc = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
)


def _raise_in_thread(thread_id: int, exc_type: type[BaseException] | None) -> None:
    """Schedule ``exc_type`` in thread ``thread_id`` (None: clear one still pending)."""
    arg = ctypes.py_object(exc_type) if exc_type is not None else ctypes.py_object()
    if _set_async_exc(thread_id, arg) > 1:  # cannot happen: thread ids are unique
        _set_async_exc(thread_id, ctypes.py_object())


class _Arming:
    __slots__ = ("thread_id", "deadline", "fired")

    def __init__(self, thread_id: int, deadline: float) -> None:
        self.thread_id = thread_id
        self.deadline = deadline
        self.fired = False


class ThreadTimer:
    """Per-attempt deadlines for any number of threads, enforced by one timer thread.

    The threads that run attempts may receive the exception at any bytecode, so on their side
    only C-level primitives are used while an attempt is armed or disarmed: ``_lock`` (a plain
    ``threading.Lock``, whose ``with`` acquires and releases in C, so an interrupt can never
    leave it held; a ``Condition`` acquires in Python code and could) and ``_wakeups`` (a
    ``queue.SimpleQueue``, written in C). The timer thread never receives the exception and
    waits on ``_wakeups`` with a timeout.

    ``_lock`` guards ``_armed`` (thread id -> the attempt it runs now; a thread runs one attempt
    at a time, so the timer scans one entry per busy thread), ``_thread`` and
    ``_waiting_until`` (the deadline the timer thread sleeps until: only an attempt that ends
    earlier wakes it). The timer schedules the exception while holding it, so an attempt that
    disarms afterwards knows (``fired``) and clears it if it is still pending. Nothing blocks
    under it.
    """

    def __init__(self, idle_exit: float = TIMER_IDLE_EXIT) -> None:
        self._lock = threading.Lock()
        self._wakeups: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._armed: dict[int, _Arming] = {}
        self._thread: threading.Thread | None = None
        self._waiting_until = math.inf
        self._idle_exit = idle_exit

    def call(self, fn: Callable[[], Any], timeout: float | None) -> Any:
        """``fn()`` in this thread; TaskTimeoutError if it runs past ``timeout`` seconds."""
        if timeout is None:
            return fn()
        arming = _Arming(threading.get_ident(), time.monotonic() + timeout)
        try:
            try:
                with self._lock:  # the timer cannot fire while we hold it: no interrupt here
                    self._armed[arming.thread_id] = arming
                    if self._thread is None:
                        self._thread = threading.Thread(
                            target=self._run, name="taskorch-attempt-timer", daemon=True)
                        self._thread.start()
                    elif arming.deadline < self._waiting_until:
                        self._wakeups.put(None)
                return fn()
            finally:
                self._disarm(arming)
        except AttemptInterrupted as exc:
            raise TaskTimeoutError(
                f"the attempt ran longer than its {timeout:g} s timeout and was interrupted"
            ) from exc

    def _disarm(self, arming: _Arming) -> None:
        with self._lock:
            fired = arming.fired
            if not fired:
                del self._armed[arming.thread_id]
        if fired:
            _raise_in_thread(arming.thread_id, None)  # delivered already, or cleared here

    def _run(self) -> None:
        """The timer thread (daemon: it must never keep a worker process alive). Wakes at the
        nearest deadline, or when an attempt with an earlier one is armed; exits after
        ``_idle_exit`` seconds with nothing armed."""
        while True:
            with self._lock:
                now = time.monotonic()
                nearest = math.inf
                for thread_id, arming in list(self._armed.items()):
                    if arming.deadline <= now:
                        del self._armed[thread_id]
                        arming.fired = True
                        _raise_in_thread(thread_id, AttemptInterrupted)
                    elif arming.deadline < nearest:
                        nearest = arming.deadline
                self._waiting_until = nearest
            idle = nearest == math.inf
            try:
                self._wakeups.get(timeout=self._idle_exit if idle else nearest - now)
            except queue.Empty:
                if idle:
                    with self._lock:
                        if not self._armed:
                            self._thread = None  # the next attempt starts a new one
                            return


TIMER = ThreadTimer()


# -- recall: the parent takes back calls a busy worker has not started ------------------------

# (topic, sub_id) -> Dask key, of calls recalled before they started: run_call returns
# Recalled for them. Written by recall_unstarted (the Dask worker's event loop thread), taken by
# run_call (task threads), under _recall_lock.
_recall_lock = threading.Lock()
_recall_marks: dict[tuple[str, int], str] = {}


def _take_recall_mark(topic: str, sub_id: int) -> bool:
    if not _recall_marks:  # the common case, without the lock
        return False
    with _recall_lock:
        return _recall_marks.pop((topic, sub_id), None) is not None


#: Dask worker task states in which a task has not begun to execute ("released" is not one:
#: a finished task passes through it too).
_NOT_STARTED = frozenset({"waiting", "ready", "constrained"})


def recall_unstarted(
    topic: str, calls: list[tuple[int, str]], dask_worker: Any = None,
) -> list[int]:
    """Run by ``Client.run`` on a Dask worker's event loop thread, the thread that moves tasks
    to "executing": mark the calls (sub_id, Dask key) that have not begun, so that they never
    run the user's call, and return their sub_ids. A call whose key the worker does not hold
    (not arrived yet, or finished) or that is executing is not taken back.

    Uses the worker's state machine (``Worker.state.tasks``, distributed >= 2022.8); with
    another layout it takes nothing back, which is always safe."""
    tasks = getattr(getattr(dask_worker, "state", None), "tasks", None)
    if not isinstance(tasks, dict):
        return []
    taken = []
    with _recall_lock:
        # Marks of calls the parent cancelled before they ran: the worker forgot their keys.
        for mark, key in list(_recall_marks.items()):
            if key not in tasks:
                del _recall_marks[mark]
        for sub_id, key in calls:
            ts = tasks.get(key)
            if ts is not None and getattr(ts, "state", None) in _NOT_STARTED:
                _recall_marks[(topic, sub_id)] = key
                taken.append(sub_id)
    return taken
