"""Training runs that survive being killed: logdir policy, resume, run record, launch.

A run's logdir holds tensorpack's checkpoints (written every epoch; TensorFlow
writes a checkpoint's files first and then replaces the small ``checkpoint``
index file, so the index always names a complete checkpoint), TensorBoard
events, ``stats.json`` and our ``config.json``.  Started again with the same
command, a killed run resumes from its last checkpoint: the global step comes
from the checkpoint and the epoch is derived from it, so the learning-rate
schedule continues exactly where it was.
"""
import datetime
import os
import platform
import shutil
import sys

from dorefanet.tf_setup import tf

from dorefanet.atomic_file import read_json, write_json_atomic  # noqa: E402
from dorefanet.checkpoints import latest_checkpoint  # noqa: E402
from dorefanet.logdir_lock import lock_logdir  # noqa: E402

__all__ = ["TrainingSetupError", "RunPlan", "plan_run", "write_json_atomic", "package_versions",
           "select_trainer", "gate_gradients", "gated_trainer", "launch", "session_config", "available_gpus",
           "quiet_tensorpack"]


from dorefanet.errors import TrainingSetupError  # noqa: E402  (defined without TensorFlow)


def package_versions():
    import numpy
    import scipy
    import tensorpack
    import cv2

    import tensorflow

    return {"python": platform.python_version(), "tensorflow": tensorflow.__version__,
            "tensorpack": tensorpack.__version__,
            "numpy": numpy.__version__, "scipy": scipy.__version__, "opencv": cv2.__version__}


def checkpoint_step(prefix):
    """The global step stored in a checkpoint (0 if it has none)."""
    reader = tf.train.NewCheckpointReader(prefix)
    for name in ("global_step", "global_step:0"):
        if reader.has_tensor(name):
            return int(reader.get_tensor(name))
    return 0


class RunPlan:
    """Where a run starts: fresh (``checkpoint is None``) or resumed at ``starting_epoch``.

    ``lock``: the :class:`~dorefanet.logdir_lock.LogdirLock` the run holds on its logdir (released by
    :meth:`release` once training is over, or when the process ends).
    """

    def __init__(self, logdir, checkpoint=None, step=0, starting_epoch=1, lock=None):
        self.logdir = logdir
        self.checkpoint = checkpoint
        self.step = step
        self.starting_epoch = starting_epoch
        self.lock = lock

    def release(self):
        if self.lock is not None:
            self.lock.release()

    @property
    def resumed(self):
        return self.checkpoint is not None


