"""Worker process, main thread: runs one task's attempts under its policy.

tenacity drives the attempts (stop after the budget left, exponential backoff with jitter,
retry only what ``Policy.retries_error`` accepts), so an ordinary retry costs no round trip to
the parent; a first attempt that succeeds never goes through it (``AttemptRunner._attempts``
in a local worker, ``run_attempts`` in a Dask one). tenacity
never interrupts a running attempt, so the per-attempt timeout is ours: a one-shot
``ITIMER_REAL`` timer whose ``SIGALRM`` handler raises ``TaskTimeoutError`` in the main thread
(loky-spawned workers run tasks in their main thread, so Python signal handlers run there).

Hazards, accepted and written down:
- The interrupt lands between two bytecodes of the task, wherever it is (inside a ``finally``,
  between acquiring and releasing a lock): the attempt is over, its partial side effects stay.
- An attempt stuck in C code that never returns to the interpreter (or that blocks SIGALRM)
  is not interrupted here; the parent's hard timeout kills the worker after a grace period.
- A task that installs its own SIGALRM handler or itimer breaks the in-process interrupt;
  the parent's hard timeout still holds.
"""

from __future__ import annotations

import signal
import time
from types import CoroutineType
from typing import TYPE_CHECKING, Any, Callable

from taskorch._errors import TaskTimeoutError
from taskorch._policy import Policy
from taskorch._wire import WireMessage, decode_call, encode_result, retrying, started, summarize

if TYPE_CHECKING:  # tenacity is imported on first use: a worker whose tasks have no retries
    from tenacity import RetryCallState, Retrying  # never pays its import (~30 ms)

Emit = Callable[[WireMessage], None]


def call_to_completion(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """``fn(*args, **kwargs)``; a coroutine it returns is run to completion on a new loop."""
    result = fn(*args, **kwargs)
    if type(result) is CoroutineType:  # (``inspect.iscoroutine``, without a call per task)
        import asyncio  # only workers that run coroutines pay for the import

        result = asyncio.run(result)
    return result


def run_attempts(
    attempt: Callable[[], Any], policy: Policy, budget: int, retrying: Callable[[], Retrying],
) -> Any:
    """Run ``attempt`` up to ``budget`` times under ``policy``; return or raise the last.

    The first attempt runs directly: most succeed, and a pass through tenacity costs tens of
    microseconds (measured: 2 workers ran 33k no-op tasks/s without retries, 20-23k with
    retries on, all of the difference tenacity's). A retryable failure brings in tenacity
    (``retrying()``, built only then), which replays that failure as its own first attempt:
    its attempt count, backoff and callbacks are those of a run it drove from the start."""
    if budget <= 1:
        return attempt()  # one attempt: nothing for tenacity to decide
    try:
        return attempt()
    except BaseException as exc:  # noqa: BLE001 - tenacity's own check: retryable or re-raise
        if not policy.retries_error(exc):
            raise
        failure = exc
    return retry_after(failure, attempt, retrying)


def retry_after(failure: BaseException, attempt: Callable[[], Any],
                retrying: Callable[[], Retrying]) -> Any:
    """The attempts after a first one that failed with the retryable ``failure``: tenacity
    (``retrying()``) replays it as its own first attempt, then runs ``attempt`` until it
    returns or the budget is spent."""
    first_failure: BaseException | None = failure

    def replay_then_attempt() -> Any:
        nonlocal first_failure
        if first_failure is not None:
            failure, first_failure = first_failure, None  # its traceback dies with tenacity's use
            raise failure
        return attempt()

    return retrying()(replay_then_attempt)


def new_retrying(
    policy: Policy, budget: int, before: Callable[[RetryCallState], None],
    before_sleep: Callable[[RetryCallState], None], sleep: Callable[[float], None] = time.sleep,
) -> Retrying:
    """The tenacity controller for ``policy`` with ``budget`` attempts left: stop after them,
    back off by the policy's wait, retry only what ``policy.retries_error`` accepts, re-raise
    the last error.
    Shared by the local and the Dask worker; imports tenacity on first use."""
    from tenacity import Retrying, retry_if_exception, stop_after_attempt

    return Retrying(
        stop=stop_after_attempt(budget),
        wait=policy.wait_strategy(),
        retry=retry_if_exception(policy.retries_error),
        before=before,
        before_sleep=before_sleep,
        sleep=sleep,
        reraise=True,
    )


class AttemptTimer:
    """The in-process per-attempt deadline: SIGALRM raises TaskTimeoutError in the attempt.

    One clock per attempt: ``start`` arms a one-shot ``ITIMER_REAL``, ``stop`` disarms it. A
    task that succeeds at its first attempt costs two timer calls, its unpickling, its run and
    its result's pickling all on the one clock (as the parent's hard timeout counts them, from
    the start ack). ``_armed`` is cleared before the timer is, and the handler raises only
    while it is set, so an alarm that fires as the clock stops is ignored instead of escaping
    into the worker loop.
    """

    def __init__(self) -> None:
        self._armed = False
        self._timeout = 0.0
        signal.signal(signal.SIGALRM, self._on_alarm)

    def start(self, timeout: float | None) -> None:
        """Start the clock for ``timeout`` seconds, unless it is running (or no timeout)."""
        if timeout is None or self._armed:
            return
        self._timeout = timeout
        self._armed = True
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout)
        except BaseException:
            self._armed = False  # else the next task's start() would take the clock as running
            raise

    def stop(self) -> None:
        """Stop the clock, if it runs (after it fired, there is nothing to stop)."""
        if self._armed:
            self._armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _on_alarm(self, signum: int, frame: object) -> None:
        if self._armed:
            self._armed = False
            raise TaskTimeoutError(
                f"the attempt ran longer than its {self._timeout:g} s timeout and was interrupted"
            )


