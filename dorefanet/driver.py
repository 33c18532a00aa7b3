"""What every script does besides defining its network and its data: train, --eval, --run, --export.

A script parses its flags (:mod:`dorefanet.cli`), builds its model and calls
:func:`run_script` with its own ``train``, ``evaluate`` and ``run``
functions; training calls :func:`train_model` with its data flows and
callbacks.  Everything a run shares lives here: the mode dispatch, errors as
one line, ``--load`` as a strict start, seeds, the run directory and its
resume, and the summary line at the end.
"""
import json
import os
import shlex

import numpy as np

from dorefanet.cli import check_run_table, run_reporting_errors
from dorefanet.errors import ModelLoadError, TrainingSetupError
from dorefanet.layer_bits import LayerBitsError
from dorefanet.image_io import ImageReadError
from dorefanet.inference import EvaluationError, results_only_on_stdout
from dorefanet.packed.export import PackedExportError

# TensorFlow and tensorpack are imported only by the modes that use them: the packed engine's
# --eval / --run run without (see packed_only).

__all__ = ["COMMON_ERRORS", "packed_only", "run_script", "layer_bits_record", "train_model", "summary_line"]

#: Errors whose message is a complete one-line explanation, in every script.
COMMON_ERRORS = (ModelLoadError, TrainingSetupError, ImageReadError, EvaluationError, PackedExportError,
                 LayerBitsError)


def packed_only(args):
    """Whether the flags ask for the packed engine's ``--eval`` / ``--run`` only: no TensorFlow is needed."""
    return (getattr(args, "engine", None) == "packed" and bool(args.eval or args.run)
            and not (args.export or args.export_packed or getattr(args, "fake", False)))


def run_script(args, model, train, evaluate, run, training, errors=()):
    """Run the mode the flags chose; return the exit status (2 and one ``error:`` line for bad input).

    ``train()``, ``evaluate()`` and ``run()`` are the script's own; each runs in
    a fresh graph.  ``--export`` and ``--export-packed`` need only ``model``.
    """
    def act():
        check_run_table(args, model)
        if packed_only(args):
            with results_only_on_stdout():
                return evaluate() if args.eval else run()
        from dorefanet.tf_setup import tf
        from dorefanet.checkpoints import export_weights  # also sets up tensorpack's logger before the redirect

        if training:
            with tf.Graph().as_default():
                train()
            return 0
        with results_only_on_stdout():
            if args.export:
                export_weights(model, args.load, args.export)
                return 0
            if args.export_packed:
                from dorefanet.packed.export import export_packed

                export_packed(model, args.load, args.export_packed, args.first_last_dtype)
                return 0
            with tf.Graph().as_default():
                return evaluate() if args.eval else run()

    return run_reporting_errors(act, COMMON_ERRORS + tuple(errors), training)


def layer_bits_record(args, model, resume_key):
    """The ``config.json`` fields of a run's bit widths; a mixed table also joins the run's ``resume_key``.

    ``layer_bits`` are the ``--layer-bits`` entries as given (what ``--load
    LOGDIR`` replays), ``layer_table`` the resolved ``{layer: "W,A,G"}``.
    """
    table = model.layer_plan.table()
    if model.layer_plan.mixed:
        # a run with the same --dorefa but other per-layer bits is another run, not this one resumed
        resume_key["layer_table"] = table
    return {"layer_bits": [[pattern, str(bits)] for pattern, bits in args.layer_bits], "layer_table": table}


def train_model(model, args, logdir, config, dataflow, steps, callbacks, trainer, plan=None):
    """Train ``model`` into ``logdir`` (resumed or refused as :func:`dorefanet.training.plan_run` decides).

    ``args``: ``load``, ``seed``, ``epochs``, ``overwrite``.  A given ``plan``
    (a non-chief process of a multi-process run) replaces the chief's own.
    Returns the plan the run followed.
    """
    from dorefanet.checkpoints import StrictInit, read_weights
    from dorefanet.tf_setup import tf
    from dorefanet.training import launch, plan_run

    if plan is None:
        plan = plan_run(logdir, config, steps, args.epochs, overwrite=args.overwrite)
    init = None
    if args.load and not plan.resumed:
        init = StrictInit(read_weights(args.load), args.load)
    np.random.seed(args.seed)
    tf.set_random_seed(args.seed)
    launch(model, dataflow, plan, steps, args.epochs, callbacks, trainer, session_init=init)
    return plan


def summary_line(logdir, error_key, what, script, data_flags):
    """The plain line that ends a training run: its final error, where the model is, how to evaluate it.

    ``error_key`` is the ``stats.json`` field of the error (``what`` names it);
    ``script`` how to call the script; ``data_flags`` the flags that give the
    evaluation data (the bit widths come from the run's own config.json).
    """
    stats = []
    try:
        with open(os.path.join(logdir, "stats.json")) as f:
            stats = json.load(f)
    except (OSError, ValueError):
        pass
    last = next((s for s in reversed(stats) if error_key in s), None) if isinstance(stats, list) else None
    command = " ".join(shlex.quote(part) for part in
                       [script, "--load", logdir, "--eval"] + list(data_flags))
    if last is None:
        result = "no {} recorded".format(what)
    else:
        epochs = last.get("epoch_num", "?")
        result = "{} {:.4f} after {} epoch{}".format(what, last[error_key], epochs, "" if epochs == 1 else "s")
    return "done: {}; model in {} (evaluate: {})".format(result, logdir, command)