def plan_run(logdir, config, steps_per_epoch, max_epoch, overwrite=False):
    """Decide how to start a run in ``logdir`` and record ``config`` there.

    * no logdir, or one without a checkpoint: a fresh run;
    * a logdir with a checkpoint short of ``max_epoch``: resume it, provided
      the recorded configuration (``config['resume_key']``) is the same;
    * a finished run: refused unless ``overwrite``, which moves the old logdir
      aside (``<logdir>.old-<time>``) rather than deleting it;
    * a logdir another run holds (:func:`~dorefanet.logdir_lock.lock_logdir`):
      refused, and nothing in it is touched.

    The returned plan holds the logdir's lock.
    """
    lock = lock_logdir(logdir)   # before anything is read or written: a second run touches nothing
    try:
        if overwrite and os.path.exists(os.path.join(logdir, "checkpoint")):
            backup = "{}.old-{}".format(logdir.rstrip("/"), datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
            shutil.move(logdir, backup)
            print("[training] --overwrite: moved the previous run to {}".format(backup), file=sys.stderr)
            lock.release()
            lock = lock_logdir(logdir)
        return _plan_locked(logdir, config, steps_per_epoch, max_epoch, lock)
    except BaseException:
        lock.release()
        raise


def _plan_locked(logdir, config, steps_per_epoch, max_epoch, lock):
    record_path = os.path.join(logdir, "config.json")
    ckpt, step = _last_checkpoint(logdir) if os.path.isdir(logdir) else (None, 0)
    if ckpt is not None:
        done_epochs = step // steps_per_epoch
        previous = read_json(record_path)
        if previous is None:
            raise TrainingSetupError(
                "{} has checkpoints but no readable config.json, so this command cannot be checked against the "
                "run it would resume. Use --overwrite to move it aside, or another --logdir".format(logdir))
        if previous.get("resume_key") != config.get("resume_key"):
            raise TrainingSetupError(
                "{} holds a run with a different configuration ({}); this command asks for ({}). Use another "
                "--logdir, or --overwrite to move the old run aside".format(
                    logdir, previous.get("resume_key"), config.get("resume_key")))
        if step % steps_per_epoch != 0:
            raise TrainingSetupError(
                "{}: its last checkpoint is at step {}, which is not a whole number of epochs of {} steps; "
                "resume with the --steps-per-epoch it was trained with".format(logdir, step, steps_per_epoch))
        if done_epochs >= max_epoch:
            raise TrainingSetupError(
                "{} holds a finished run ({} of {} epochs, step {}). Pass --overwrite to move it aside and start "
                "over, a larger --epochs to train further, or another --logdir".format(
                    logdir, done_epochs, max_epoch, step))
        _trim_stats(logdir, done_epochs)
        record = dict(previous)
        record["resumed_at"] = previous.get("resumed_at", []) + [
            {"step": step, "epoch": done_epochs + 1, "epochs": max_epoch, "time": _now()}]
        write_json_atomic(record, record_path)
        return RunPlan(logdir, ckpt, step, done_epochs + 1, lock)
    os.makedirs(logdir, exist_ok=True)
    record = dict(config, started=_now(), command=sys.argv, versions=package_versions())
    write_json_atomic(record, record_path)
    return RunPlan(logdir, lock=lock)


def _last_checkpoint(logdir):
    """``(prefix, global step)`` of the newest checkpoint in ``logdir``, ``(None, 0)`` without one.

    A damaged checkpoint (a truncated file, an index naming a deleted
    checkpoint) is a one-line :class:`TrainingSetupError`, not a traceback.
    """
    try:
        ckpt = latest_checkpoint(logdir)
        return (ckpt, checkpoint_step(ckpt)) if ckpt is not None else (None, 0)
    except Exception as err:  # TensorFlow and protobuf raise several types for damaged files
        raise TrainingSetupError(
            "{}: its last checkpoint cannot be read ({}); use --overwrite to move the run aside, or another "
            "--logdir".format(logdir, str(err).splitlines()[0] if str(err) else type(err).__name__)) from None


def _now():
    return datetime.datetime.now().isoformat(timespec="seconds")


def _trim_stats(logdir, done_epochs):
    """Drop stats.json entries of epochs after the checkpoint (a kill can land between the two writes)."""
    path = os.path.join(logdir, "stats.json")
    stats = read_json(path)
    if isinstance(stats, list):
        kept = [s for s in stats if int(s.get("epoch_num", 0)) <= done_epochs]
        if len(kept) != len(stats):
            write_json_atomic(kept, path)


def available_gpus():
    """Number of GPUs TensorFlow can use (asks TensorFlow, not nvidia-smi, so it is quiet on CPU machines)."""
    import tensorflow

    return len(tensorflow.config.list_physical_devices("GPU"))


def quiet_tensorpack():
    """Only warnings from tensorpack: for evaluation, inference and export, whose output users read."""
    import logging

    logging.getLogger("tensorpack").setLevel(logging.WARNING)


def session_config(num_towers=1):
    """tensorpack's session settings, with CPU threads that fit the machine.

    tensorpack runs every op on a single thread (``intra_op_parallelism_threads
    = 1``), tuned for GPU servers whose CPU only feeds data; on a CPU-only
    machine that leaves all but one core idle during each convolution.

    With several towers (``num_towers > 1``) the inter-op pool gets two
    threads: the multi-tower trainers stage their inputs through blocking ops,
    and with a single thread the first step never finishes (seen with 2 towers
    on TensorFlow 2.21; 2 and 3 towers run with two threads).
    """
    from tensorpack.tfutils import get_default_sess_config

    config = get_default_sess_config()
    if available_gpus() == 0:
        config.intra_op_parallelism_threads = os.cpu_count() or 1
        config.inter_op_parallelism_threads = 2 if num_towers > 1 else 1
        # TensorFlow sizes one process-wide inter-op pool from the first session's setting: a one-tower
        # session earlier in the process (tests run several trainings in one) left a later two-tower run
        # with one thread, and its first step never finished. Pools of its own keep the setting.
        config.use_per_session_threads = num_towers > 1
    return config


def gate_gradients(grads):
    """``grads`` (a tower's ``[(gradient, variable), ...]``), released only once every one of them is computed.

    The variables are TF1 reference variables (``disable_v2_behavior``): an
    op of the backward pass that uses a variable's value (``dx = dy W^T`` of
    ``fct``, a batch norm's gradient using gamma) reads the variable's buffer
    when it runs, and ``apply_gradients`` updates that buffer in place.
    tensorpack computes the gradients with ``gate_gradients=False``, so the
    update of a variable may run as soon as *its* gradient is ready, while
    the backward through that variable's layer to the layers below has not
    run yet: those then see the updated value.  With two towers and two
    inter-op threads that happened in some runs and not others (measured:
    the two towers of one process, same batch and same variables, got equal
    ``fct`` gradients and gradients of every layer below ``fct`` that
    differed by about 100 %; the final variables differed by up to 1e7 ulps
    between two runs of the same command).  The gate makes every update wait
    for the whole backward pass of its tower (and, through the averaged
    gradient, of every tower).
    """
    from dorefanet.tf_setup import tf

    if not grads:
        return grads
    gated = tf.tuple([g for g, _ in grads], name="gate_gradients")
    return [(g, v) for g, (_, v) in zip(gated, grads)]


def gated_trainer(trainer_class):
    """``trainer_class`` whose towers' gradients go through :func:`gate_gradients`."""

    class Gated(trainer_class):
        def _make_get_grad_fn(self, input, get_cost_fn, get_opt_fn):
            get_grads = super()._make_get_grad_fn(input, get_cost_fn, get_opt_fn)

            def get_gated_grads():
                grads = get_grads()
                return None if grads is None else gate_gradients(grads)
            return get_gated_grads

    Gated.__name__ = Gated.__qualname__ = "Gated" + trainer_class.__name__
    return Gated


def select_trainer(num_towers):
    """tensorpack's synchronous replicated trainer for several towers, else a simple one.

    Both update the variables only after the whole backward pass (:func:`gate_gradients`).
    """
    from tensorpack import SimpleTrainer, SyncMultiGPUTrainerReplicated

    if num_towers <= 1:
        return gated_trainer(SimpleTrainer)()
    return gated_trainer(SyncMultiGPUTrainerReplicated)(num_towers)


def _epoch_timer():
    """A callback recording each epoch's training time as ``epoch_seconds`` (in ``stats.json``).

    The time is that of the epoch's steps only: TensorFlow start-up, graph
    building and the evaluation after the epoch are not in it, so the figure
    compares configurations, and a resumed run's epochs add up to its whole
    training (an epoch killed before its checkpoint is dropped with its stats).
    """
    import time

    from tensorpack.callbacks import Callback

    class EpochTimer(Callback):
        _chief_only = False

        def _before_epoch(self):
            self._start = time.perf_counter()

        def _after_epoch(self):
            self._seconds = time.perf_counter() - self._start

        def _trigger_epoch(self):
            self.trainer.monitors.put_scalar("epoch_seconds", self._seconds)

    return EpochTimer()


def launch(model, dataflow, plan, steps_per_epoch, max_epoch, callbacks, trainer, session_init=None,
           extra_monitors=(), chief=True):
    """Train ``model`` on ``dataflow`` into ``plan.logdir``, resuming when ``plan`` says so.

    ``chief=False`` (a worker of a cluster other than the chief): no checkpoints, events or stats.json, only the log.
    """
    from tensorpack import (JSONWriter, ModelSaver, QueueInput, SaverRestore, ScalarPrinter, TFEventWriter,
                            TrainConfig, launch_train_with_config, logger)

    logger.set_logger_dir(plan.logdir, action="k")
    if plan.resumed:
        logger.info("Resuming {} from {} (step {}, starting at epoch {})".format(
            plan.logdir, plan.checkpoint, plan.step, plan.starting_epoch))
        session_init = SaverRestore(plan.checkpoint)
    config = TrainConfig(
        model=model,
        data=QueueInput(dataflow),
        callbacks=[_epoch_timer()] + ([ModelSaver(max_to_keep=3, keep_checkpoint_every_n_hours=1000)] if chief else [])
        + list(callbacks),
        monitors=([TFEventWriter(), JSONWriter()] if chief else []) + [ScalarPrinter()] + list(extra_monitors),
        steps_per_epoch=steps_per_epoch,
        max_epoch=max_epoch,
        starting_epoch=plan.starting_epoch,
        session_init=session_init,
        session_config=session_config(len(getattr(trainer, "devices", None) or [0])),
    )
    launch_train_with_config(config, trainer)
    # The input's enqueue thread (a daemon) may still be inside the dataflow (an OpenCV call) when the
    # script returns; at interpreter exit such a thread is ended by a forced unwind through OpenCV's C++
    # frames, which aborts the process (measured once in the suite: "*** Begin stack trace ***",
    # pthread_exit from PyEval_RestoreThread in cv2). The session is closed by now, so the thread ends
    # after its current datapoint.
    thread = getattr(config.data, "thread", None)
    if thread is not None:
        thread.join(60)
    _close_worker_processes(dataflow)


def _close_worker_processes(dataflow):
    """Stop the data worker processes of ``dataflow`` (and of the flows it wraps) now.

    tensorpack stops them from an atexit hook that prints ``... successfully
    cleaned-up.``, after everything a script prints once training is done (its
    summary line).  Done here, quietly, that hook has nothing left to do.
    """
    import contextlib
    import io

    from tensorpack.dataflow.parallel import _MultiProcessZMQDataFlow

    from dorefanet.seeded_batches import SeededBatches

    while dataflow is not None:
        if isinstance(dataflow, SeededBatches):
            dataflow.close()
        if isinstance(dataflow, _MultiProcessZMQDataFlow) and dataflow._reset_done:
            with contextlib.redirect_stdout(io.StringIO()):
                dataflow.__del__()
            dataflow._reset_done = False   # tensorpack's own clean-up (atexit, __del__) then returns at once
        dataflow = getattr(dataflow, "ds", None)
