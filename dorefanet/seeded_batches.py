"""Training batches that are a function of the seed alone: the same ``--seed``, the same batches, bit for bit.

Pass ``p`` over a data set of ``n`` examples visits them in the order
:func:`pass_order` ``(seed, p, n)``; batch ``k`` of that pass is the examples
``order[k * batch:(k + 1) * batch]``, augmented with the random stream
:func:`batch_rng` ``(seed, p, k)``.  Which worker process makes a batch, how many
workers there are, and when they finish do not change a single byte: the
workers' batches are handed on in their order (``k``), each made from its own
stream.  A run's graph seed (:mod:`dorefanet.driver`) does the same for the
TensorFlow side; docs/training.md, "Reproducible runs", says what that covers.

:class:`SeededBatches` is a tensorpack-style flow (``__len__``, ``reset_state``,
``__iter__``, one pass per ``__iter__``) without tensorpack: the data sources wrap
it (:func:`dorefanet.driver.train` hands it to tensorpack's input through a
``ProxyDataFlow``).  Its workers are forked once, in ``reset_state``, so they
share the parent's in-memory data set instead of receiving a copy, die with their
parent (``PR_SET_PDEATHSIG`` on Linux) and are stopped by :meth:`SeededBatches.close`.
"""
import collections
import os
import signal
import sys

import numpy as np

__all__ = ["pass_order", "batch_rng", "seed_augmentors", "SeededBatches", "DataWorkerError"]

# the streams of one seed: the order of the passes, the augmentation of the batches
_ORDER, _AUGMENT = 0, 1


class DataWorkerError(RuntimeError):
    """A data worker process ended without its batch (killed, out of memory)."""


def pass_order(seed, pass_index, size):
    """The order in which pass ``pass_index`` visits the ``size`` examples: a permutation of ``range(size)``."""
    return np.random.default_rng([int(seed), _ORDER, int(pass_index)]).permutation(int(size))


def batch_rng(seed, pass_index, batch_index):
    """The random stream of batch ``batch_index`` of pass ``pass_index`` (a ``RandomState``, as augmentors use)."""
    words = np.random.SeedSequence([int(seed), _AUGMENT, int(pass_index), int(batch_index)]).generate_state(4)
    return np.random.RandomState(words)


def seed_augmentors(augmentors, rng):
    """Make tensorpack augmentors, and those nested in them, draw from ``rng``.

    tensorpack seeds each augmentor from its process id and the time
    (``reset_state``); a batch's augmentation must come from its own stream instead.
    """
    for aug in augmentors:
        if isinstance(aug, (tuple, list)):   # RandomChooseAug's (augmentor, probability) pairs
            seed_augmentors(aug, rng)
            continue
        if not hasattr(aug, "get_transform"):
            continue
        aug.rng = rng
        for nested in ("augmentors", "aug_lists"):
            seed_augmentors(getattr(aug, nested, None) or (), rng)
        if getattr(aug, "aug", None) is not None:
            seed_augmentors([aug.aug], rng)


def _die_with_parent():
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)


