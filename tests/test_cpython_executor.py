"""CPython 3.11's own ``test_concurrent_futures`` run against ``taskorch.Executor``.

Its tests run each executor through a mixin (``ThreadPoolMixin``, ``ProcessPoolForkMixin``...);
``TaskorchMixin`` below is one more, and the executor, map, wait, as_completed, shutdown and
deadlock test classes are built with it, as CPython's ``create_executor_tests`` does. The file
is the interpreter's own (``Lib/test``) or Debian's ``libpython3.11-testsuite``
(``/usr/lib/python3.11/test``); where neither exists, or on another Python, this module is
reported as skipped, with the reason. ``./scripts/test`` installs the Debian package in CI.

Every test runs, except those listed in ``NOT_APPLICABLE``, each with its reason: they read a
private attribute of ``ProcessPoolExecutor``, expect a ``BrokenProcessPool`` where taskorch
isolates the crash (the task fails with ``WorkerCrashedError`` or its own error, and the
pool goes on), or import the executor by name from ``concurrent.futures`` in a child
interpreter. ``tests/test_executor.py`` covers what they meant, the taskorch way.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from taskorch import Executor, Policy


def _find_suite() -> Path | None:
    if sys.version_info[:2] != (3, 11):
        return None  # 3.12 split it into a package, with other mixins and tests
    candidates = [Path("/usr/lib/python3.11/test/test_concurrent_futures.py")]
    spec = importlib.util.find_spec("test")
    if spec is not None and spec.submodule_search_locations:
        candidates[:0] = [Path(p) / "test_concurrent_futures.py"
                          for p in spec.submodule_search_locations]
    return next((path for path in candidates if path.is_file()), None)


SUITE = _find_suite()
if SUITE is None:
    pytest.skip(
        "CPython 3.11's test_concurrent_futures.py is not installed (Debian: apt-get install "
        "libpython3.11-testsuite; ./scripts/test does it in CI), or this is not Python 3.11",
        allow_module_level=True)
try:
    import test.support  # noqa: F401 - the suite's own helpers, from this interpreter
except ImportError:
    pytest.skip("this interpreter has no test.support package (CPython's test helpers)",
                allow_module_level=True)

import cloudpickle  # noqa: E402

_spec = importlib.util.spec_from_file_location("taskorch_cpython_test_concurrent_futures", SUITE)
assert _spec is not None and _spec.loader is not None
cf: Any = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = cf
_spec.loader.exec_module(cf)

BROKEN_POOL = ("expects BrokenProcessPool: the whole pool broken by one crash; taskorch "
               "isolates it (the task fails with WorkerCrashedError, the pool goes on)")
PRIVATE = "reads a private attribute of ProcessPoolExecutor (_processes, _call_queue, ...)"
BY_NAME = ("runs `from concurrent.futures import <executor>` in a child interpreter, which can "
           "only name the stdlib's executors")
PICKLE_IN_SUBMIT = ("expects submit() to return a future that fails with the PicklingError; "
                    "taskorch pickles in the caller, so submit() raises SerializationError (a "
                    "TypeError, the PicklingError as its __cause__) and enqueues nothing")
RAISES_SYSTEM_EXIT = ("expects the task's SystemExit raised again in the caller; taskorch "
                      "raises RemoteTaskError for a task's SystemExit or KeyboardInterrupt, so "
                      "that result() can never end the caller's thread")

NOT_APPLICABLE = {
    # ExecutorShutdownTest
    "test_cancel_futures": "asserts that at least one of 50 tasks submitted just before "
                           "shutdown(cancel_futures=True) ran: true of the stdlib pools, whose "
                           "workers keep the calls sent to them; taskorch recalls every call "
                           "not started, so all 50 may rightly be cancelled (see "
                           "test_executor.py for cancel_futures, ordered by handshakes)",
    "test_interpreter_shutdown": BY_NAME,
    "test_submit_after_interpreter_shutdown": BY_NAME,
    "test_hang_gh83386": BY_NAME,
    # ProcessPoolShutdownTest
    "test_processes_terminate": PRIVATE,
    "test_context_manager_shutdown": PRIVATE,
    "test_del_shutdown": PRIVATE,
    "test_shutdown_no_wait": PRIVATE,
    # ProcessPoolExecutorTest
    "test_killed_child": PRIVATE + "; and " + BROKEN_POOL,
    "test_ressources_gced_in_workers": "passes a multiprocessing.Event (a semaphore shared by "
                                       "inheritance) to a task; taskorch workers are started "
                                       "by fork+exec, so it cannot reach them",
    "test_saturation": PRIVATE,
    "test_idle_process_reuse_one": PRIVATE,
    "test_idle_process_reuse_multiple": PRIVATE,
    "test_max_tasks_per_child": PRIVATE + " (and takes max_tasks_per_child=; taskorch's is "
                                          "max_tasks_per_worker=)",
    "test_max_tasks_per_child_defaults_to_spawn_context": PRIVATE,
    "test_max_tasks_early_shutdown": "takes max_tasks_per_child= (taskorch's is "
                                     "max_tasks_per_worker=, tested in test_fault_tolerance)",
    "test_traceback": "asserts the cause's class is ProcessPoolExecutor's private "
                      "_RemoteTraceback; taskorch's is taskorch.RemoteTraceback (the same "
                      "remote traceback text, checked in test_core.py)",
    # ExecutorDeadlockTest
    "test_exit_during_func_exec_on_worker": RAISES_SYSTEM_EXIT,
    "test_exit_during_result_pickle_on_worker": RAISES_SYSTEM_EXIT,
    "test_error_during_result_pickle_on_worker": "expects the PicklingError itself; taskorch "
                                                 "raises SerializationError (a TypeError) that "
                                                 "names the result's type, the PicklingError "
                                                 "in its remote traceback",
    "test_error_at_task_pickle": PICKLE_IN_SUBMIT,
    "test_shutdown_deadlock_pickle": PICKLE_IN_SUBMIT,
    "test_exit_at_task_unpickle": BROKEN_POOL + " (here: RemoteTaskError for its SystemExit)",
    "test_error_at_task_unpickle": BROKEN_POOL + " (here: SerializationError, the "
                                                 "UnpicklingError as its cause)",
    "test_crash_at_task_unpickle": BROKEN_POOL,
    "test_crash_during_func_exec_on_worker": BROKEN_POOL,
    "test_crash_during_result_pickle_on_worker": BROKEN_POOL,
    "test_error_during_result_unpickle_in_result_handler": BROKEN_POOL + " (here result() "
                                                          "raises SerializationError)",
    "test_exit_during_result_unpickle_in_result_handler": BROKEN_POOL + " (here result() "
                                                         "raises SerializationError)",
    "test_shutdown_deadlock": BROKEN_POOL,
}


class _TestExecutor(Executor):
    """``taskorch.Executor`` as the suite makes its executors: ``mp_context=`` is accepted and
    ignored (taskorch chooses how its workers start)."""

    def __init__(self, max_workers: int | None = None, mp_context: Any = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("policy", Policy())  # one attempt, no timeout: a plain executor's
        super().__init__(max_workers, **kwargs)


class TaskorchMixin(cf.ExecutorMixin):  # type: ignore[misc]
    executor_type = _TestExecutor
    worker_count = 2  # the suite's 5 on a 2-core machine would only add processes

    def get_context(self) -> None:
        return None

    def setUp(self) -> None:
        # Workers cannot import that module by name: its functions and classes travel by
        # value, for the test's duration only (a registration changes how every call pickles).
        cloudpickle.register_pickle_by_value(cf)
        self.addCleanup(cloudpickle.unregister_pickle_by_value, cf)
        super().setUp()
        # Workers started, as a fork-based pool's are when it returns: a test that submits
        # and then cancels expects the first calls to have begun (test_cancel_futures).
        futures = [self.executor.submit(int, 0) for _ in range(self.worker_count)]
        for future in futures:
            future.result(cf.support.SHORT_TIMEOUT)


def _not_applicable(reason: str) -> Any:
    @pytest.mark.skip(reason=reason)
    def test(self: Any) -> None:
        pass

    return test


def _build(tests: type, name: str) -> type:
    skipped = {attr: _not_applicable(reason) for attr, reason in NOT_APPLICABLE.items()
               if hasattr(tests, attr)}
    return type(name, (tests, TaskorchMixin, cf.BaseTestCase), skipped)


TaskorchExecutorTest = _build(cf.ProcessPoolExecutorTest, "TaskorchExecutorTest")
TaskorchShutdownTest = _build(cf.ProcessPoolShutdownTest, "TaskorchShutdownTest")
TaskorchWaitTest = _build(cf.WaitTests, "TaskorchWaitTest")
TaskorchAsCompletedTest = _build(cf.AsCompletedTests, "TaskorchAsCompletedTest")
TaskorchDeadlockTest = _build(cf.ExecutorDeadlockTest, "TaskorchDeadlockTest")
