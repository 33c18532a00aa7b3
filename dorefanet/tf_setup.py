"""Prepare TensorFlow 2.21 for tensorpack 0.11, in one place.

Import this module before anything that imports TensorFlow (every script and
``dorefa.py`` do)::

    from dorefanet.tf_setup import tf

Why each step is here:

* tensorpack's layers are built on ``tf.compat.v1.layers``, which Keras 3
  (TensorFlow >= 2.16's default) no longer provides.  ``TF_USE_LEGACY_KERAS=1``
  makes TensorFlow use the ``tf-keras`` package instead; it is read when
  TensorFlow first loads Keras, so it must be set before that.
* TensorFlow's C++ runtime prints several lines at start-up and at its first
  device listing (oneDNN, missing CUDA drivers, cuInit) that drown the tools'
  own output; a bad input must end in one ``error: ...`` line, whatever the
  user's shell sets.  ``TF_CPP_MIN_LOG_LEVEL`` is honoured as follows:

  - unset: it becomes 3 (TensorFlow's own log lines hidden) and the start-up
    lines are filtered as for 3;
  - 1, 2 or 3: TensorFlow applies the level to what it logs once its logging is
    initialized, but the lines its libraries print while loading come before
    that and ignore the level.  :func:`_import_tensorflow_quietly` captures
    file descriptor 2 while importing TensorFlow and writes back all of it but
    the log lines below the level, absl's "before absl::InitializeLog()"
    banner and, on a machine without a CUDA driver, the ``failed call to
    cuInit`` ERROR line (level 2 shows ERROR lines, but without a driver no
    GPU could be used anyway).  Anything else (Python warnings, other errors,
    fatal lines) is written back to stderr, and Python exceptions propagate;
  - 0 (or a value that is not a number, which TensorFlow reads as 0): nothing
    is filtered; TensorFlow prints everything, the start-up notices and the
    cuInit error included.
* The project's graphs are TF1-style graphs (placeholders, sessions,
  collections), so v2 behaviour is disabled once, here.
* tensorpack 0.11 predates numpy 2 in a few places; the workarounds live in
  :func:`_patch_tensorpack_for_numpy2` and nowhere else.
* tensorpack's data workers rely on python-prctl to die with the trainer;
  :func:`_let_dataflow_workers_die_with_their_parent` provides that call.
* The quantizers' XLA functions (``dorefa.py``) are element-wise loops, most of
  their work fg's random numbers (integer rounds of Threefry).  XLA's CPU backend
  vectorizes them 256 bits wide unless told otherwise;
  ``--xla_cpu_prefer_vector_width=512`` is added to ``XLA_FLAGS`` so that
  AVX-512 CPUs run them 512 bits wide (other CPUs keep their widest vectors).  It
  changes no result (no reassociation: exact IEEE element-wise operations and
  max/min reductions), only speed.  A width in the user's ``XLA_FLAGS`` wins.

The allocator is left alone here: the scripts set it for training
(:func:`dorefanet.memory.keep_freed_memory`), a library import does not.
"""
import logging
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# (an XLA flag TensorFlow 2.21 knows; XLA rejects unknown ones, so revisit it with TensorFlow)
if "xla_cpu_prefer_vector_width" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_prefer_vector_width=512").strip()

if "keras" in sys.modules and "tf_keras" not in sys.modules:  # pragma: no cover - depends on import order
    import keras as _keras

    if _keras.__version__.startswith("3."):
        raise ImportError(
            "Keras 3 was imported before tf_setup; import tf_setup (or any of this project's "
            "modules) before keras/tensorflow so that tensorpack gets the legacy tf-keras layers")


def _start_up_log_level():
    """The ``TF_CPP_MIN_LOG_LEVEL`` to apply to TensorFlow's start-up lines, ``None`` to show them all."""
    value = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "3").strip()
    level = int(value) if value.isdigit() else 0
    return min(level, 3) if level > 0 else None