def _worker(conn, parent, make_batch):
    """A worker process: make the batches it is sent, in the order it is sent them, until told to stop."""
    _die_with_parent()
    if os.getppid() != parent:   # the parent died before the line above took effect
        os._exit(0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the trainer's to handle
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            break
        if task is None:
            break
        indices, seed, pass_index, batch_index = task
        try:
            reply = ("batch", make_batch(indices, batch_rng(seed, pass_index, batch_index)))
        except Exception as err:   # travels to the trainer, which raises it
            reply = ("error", err)
        try:
            conn.send(reply)
        except Exception:   # e.g. an exception that does not pickle
            conn.send(("error", RuntimeError("{}: {}".format(type(reply[1]).__name__, reply[1]))))
    os._exit(0)


class SeededBatches:
    """Batches of ``batch`` examples of a data set of ``size``, each a function of ``(seed, pass, batch index)``.

    ``make_batch(indices, rng)`` returns one batch (a list of arrays) of the
    examples ``indices`` with augmentation drawn from ``rng``; it runs in
    ``workers`` forked processes (0: in the calling thread).  A pass yields
    ``size // batch`` batches (the last, partial one is dropped).
    :meth:`shard` gives each worker of a cluster its share of every pass (batch ``k`` to
    worker ``k mod count``), so that the cluster draws the stream one process would;
    :meth:`start_at` makes the next pass begin where a resumed run stopped.
    """

    def __init__(self, size, batch, make_batch, seed, workers=0):
        if batch < 1 or size < batch:
            raise ValueError("SeededBatches: {} examples make no batch of {}".format(size, batch))
        self.size, self.batch, self.make_batch, self.seed = int(size), int(batch), make_batch, int(seed)
        self.workers = max(0, int(workers))
        self._pass, self._skip = 0, 0
        self._shard, self._shards = 0, 1
        self._procs, self._conns = [], []
        self._sent = collections.deque()   # (worker, pass, batch index) of the batches asked for, in order
        self._next_worker = 0

    def __len__(self):
        return self.size // self.batch // self._shards

    def shard(self, index, count):
        """Draw only batches ``k`` with ``k mod count == index`` of each pass (worker ``index`` of ``count``)."""
        if not 0 <= index < count or self.size // self.batch < count:
            raise ValueError("SeededBatches: cannot give shard {} of {} of {} batches".format(
                index, count, self.size // self.batch))
        self._shard, self._shards = int(index), int(count)

    def start_at(self, batches):
        """Begin at batch ``batches`` of this flow's stream, where a run that drew that many stopped."""
        self._pass, self._skip = divmod(int(batches), len(self))

    def reset_state(self):
        if self.workers and not self._procs:
            import multiprocessing

            context = multiprocessing.get_context("fork")   # the workers share the data set in memory
            for _ in range(self.workers):
                mine, theirs = context.Pipe()
                proc = context.Process(target=_worker, args=(theirs, os.getpid(), self.make_batch), daemon=True)
                proc.start()
                theirs.close()
                self._procs.append(proc)
                self._conns.append(mine)

    def __iter__(self):
        pass_index, skip = self._pass, self._skip
        self._pass, self._skip = pass_index + 1, 0
        order = pass_order(self.seed, pass_index, self.size)
        ks = (self._shard + j * self._shards for j in range(skip, len(self)))
        tasks = ((order[k * self.batch:(k + 1) * self.batch], self.seed, pass_index, k) for k in ks)
        if not self.workers:
            for indices, seed, p, k in tasks:
                yield self.make_batch(indices, batch_rng(seed, p, k))
            return
        if not self._procs:
            self.reset_state()
        while self._sent:   # an earlier pass left unfinished: its batches are not this pass's
            self._receive()
        window = 2 * self.workers
        for task in tasks:
            self._send(task)
            if len(self._sent) >= window:
                yield self._receive()
        while self._sent:
            yield self._receive()

    def _send(self, task):
        worker = self._next_worker
        self._next_worker = (worker + 1) % self.workers
        self._conns[worker].send(task)
        self._sent.append((worker, task[2], task[3]))

    def _receive(self):
        worker, pass_index, batch_index = self._sent[0]
        try:
            kind, value = self._conns[worker].recv()
        except (EOFError, OSError):
            raise DataWorkerError("data worker {} of {} (pid {}) ended without batch {} of pass {} (killed, or out "
                                  "of memory?)".format(worker + 1, self.workers, self._procs[worker].pid,
                                                       batch_index, pass_index)) from None
        self._sent.popleft()
        if kind == "error":
            raise value
        return value

    def close(self):
        """Stop the worker processes (the flow starts new ones if it is iterated again)."""
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for proc in self._procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns, self._next_worker = [], [], 0
        self._sent.clear()

    def __del__(self):
        if getattr(self, "_procs", None):
            self.close()
