"""The packed engine's threads: a team of helper threads that wait for the next job spinning, then sleeping.

Every multi-threaded kernel is a serial ``nogil`` numba function run by the calling thread and
``numba.get_num_threads() - 1`` helpers at once, each taking tasks from a shared atomic counter
(:func:`next_task`) until none is left; :func:`run_workers` starts such a call.

Why not a ``ThreadPoolExecutor``: its helper sleeps on a lock, and waking it (and then the caller,
waiting for the helper's result) cost 50-120 us a call on this 2-core VM, as much as a batch-1
layer takes.  A helper of this team waits for ``SPIN_SECONDS`` after its last job in ``nogil`` numba
code that reads a sequence number (the calling thread keeps the GIL meanwhile), so a job published
within that time starts within microseconds; only then does it sleep on a condition variable, not to
take a core from other processes for long.  Measured on 16 tasks of 16 us (``run_workers`` of
a spin loop, median of 3000 calls): one thread 262 us, a ThreadPoolExecutor 183 us, this team 148-155 us.

Jobs are started one at a time: a Python thread that finds the team busy (another thread's kernel is
running on it) runs its kernel on its own thread, which gives the same result.  The helpers are daemon
threads, ended at interpreter exit (``atexit``); a forked child makes a team of its own.
"""
import atexit
import contextlib
import os
import threading
import time

import numpy as np
from numba import config, get_num_threads, njit

from .intrinsics import atomic_load, compare_exchange, fetch_add, pause

__all__ = ["run_workers", "run_split", "next_task", "num_threads", "pinned_thread_count", "SPIN_SECONDS"]

_JIT = dict(nogil=True, cache=True)
#: How long an idle helper keeps spinning for the next job before it sleeps.
SPIN_SECONDS = 1e-3

_PENDING, _TAKEN, _DONE, _CANCELLED = 0, 1, 2, 3


_pinned = threading.local()


def num_threads():
    """``numba.get_num_threads()``, or within :func:`pinned_thread_count` the count it read on entry."""
    return getattr(_pinned, "count", 0) or get_num_threads()


@contextlib.contextmanager
def pinned_thread_count():
    """Read this thread's numba thread count once for a whole call of the engine.

    Each layer of a prediction asks for the count, about ten times per batch-1 call, and numba's public
    call takes two locks (0.7 us, against 0.1 us for a thread-local read).  Nested uses keep the outer count.
    """
    if getattr(_pinned, "count", 0):
        yield
        return
    _pinned.count = get_num_threads()
    try:
        yield
    finally:
        _pinned.count = 0


@njit(inline="always", **_JIT)
def next_task(counter):
    """The task a worker takes next: counter[0] is the next task to hand out."""
    return fetch_add(counter, 0, 1)


@njit(**_JIT)
def _await_change(seq, seen, spins, counter):
    """Spin until ``seq[0] != seen`` (returns the new value) or ``spins`` reads have passed (returns ``seen``).

    After a change, spin a little longer until ``counter[0]`` is not 0: the calling thread holds the GIL
    until it is in its own share of the job's kernel, and returning from here takes the GIL; blocking on it
    and being woken cost about 20 us (the median start of a helper after the job was published, timed on a
    float convolution).
    """
    for _ in range(spins):
        now = atomic_load(seq, 0)
        if now != seen:
            for _ in range(spins >> 4):
                if atomic_load(counter, 0) != 0:
                    break
                pause()
            return now
        pause()
    return seen


@njit(**_JIT)
def _await_done(state, spins):
    for _ in range(spins):
        if atomic_load(state, 0) == _DONE:
            return True
        pause()
    return False


@njit(**_JIT)
def _claim(state, new):
    """Move a pending job to ``new`` (taken or cancelled); False if it was no longer pending."""
    return compare_exchange(state, 0, _PENDING, new) == _PENDING


@njit(**_JIT)
def _finish_and_await(state, seq, seen, spins, counter):
    """Mark a taken job done, then :func:`_await_change` for the next one."""
    compare_exchange(state, 0, _TAKEN, _DONE)
    return _await_change(seq, seen, spins, counter)


class _Job:
    __slots__ = ("call", "args", "state", "error")

    def __init__(self, call, args):
        self.call, self.args = call, args
        self.state = np.zeros(1, np.int64)
        self.error = None


class _Helper:
    """One helper thread and its job slot; ``seq[0]`` counts the jobs published to it."""

    def __init__(self, team, index):
        self.seq = np.zeros(1, np.int64)
        self.job = None
        self.sleeping = False
        self.wake = threading.Condition(threading.Lock())
        self.thread = threading.Thread(target=self._serve, args=(team.counter, team.spins), daemon=True,
                                       name="packed-kernels-%d" % index)
        self.thread.start()

    def publish(self, job):
        self.job = job
        self.seq[0] += 1
        if self.sleeping:
            with self.wake:
                self.wake.notify()

    def _serve(self, counter, spins):
        seen = 0
        now = _await_change(self.seq, seen, spins, counter)
        while True:
            if now == seen:
                with self.wake:
                    self.sleeping = True
                    while self.seq[0] == seen:
                        self.wake.wait()
                    self.sleeping = False
                    now = int(self.seq[0])
            seen = now
            job = self.job
            if job is _STOP:
                return
            if job is None or not _claim(job.state, _TAKEN):
                # cancelled, or a job already done (published twice while this ran)
                now = _await_change(self.seq, seen, spins, counter)
                continue
            try:
                job.call(*job.args)
            except BaseException as error:   # raised again in the thread that waits for the job
                job.error = error
            # one nogil call marks the job done and waits for the next: returning to Python in between took
            # the GIL back just as the waiting thread, released, wanted it, and the helper slept on the GIL
            # until that thread's next kernel (and then woke late for the next job)
            now = _finish_and_await(job.state, self.seq, seen, spins, counter)


