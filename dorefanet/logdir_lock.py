"""One run per logdir at a time: an OS lock held for as long as a training (or sweep) runs.

The lock is a POSIX record lock (``lockf``) on ``LOGDIR/.run.lock``: the kernel
drops it when the process ends however it ends, so a killed run never leaves a
stale lock and the same command resumes at once.  Unlike ``flock``, it is not
shared with forked children, so data workers orphaned by a SIGKILL do not keep
holding it.  The file holds the holder's process id,
for the message of the run that is refused.  Reading a logdir (``--eval``,
``--run``, ``--export*``) takes no lock: TensorFlow replaces the
``checkpoint`` index only once a checkpoint is complete.
"""
import errno
import fcntl
import os

from dorefanet.errors import TrainingSetupError

__all__ = ["LOCK_FILE", "LogdirLock", "lock_logdir"]

LOCK_FILE = ".run.lock"


class LogdirLock:
    """A held lock on one logdir; :meth:`release` (or the end of the process) frees it."""

    def __init__(self, logdir, handle):
        self.logdir = logdir
        self._handle = handle

    @property
    def held(self):
        return self._handle is not None

    def release(self):
        if self._handle is not None:
            self._handle.close()    # closing the descriptor drops the lock
            self._handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _holder(path):
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return text if text.isdigit() else None


def lock_logdir(logdir, what="--logdir"):
    """Hold ``logdir`` (made if missing) for this process, or raise a one-line :class:`TrainingSetupError`.

    A refused caller writes nothing: an existing lock file is opened without
    being truncated, and the logdir it names is left as it is.
    """
    path = os.path.join(logdir, LOCK_FILE)
    if not os.path.exists(path):
        os.makedirs(logdir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    handle = os.fdopen(fd, "r+")
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        handle.close()
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        pid = _holder(path)
        raise TrainingSetupError("{} is in use by another run ({}); wait for it to end, or choose another {}".format(
            logdir, "process {}".format(pid) if pid else "process unknown", what)) from None
    handle.seek(0)
    handle.truncate()
    handle.write("{}\n".format(os.getpid()))
    handle.flush()
    return LogdirLock(logdir, handle)
