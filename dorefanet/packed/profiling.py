"""Where a packed model's time goes: wall time per program op, split into the stages inside it.

Off by default: the engine asks :func:`current` once per op and the kernels once per call, and
do nothing more when it returns None.  ``with profiling.recording() as prof: model.predict(x)``
fills ``prof.ops``, one :class:`OpRecord` per executed op (fused ops are one record), each with
``stages``: seconds by stage name (``pack`` = activation codes to padded bit planes and window
sums, ``popcount`` = the bit-plane GEMM, ``epilogue`` = accumulators to floats or codes, ...).
"""
import contextlib
import threading
import time

__all__ = ["OpRecord", "Profile", "current", "recording", "clock"]

clock = time.perf_counter
_local = threading.local()
#: recordings open in any thread: while there are none, current() skips the thread-local lookup (0.4 us, asked
#: about ten times per batch-1 prediction)
_open = [0]
_open_lock = threading.Lock()


class OpRecord:
    """One executed op: what it was, its wall time and the stages measured inside it."""

    __slots__ = ("index", "kind", "layer", "seconds", "stages", "macs", "w_bits", "a_bits", "path")

    def __init__(self, index, kind, layer):
        self.index, self.kind, self.layer = index, kind, layer
        self.seconds = 0.0
        self.stages = {}
        self.macs = 0               # multiply-adds of a conv / fc layer (0 otherwise)
        self.w_bits = self.a_bits = None
        self.path = None            # "popcount", "int-gemm" or "float" for conv / fc

    def add(self, stage, seconds):
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds


class Profile:
    def __init__(self):
        self.ops = []
        self.op = None              # the record stages are added to now

    def add(self, stage, seconds):
        if self.op is not None:
            self.op.add(stage, seconds)


def current():
    """The profile being recorded on this thread, or None."""
    if not _open[0]:
        return None
    return getattr(_local, "profile", None)


@contextlib.contextmanager
def recording():
    """Record the ops and stages run on this thread inside the block into a new :class:`Profile`."""
    with _open_lock:
        _open[0] += 1
    previous = getattr(_local, "profile", None)
    _local.profile = prof = Profile()
    try:
        yield prof
    finally:
        _local.profile = previous
        with _open_lock:
            _open[0] -= 1
