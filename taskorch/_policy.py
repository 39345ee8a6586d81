"""Configuration values: ``Policy`` (per task) and ``Features`` (per orchestrator).

Imported on both sides of the process boundary: the parent validates a policy and ships it to
the workers pickled; the worker builds its tenacity controller from it (``_worker.attempts``).

Which layer owns which limit:

- ``retries``, ``backoff_*``, ``jitter``, ``retry_on``, ``retry_unless``: one attempt budget
  per task. Exceptions
  are retried by tenacity inside the worker, without a round trip; a crash of the worker or a
  hard kill is retried by the parent, charged to the same budget.
- ``timeout``: per attempt (in a local worker the first one's clock includes unpickling the
  call and the last one's pickling the result). The worker interrupts a running attempt with a
  signal timer (``TaskTimeoutError``); tenacity itself never interrupts an attempt (its
  ``stop_after_delay`` is only checked between attempts, jd/tenacity#373).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import pickle
from typing import TYPE_CHECKING

from taskorch._errors import SerializationError

if TYPE_CHECKING:
    from tenacity.wait import wait_base

__all__ = ["BreakerMode", "CircuitBreaker", "Features", "Policy"]

#: What ``Policy.default()`` retries: errors that a later attempt may not meet. OS-level errors
#: (I/O, connections, ``TimeoutError``, so ``TaskTimeoutError`` too; worker crashes are retried
#: whatever the policy says, while the budget lasts).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError,)
#: What ``Policy.default()`` never retries, though ``TRANSIENT_ERRORS`` covers it: OS errors
#: that say the input or the set-up is wrong, which a retry meets again.
PERMANENT_OS_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError,
)


class Features(enum.Flag):
    """Behaviour switches of a ``TaskOrchestrator``."""

    NONE = 0
    #: run() drops a task that finds the backlog full (logged, counted in stats().dropped)
    #: instead of raising QueueFullError.
    ALLOW_SYNC_TASK_DROP = enum.auto()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Policy:
    """The resilience policy applied to each attempt of a task.

    ``retries`` are attempts after the first (``retries=2``: at most 3 attempts). Between
    attempts the worker waits ``backoff_initial * 2**(n-1)`` seconds, capped at
    ``backoff_max``, plus up to ``backoff_initial`` of random jitter when ``jitter`` is set
    (tenacity's ``wait_exponential() + wait_random()``). ``timeout`` limits each attempt, in
    seconds. An exception is retried when it is an instance of ``retry_on`` and of none of
    ``retry_unless`` (``retries_error``); ``TaskTimeoutError`` is a ``TimeoutError``, and worker
    crashes are always retried while the budget lasts.

    The constructor's defaults retry every ``Exception`` (``retries=0``: no retry at all);
    ``Policy.default()``, used when no policy is given, retries only what is likely transient.
    """

    retries: int = 0
    timeout: float | None = None
    backoff_initial: float = 0.1
    backoff_max: float = 10.0
    jitter: bool = True
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    retry_unless: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {self.retries!r}")
        if self.timeout is not None:
            _positive("timeout", self.timeout)
            if self.timeout > MAX_TIMEOUT:  # the worker's interval timer takes no more
                raise ValueError(
                    f"timeout must be at most {MAX_TIMEOUT:g} seconds, got {self.timeout!r}"
                )
        _non_negative("backoff_initial", self.backoff_initial)
        _non_negative("backoff_max", self.backoff_max)
        if self.backoff_max < self.backoff_initial:
            raise ValueError(
                f"backoff_max ({self.backoff_max}) must be >= backoff_initial "
                f"({self.backoff_initial})"
            )
        for name in ("retry_on", "retry_unless"):
            classes = getattr(self, name)
            if isinstance(classes, type):
                classes = (classes,)
                object.__setattr__(self, name, classes)
            if not isinstance(classes, tuple) or not all(
                isinstance(t, type) and issubclass(t, BaseException) for t in classes
            ):
                raise ValueError(f"{name} must be a tuple of exception classes, got {classes!r}")

    @classmethod
    def default(cls) -> Policy:
        """The recommended policy for background work, used when none is given (by
        ``TaskOrchestrator``, ``taskorch run`` and ``taskorch serve`` alike).

        Up to 3 retries with exponential backoff from 0.2 s to 30 s with jitter, and a 10 minute
        limit per attempt, so that a hung attempt cannot hold a worker forever. Retried: what is
        likely transient, i.e. timeouts, worker crashes, and OS-level errors (``OSError``:
        connections, I/O) other than those that say the input is wrong ("not found",
        "permission denied", ...: ``PERMANENT_OS_ERRORS``). Anything else (``ValueError``,
        ``TypeError``, ``KeyError``, a bug) fails at once: a retry would meet it again.
        ``dataclasses.replace(Policy.default(), retry_on=...)`` says otherwise.
        """
        return cls(retries=3, timeout=600.0, backoff_initial=0.2, backoff_max=30.0, jitter=True,
                   retry_on=TRANSIENT_ERRORS, retry_unless=PERMANENT_OS_ERRORS)

    def retries_error(self, error: BaseException) -> bool:
        """Whether ``error``, raised by an attempt, is retried (while attempts remain)."""
        return self.retries_type(type(error))

    def retries_type(self, error_type: type[BaseException]) -> bool:
        """Whether errors of class ``error_type`` are retried (while attempts remain)."""
        return issubclass(error_type, self.retry_on) and not issubclass(
            error_type, self.retry_unless
        )

    @property
    def max_attempts(self) -> int:
        return self.retries + 1

    def wait_strategy(self) -> wait_base:
        """The tenacity wait strategy between attempts (used by the worker and the parent)."""
        from tenacity import wait_exponential, wait_random

        exponential = wait_exponential(multiplier=self.backoff_initial, max=self.backoff_max)
        if self.jitter:
            return exponential + wait_random(0, self.backoff_initial)
        return exponential

    def backoff_before(self, attempt: int) -> float:
        """Seconds to wait before attempt number ``attempt`` (2 for the first retry)."""
        from tenacity import RetryCallState

        state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]  # waits read only attempt_number
        state.attempt_number = attempt - 1
        return float(self.wait_strategy()(state))


#: The longest per-attempt timeout (about 31 years): setitimer() refuses 1e10 s on Linux.
MAX_TIMEOUT = 1e9


def _positive(name: str, value: float) -> None:
    if (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
        or math.isinf(value)
    ):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    if (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0
        or math.isinf(value)
    ):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


class BreakerMode(enum.Enum):
    """What happens to a task that reaches dispatch while the circuit is open."""

    #: It fails at once with CircuitOpenError, without running.
    FAIL = "fail"
    #: It stays in the backlog, so the backlog fills and back-pressure reaches the producers
    #: (run() raises QueueFullError or drops, run_async() waits).
    HOLD = "hold"


@dataclasses.dataclass(frozen=True, kw_only=True)
class CircuitBreaker:
    """Circuit breaker settings, for ``TaskOrchestrator(circuit_breaker=...)``.

    One breaker in the parent, shared by all workers, counting finished tasks (after their
    retries): it opens after ``failure_threshold`` consecutive failed tasks, or, when
    ``failure_ratio`` is set, when at least ``minimum_throughput`` tasks finished in the last
    ``sampling_window`` seconds and that share of them failed (Polly's advanced breaker). It
    stays open for ``break_duration`` seconds, then half-open: up to ``half_open_probes``
    tasks are let through; a success closes it, a failure opens it again.
    """

    failure_threshold: int = 5
    break_duration: float = 30.0
    failure_ratio: float | None = None
    sampling_window: float = 60.0
    minimum_throughput: int = 10
    half_open_probes: int = 1
    mode: BreakerMode = BreakerMode.FAIL

    def __post_init__(self) -> None:
        for name in ("failure_threshold", "minimum_throughput", "half_open_probes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        _positive("break_duration", self.break_duration)
        _positive("sampling_window", self.sampling_window)
        ratio = self.failure_ratio
        if ratio is not None and (
            isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1
        ):
            raise ValueError(f"failure_ratio must be in (0, 1], got {ratio!r}")
        if not isinstance(self.mode, BreakerMode):
            raise ValueError(f"mode must be a taskorch.BreakerMode, got {self.mode!r}")


def check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_number(name: str, value: object, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value >= 0 if allow_zero else value > 0) and value != float("inf")
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def encode_policy(policy: Policy) -> bytes:
    """A policy's bytes for the workers (``_wire`` re-exports this and ``decode_policy``)."""
    import cloudpickle  # (here: ``import taskorch`` stays light)

    try:
        return cloudpickle.dumps(policy, pickle.HIGHEST_PROTOCOL)  # type: ignore[no-any-return]
    except Exception as exc:
        raise SerializationError(f"policy {policy!r} cannot be pickled: {exc}") from exc


def decode_policy(data: bytes) -> Policy:
    """Unpickle a policy in a worker; a failure is the task's SerializationError."""
    try:
        policy = pickle.loads(data)
    except Exception as exc:
        raise SerializationError(
            f"the task's policy could not be unpickled in the worker: {type(exc).__name__}: "
            f"{exc}. The exception classes in its retry_on must be importable there"
        ) from exc
    if not isinstance(policy, Policy):
        raise SerializationError(f"expected a pickled taskorch.Policy, got {type(policy).__name__}")
    return policy
