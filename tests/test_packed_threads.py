"""The packed engine's thread team: every task runs once, errors reach the caller, busy and idle teams still work."""
import os
import threading
import time

import numpy as np
import pytest
from numba import njit

from dorefanet.packed import threads


@njit(nogil=True)
def _busy_worker(counter, n_tasks, work, runs, joined):
    """Each task sums ``work`` terms (about a nanosecond each), then adds its index + 1 to runs[task];
    joined[0] counts the threads that took part."""
    threads.fetch_add(joined, 0, 1)
    while True:
        task = threads.next_task(counter)
        if task >= n_tasks:
            break
        s = 0.0
        for i in range(work):
            s += np.sqrt(i + task)
        runs[task] += task + 1 + (s < 0)


@njit(nogil=True)
def _failing_worker(counter, n_tasks, runs):
    while True:
        task = threads.next_task(counter)
        if task >= n_tasks:
            break
        if task == n_tasks - 1:
            raise ValueError("task failed")
        runs[task] += 1


def _split_kernel(r0, r1, out):
    out[r0:r1] += np.arange(r0, r1) + 1


def _two_thread_run(n_tasks=64, work=20000):
    runs = np.zeros(n_tasks, np.int64)
    joined = np.zeros(1, np.int64)
    threads.run_workers(_busy_worker, n_tasks, 2, work, runs, joined)
    return runs, int(joined[0])


def test_every_task_runs_once_and_the_helper_joins():
    expected = np.arange(64) + 1
    joined = []
    for _ in range(20):             # a busy machine can keep the helper out of one call, not out of all of them
        runs, count = _two_thread_run()
        np.testing.assert_array_equal(runs, expected)
        joined.append(count)
        if count == 2:
            break
    assert 2 in joined, "the helper thread never took part: %s" % joined


def test_one_thread_and_fewer_tasks_than_threads():
    for n_tasks, want in ((5, 1), (1, 2), (0, 2)):
        runs = np.zeros(max(n_tasks, 1), np.int64)
        joined = np.zeros(1, np.int64)
        threads.run_workers(_busy_worker, n_tasks, want, 10, runs, joined)
        np.testing.assert_array_equal(runs[:n_tasks], np.arange(n_tasks) + 1)
        assert joined[0] == 1       # one thread at most, so no helper


def _until_asleep(helpers, timeout=10.0):
    """Wait (with a deadline) until every helper has stopped spinning and sleeps."""
    deadline = time.monotonic() + timeout
    while not all(h.sleeping for h in helpers):
        assert time.monotonic() < deadline, "a helper still spins after {} s".format(timeout)
        time.sleep(threads.SPIN_SECONDS)


def test_a_sleeping_helper_is_woken():
    _two_thread_run()
    helpers = threads._the_team().helpers
    assert helpers
    _until_asleep(helpers)
    joined = []
    for _ in range(20):
        runs, count = _two_thread_run()
        np.testing.assert_array_equal(runs, np.arange(64) + 1)
        joined.append(count)
        if count == 2:
            break
        _until_asleep(helpers)
    assert 2 in joined, joined


def test_an_error_in_a_worker_reaches_the_caller_and_the_team_goes_on():
    for _ in range(5):              # whichever thread takes the failing task
        with pytest.raises(ValueError, match="task failed"):
            threads.run_workers(_failing_worker, 400, 2, np.zeros(400, np.int64))
    runs, _ = _two_thread_run()
    np.testing.assert_array_equal(runs, np.arange(64) + 1)


def test_calls_from_two_python_threads_at_once():
    results, errors = [], []

    def caller():
        try:
            for _ in range(10):
                results.append(_two_thread_run(32, 5000)[0])
                out = np.zeros(1000, np.int64)
                threads.run_split(_split_kernel, 1000, 2, out)
                results.append(out - np.arange(1000))
        except BaseException as error:       # pragma: no cover - reported below
            errors.append(error)

    callers = [threading.Thread(target=caller) for _ in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert not errors
    assert len(results) == 40
    for r in results:
        np.testing.assert_array_equal(r, np.arange(1, r.size + 1) if r.size == 32 else np.ones(1000))


@pytest.mark.parametrize("rows, parts", [(1000, 2), (3, 2), (1, 2), (7, 1)])
def test_split_covers_every_row_once(rows, parts):
    out = np.zeros(rows, np.int64)
    threads.run_split(_split_kernel, rows, parts, out)
    np.testing.assert_array_equal(out, np.arange(rows) + 1)


def test_a_busy_team_runs_the_call_on_the_calling_thread():
    team = threads._the_team()
    assert team.lock.acquire(blocking=False)
    try:
        runs, count = _two_thread_run(16, 100)
        out = np.zeros(100, np.int64)
        threads.run_split(_split_kernel, 100, 2, out)
    finally:
        team.lock.release()
    np.testing.assert_array_equal(runs, np.arange(16) + 1)
    np.testing.assert_array_equal(out, np.arange(100) + 1)
    assert count == 1


def test_helpers_end_at_exit(tmp_path):
    """A process that used the team exits cleanly, its helper threads ended before the interpreter finalizes."""
    import subprocess
    import sys

    script = tmp_path / "use_team.py"
    script.write_text(
        "import sys, threading\n"
        "sys.path.insert(0, %r)\n"
        "from test_packed_threads import _two_thread_run\n"
        "from dorefanet.packed import threads\n"
        "_two_thread_run()\n"
        "threads._stop_team()\n"
        "alive = [t.name for t in threading.enumerate() if t.name.startswith('packed-kernels')]\n"
        "print('alive', alive)\n"
        "_two_thread_run()\n" % os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "alive []" in done.stdout


def test_num_threads_follows_numba_per_python_thread():
    """num_threads gives what numba.get_num_threads gives, after set_num_threads, in this and another
    Python thread (numba's count is per thread)."""
    import numba

    before = numba.get_num_threads()
    seen = {}

    def other():
        numba.set_num_threads(1)
        seen["other"] = (threads.num_threads(), numba.get_num_threads())

    try:
        for n in range(1, numba.config.NUMBA_NUM_THREADS + 1):
            numba.set_num_threads(n)
            assert threads.num_threads() == numba.get_num_threads() == n
        worker = threading.Thread(target=other)
        worker.start()
        worker.join()
        assert seen["other"] == (1, 1)
        assert threads.num_threads() == numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
    finally:
        numba.set_num_threads(before)


def test_a_pinned_count_is_read_once_for_the_call_and_nests():
    import numba

    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        with threads.pinned_thread_count():
            numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
            assert threads.num_threads() == 1           # the count at entry, for the whole call
            with threads.pinned_thread_count():
                assert threads.num_threads() == 1
            assert threads.num_threads() == 1           # the inner exit keeps the outer count
        assert threads.num_threads() == numba.get_num_threads() == numba.config.NUMBA_NUM_THREADS
    finally:
        numba.set_num_threads(before)


def test_profiling_records_on_its_own_thread_only():
    from dorefanet.packed import profiling

    assert profiling.current() is None
    seen = []
    with profiling.recording() as outer:
        assert profiling.current() is outer
        worker = threading.Thread(target=lambda: seen.append(profiling.current()))
        worker.start()
        worker.join()
        with profiling.recording() as inner:
            assert profiling.current() is inner and inner is not outer
        assert profiling.current() is outer
    assert seen == [None] and profiling.current() is None
