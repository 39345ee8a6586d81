"""Parent process, the caller's thread: ``TaskOrchestrator.map()``, the bulk API.

Items are grouped into chunks, each chunk one task (``_worker.map.run_chunk``), so a batch of
a million tiny items costs thousands of messages, not millions. The chunk size, unless given,
follows the measured worker time per item so that a chunk runs for about
``TARGET_CHUNK_SECONDS``: long enough to amortize a round trip, short enough that the last
chunks do not leave a worker idle for long. The input is consumed lazily; at most
``2 * worker_count`` chunks are in flight, so memory stays flat whatever the input's length.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol

from taskorch._errors import OrchestratorClosedError
from taskorch._policy import check_int
from taskorch._wire import decode_exception, encode_call
from taskorch._worker.map import ItemError, run_chunk

if TYPE_CHECKING:
    from taskorch._parent.task import TaskFuture, WorkItem
    from taskorch._policy import Policy


class Intake(Protocol):  # an orchestrator's ``intake.Intake``, as seen from here
    def prepare(self, payload: bytes, policy: Policy | None = None,
                policy_bytes: bytes | None = None) -> WorkItem: ...

    def offer_blocking(self, item: WorkItem) -> TaskFuture | None: ...

#: Aim for chunks that keep a worker busy this long (seconds of worker time).
TARGET_CHUNK_SECONDS = 0.02
#: Never more items than this in one chunk (bounds one message's size).
MAX_CHUNK_ITEMS = 10_000


def map_in_chunks(
    intake: Intake, worker_count: int, fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...], chunksize: int | None, return_exceptions: bool,
    policy: Policy | None = None, policy_bytes: bytes | None = None,
) -> Iterator[Any]:
    """``TaskOrchestrator.map()``: chunks submitted to ``intake``, waiting for room (with
    ``policy``: ``options(policy=...).map()``; its ``policy_bytes`` travel with each chunk)."""

    def submit(payload: bytes) -> TaskFuture:
        future = intake.offer_blocking(intake.prepare(payload, policy, policy_bytes))
        if future is None:  # cannot happen without a deadline
            raise OrchestratorClosedError("map(): the task was not accepted")
        return future

    return map_chunks(submit, worker_count, fn, iterables, chunksize, return_exceptions)


def map_chunks(
    submit: Callable[[bytes], TaskFuture], worker_count: int, fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...], chunksize: int | None, return_exceptions: bool,
) -> Iterator[Any]:
    """map() over any pool: ``submit`` takes a pickled chunk call and returns its future once
    accepted (waiting for room); ``worker_count`` sizes the chunks and the window. Its
    arguments are checked now, at the call (every map() of the project comes here); the
    chunks go when the iterator is read."""
    if chunksize is not None:
        check_int("chunksize", chunksize, minimum=1)
    if not iterables:
        raise TypeError("map() needs at least one iterable")
    return _chunks(submit, worker_count, fn, iterables, chunksize, return_exceptions)


def _chunks(
    submit: Callable[[bytes], TaskFuture], worker_count: int, fn: Callable[..., Any],
    iterables: tuple[Iterable[Any], ...], chunksize: int | None, return_exceptions: bool,
) -> Iterator[Any]:
    star = len(iterables) > 1
    items = iter(zip(*iterables) if star else iterables[0])
    known = _known_length(iterables)
    in_flight_limit = max(2, 2 * worker_count)
    cap = MAX_CHUNK_ITEMS
    if known is not None:  # leave every worker several chunks, as multiprocessing.Pool does
        cap = max(1, min(cap, math.ceil(known / (4 * worker_count))))
    if chunksize is not None:
        cap = chunksize
    # Without a measurement yet: multiprocessing.Pool.map's choice when the length is known
    # (a few chunks per worker), one item when it is not; then TARGET_CHUNK_SECONDS decides.
    size = chunksize or (cap if known is not None else 1)
    in_flight: deque[tuple[TaskFuture, int]] = deque()
    exhausted = False
    try:
        while True:
            while not exhausted and len(in_flight) < in_flight_limit:
                chunk = list(itertools.islice(items, size))
                if not chunk:
                    exhausted = True
                    break
                payload = encode_call(run_chunk, (fn, chunk, return_exceptions, star), {})
                in_flight.append((submit(payload), len(chunk)))
            if not in_flight:
                return
            future, count = in_flight.popleft()
            results = future.result()
            if chunksize is None and future.seconds:
                per_item = future.seconds / count
                size = max(1, min(cap, int(TARGET_CHUNK_SECONDS / max(per_item, 1e-7))))
            if not return_exceptions:
                yield from results
                continue
            for value in results:
                if isinstance(value, ItemError):
                    value = decode_exception(*value.described)
                yield value
    finally:
        for future, _ in in_flight:
            future.cancel()  # only those still in the backlog; the others finish unobserved


def _known_length(iterables: tuple[Iterable[Any], ...]) -> int | None:
    lengths = []
    for iterable in iterables:
        try:
            lengths.append(len(iterable))  # type: ignore[arg-type]
        except TypeError:
            return None
    return min(lengths)