#: The job that ends a helper's thread.
_STOP = object()


class _Team:
    def __init__(self):
        self.pid = os.getpid()
        self.lock = threading.Lock()     # held by the Python thread whose kernel runs on the team
        self.helpers = []
        self.counter = np.zeros(1, np.int64)    # run_workers' task counter while the team runs a call
        self.spins = _spins_for(SPIN_SECONDS)

    def ensure(self, count):
        while len(self.helpers) < count:
            self.helpers.append(_Helper(self, len(self.helpers)))
        return self.helpers[:count]


def _spins_for(seconds):
    """Reads of :func:`_await_change` in about ``seconds`` (timed once per process)."""
    seq = np.zeros(1, np.int64)
    _await_change(seq, 0, 10, seq)       # compiled (or loaded from the cache) outside the timing
    n = 1 << 16
    start = time.perf_counter()
    _await_change(seq, 0, n, seq)
    elapsed = max(time.perf_counter() - start, 1e-7)
    return max(1000, int(n * seconds / elapsed))


_team = None
_team_lock = threading.Lock()


@atexit.register
def _stop_team():
    """End the helper threads before the interpreter finalizes: a daemon thread that comes back from compiled
    code then is stopped by the interpreter in the middle of its frames."""
    global _team
    with _team_lock:
        team = _team
    if team is None or team.pid != os.getpid():
        return
    if not team.lock.acquire(timeout=1.0):      # another thread's kernel still running: leave the helpers be
        return
    try:
        for helper in team.helpers:
            helper.publish(_STOP)
        for helper in team.helpers:
            helper.thread.join(timeout=1.0)
        with _team_lock:
            if _team is team:
                _team = None
    finally:
        team.lock.release()


def _the_team():
    """This process's team (a forked child makes its own: the parent's threads are not in it)."""
    global _team
    with _team_lock:
        if _team is None or _team.pid != os.getpid():
            _team = _Team()
        return _team


def _wait(job):
    """Wait for ``job``, first withdrawing it if no helper took it yet; True if it ran (its error raised)."""
    if _claim(job.state, _CANCELLED):
        return False
    interrupted = None
    while not _await_done(job.state, 1 << 16):
        try:
            time.sleep(20e-6)            # a helper took it and lost its core: do not spin on it
        except BaseException as error:  # Ctrl-C: still wait, the helper writes into this call's arrays
            interrupted = interrupted or error
    if interrupted is not None:
        raise interrupted
    if job.error is not None:
        raise job.error
    return True


def _start(team, calls, counter_start):
    """Publish ``calls[i] = (call, args)`` to helper ``i`` of ``team``; returns the jobs, or None if the team is
    busy (another Python thread's kernel runs on it).

    The team's ``counter`` is set to ``counter_start`` first: helpers that see a new job wait (spinning)
    until it is not 0 before they take the GIL (see ``_Helper._serve``).
    """
    if not team.lock.acquire(blocking=False):
        return None
    try:
        team.counter[0] = counter_start
        jobs = [_Job(call, args) for call, args in calls]
        for helper, job in zip(team.ensure(len(jobs)), jobs):
            helper.publish(job)
    except BaseException:
        team.lock.release()
        raise
    return jobs


def _finish_all(team, jobs, parts=None):
    """Wait for (or withdraw) every job, then free the team; raise the first helper's error.  With ``parts``
    (the jobs' own calls), a withdrawn job runs here."""
    error = None
    try:
        for i, job in enumerate(jobs):
            try:
                if not _wait(job) and parts is not None and error is None:
                    call, args = parts[i]
                    call(*args)
            except BaseException as raised:
                error = error or raised
    finally:
        team.lock.release()
    if error is not None:
        raise error


def run_workers(worker, n_tasks, threads, *args):
    """``worker(counter, n_tasks, *args)`` on min(threads, n_tasks) threads: the calling one and helpers.

    Callers pass ``threads = 1`` for small calls.  Once the calling thread runs out of tasks it
    withdraws the jobs no helper has taken (a helper that starts late would only find that no task
    is left) and waits for the others, which are finishing their last task.
    """
    helpers = max(0, min(threads, n_tasks, config.NUMBA_NUM_THREADS) - 1)
    team = _the_team() if helpers else None
    # the next task to hand out: the team's own counter, 0 until the calling thread takes the first task
    jobs = None if team is None else _start(team, [(worker, (team.counter, n_tasks) + args)] * helpers, 0)
    if jobs is None:                           # one thread, or the team is another thread's
        worker(np.zeros(1, np.int64), n_tasks, *args)
        return
    try:
        worker(team.counter, n_tasks, *args)
    finally:
        _finish_all(team, jobs)


def run_split(kernel, rows, threads, *args):
    """``kernel(r0, r1, *args)`` over ``range(rows)`` in ``threads`` equal parts, the first on the calling thread.

    A part that no helper has started by the time the calling thread is done with its own runs on the
    calling thread.
    """
    threads = max(1, min(threads, rows, config.NUMBA_NUM_THREADS))
    bounds = [rows * i // threads for i in range(threads + 1)]
    parts = [(kernel, (bounds[i], bounds[i + 1]) + args) for i in range(1, threads)]
    team = _the_team() if parts else None
    jobs = None if team is None else _start(team, parts, 1)
    if jobs is None:
        kernel(0, rows, *args)
        return
    try:
        kernel(bounds[0], bounds[1], *args)
    except BaseException:
        _finish_all(team, jobs)
        raise
    _finish_all(team, jobs, parts)