def _no_cuda_driver():
    """True when no CUDA driver library can be loaded (Linux), so TensorFlow cannot use a GPU at all."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")  # the library TensorFlow's CUDA stub loads
    except OSError:
        return True
    return False


_SEVERITIES = b"IWEF"  # absl's INFO, WARNING, ERROR, FATAL line prefixes, in TF_CPP_MIN_LOG_LEVEL's order


def _start_up_lines_to_show(output, level, no_cuda_driver):
    """The lines of ``output`` (bytes printed while TensorFlow loaded) that ``level`` lets through.

    Dropped: absl log lines (``I0000 00:00:...``) below ``level`` (with the
    second line of cpu_feature_guard's INFO notice), absl's banner about lines
    logged before its initialization and, when there is no CUDA driver, the
    ``failed call to cuInit`` ERROR line.  Every other line is kept, unchanged.
    """
    kept, after_dropped_log_line = [], False
    for line in output.splitlines(keepends=True):
        severity = _SEVERITIES.find(line[:1]) if line[1:5].isdigit() and line[5:6] == b" " else -1
        if severity >= 0:
            drop = severity < level or (no_cuda_driver and severity < 3 and b"failed call to cuInit" in line)
        elif line.startswith(b"WARNING: All log messages before absl::InitializeLog() is called"):
            drop = True
        else:
            drop = after_dropped_log_line and line.startswith(b"To enable the following instructions:")
        after_dropped_log_line = drop and severity >= 0
        if not drop:
            kept.append(line)
    return b"".join(kept)


def _import_tensorflow_quietly():
    # The oneDNN / CUDA-stub INFO lines are printed by the shared libraries as
    # they load, before absl logging exists, so TF_CPP_MIN_LOG_LEVEL does not
    # hide them; only capturing the file descriptor can.  The capture goes to
    # an unnamed temporary file that is filtered and written back, so nothing
    # but known start-up notices is lost; Python exceptions still propagate.
    level = _start_up_log_level()
    if level is None:
        import tensorflow
        return tensorflow
    no_cuda_driver = _no_cuda_driver()
    import tempfile

    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no stderr to protect
        import tensorflow
        return tensorflow
    captured = tempfile.TemporaryFile()  # unnamed: nothing is left behind
    os.dup2(captured.fileno(), 2)
    try:
        import tensorflow
        if no_cuda_driver:
            # TensorFlow prints "failed call to cuInit: ... (303)", an ERROR line
            # that TF_CPP_MIN_LOG_LEVEL=2 lets through, at its first device listing
            # (available_gpus(), or the first tf.Session), not at import.  Without
            # a driver no GPU can be used whatever CUDA_VISIBLE_DEVICES says later
            # (cli.check_modes sets it for --gpu), so listing the devices here,
            # inside the capture, is safe and the one place that line is filtered.
            # With a driver the listing is left for later: it reads
            # CUDA_VISIBLE_DEVICES, and a cuInit failure there is a real error.
            tensorflow.config.list_physical_devices("GPU")
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        captured.seek(0)
        shown = memoryview(_start_up_lines_to_show(captured.read(), level, no_cuda_driver))
        captured.close()
        try:
            while shown:  # back to file descriptor 2, where they were written
                shown = shown[os.write(2, shown):]
        except OSError:  # stderr is gone (e.g. a closed pipe): nobody to show them to
            pass
    return tensorflow


_tf = _import_tensorflow_quietly()
tf = _tf.compat.v1
# disable_v2_behavior() logs a deprecation warning about resource variables
# that users cannot act on; silence TensorFlow's Python logger while calling it.
_tf_logger = _tf.get_logger()
_previous_level = _tf_logger.level
_tf_logger.setLevel(logging.ERROR)
try:
    tf.disable_v2_behavior()
finally:
    _tf_logger.setLevel(_previous_level)


def _patch_tensorpack_for_numpy2():
    """Work around tensorpack 0.11 code paths that fail on numpy 2.

    * ``FakeData`` draws each component with ``rng.rand(*shape)`` and calls
      ``.astype`` on the result; for a scalar component (shape ``[]``, e.g. a
      label) numpy returns a Python float, which has no ``.astype``.  The
      replacement draws the same random stream and wraps it in an array.
    """
    import copy

    import numpy as np
    from tensorpack.dataflow import raw

    def _draw(self):
        return [np.asarray(self.rng.rand(*shape) * (hi - lo) + lo).astype(dtype)
                for shape, (lo, hi), dtype in zip(self.shapes, self.domain, self.dtype)]

    def _fake_data_iter(self):
        fixed = None if self.random else _draw(self)
        for _ in range(self._size):
            yield _draw(self) if fixed is None else copy.copy(fixed)

    raw.FakeData.__iter__ = _fake_data_iter


def _let_dataflow_workers_die_with_their_parent():
    """tensorpack asks ``prctl`` to kill data workers when the trainer dies.

    Without the (compiled, libcap-dependent) python-prctl package, a SIGKILLed
    training run would leave its worker processes running; on Linux the one
    call tensorpack needs is made through libc instead.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import prctl  # noqa: F401
    except ImportError:
        import ctypes
        import types

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        sys.modules["prctl"] = types.SimpleNamespace(
            set_pdeathsig=lambda sig: libc.prctl(pr_set_pdeathsig, int(sig), 0, 0, 0))


_patch_tensorpack_for_numpy2()
_let_dataflow_workers_die_with_their_parent()

__all__ = ["tf"]