class AttemptRunner:
    """Runs tasks' attempts; reports each attempt start and retry through ``emit``.

    ``emit(event)`` queues an event for the parent; ``flush()`` sends what is queued. Every
    attempt start is flushed before the attempt runs, so the parent knows what is running even
    if the attempt then hangs or kills the process.
    """

    def __init__(
        self, emit: Emit, flush: Callable[[], None], sleep: Callable[[float], None] = time.sleep
    ) -> None:
        self._emit = emit
        self._flush = flush
        self._sleep = sleep
        self._timer = AttemptTimer()
        self._retrying: dict[tuple[Policy, int], Retrying] = {}
        # The task being run (main thread only): read by the tenacity callbacks.
        self._task_id = 0
        self._attempts_done = 0
        self.attempt = 0

    def announce_first_attempt(self, task_id: int, attempts_done: int) -> None:
        self._task_id = task_id
        self._attempts_done = attempts_done
        self.attempt = attempts_done + 1
        self._emit(started(task_id, self.attempt))
        self._flush()

    def run_call(self, payload: bytes, policy: Policy) -> bytes:
        """Unpickle the call announced by ``announce_first_attempt``, run its attempts, and
        return its pickled result (or raise the last error). The first attempt's clock starts
        before the unpickling; the last one's stops after the result is pickled."""
        self._timer.start(policy.timeout)
        try:
            fn, args, kwargs = decode_call(payload)
            return encode_result(self._attempts(fn, args, kwargs, policy))
        finally:
            self._timer.stop()

    def _attempts(
        self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], policy: Policy
    ) -> Any:
        # ``run_attempts``, inlined (no closure for a first attempt that succeeds), with the
        # timer's stop in the first attempt's failure: a fix to one belongs in both.
        timer, timeout = self._timer, policy.timeout
        try:  # the first attempt, here (its clock runs: ``run_call``): most tasks end with it
            try:
                return call_to_completion(fn, args, kwargs)
            except BaseException:
                timer.stop()  # (an alarm in this handler, before the stop, is the failure)
                raise
        except BaseException as exc:  # noqa: BLE001 - retried below if the policy says so
            budget = policy.max_attempts - self._attempts_done
            if budget <= 1 or not policy.retries_error(exc):
                raise
            failure = exc

        def attempt() -> Any:
            timer.start(timeout)
            try:
                return call_to_completion(fn, args, kwargs)
            except BaseException:
                timer.stop()  # before tenacity's bookkeeping and the backoff sleep
                raise

        return retry_after(failure, attempt, lambda: self._retrying_for(policy, budget))

    def _retrying_for(self, policy: Policy, budget: int) -> Retrying:
        key = (policy, budget)
        retrying = self._retrying.get(key)
        if retrying is None:
            retrying = new_retrying(policy, budget, self._before_attempt, self._before_sleep,
                                    self._sleep)
            if len(self._retrying) > 64:
                self._retrying.clear()
            self._retrying[key] = retrying
        return retrying

    def _before_attempt(self, state: RetryCallState) -> None:
        if state.attempt_number > 1:  # attempt 1 was announced before the call was unpickled
            self.attempt = self._attempts_done + state.attempt_number
            self._emit(started(self._task_id, self.attempt))
            self._flush()

    def _before_sleep(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        delay = state.next_action.sleep if state.next_action is not None else 0.0
        self._emit(retrying(
            self._task_id, self.attempt, summarize(error) if error else "?", delay,
            isinstance(error, TaskTimeoutError),
        ))
        self._flush()  # now, not after the sleep: the parent's hard timeout must pause
