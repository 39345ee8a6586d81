"""The cost section's floor (``scripts/bench/floor.py``) is a working pool: each future gets its
own call's outcome, and a dead worker fails what is pending instead of hanging. The floor's
figure means nothing if it does less than it claims; this checks it does the work."""

from __future__ import annotations

import operator
import sys
import threading
import time
from pathlib import Path

import pytest
from _tasks import scaled

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))

from bench.floor import FloorPool  # noqa: E402 (after the path)


def test_each_future_gets_its_own_calls_result_from_two_producers() -> None:
    pool = FloorPool(2)
    try:
        got: dict[int, list[tuple[int, object]]] = {}

        def produce(base: int) -> None:
            got[base] = [(i, pool.submit(pow, base, i)) for i in range(2_000)]

        producers = [threading.Thread(target=produce, args=(base,)) for base in (3, 7)]
        for thread in producers:
            thread.start()
        for thread in producers:
            thread.join()
        for base, futures in got.items():
            assert [f.result(scaled(60)) for _, f in futures] == [base ** i for i, _ in futures]
        error = pool.submit(operator.truediv, 1, 0).exception(scaled(60))
        assert isinstance(error, ZeroDivisionError)
    finally:
        pool.stop(scaled(30))


def test_a_dead_worker_fails_what_is_pending_and_the_floor_refuses_more() -> None:
    pool = FloorPool(2)
    try:
        futures = [pool.submit(time.sleep, scaled(60)) for _ in range(4)]
        for proc in pool._procs:
            proc.kill()
        for future in futures:
            error = future.exception(scaled(30))
            assert isinstance(error, RuntimeError) and "worker died" in str(error)
        with pytest.raises(RuntimeError, match="stopped"):
            pool.submit(pow, 2, 2)
    finally:
        pool.stop(scaled(30))
