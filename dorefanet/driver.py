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
from dorefanet.memory import keep_freed_memory
from dorefanet.image_io import ImageReadError
from dorefanet.inference import EvaluationError, results_only_on_stdout
from dorefanet.packed.export import PackedExportError
from dorefanet.packed.format import PackedFormatError

# TensorFlow and tensorpack are imported only by the modes that use them: the packed engine's
# --eval / --run run without (see packed_only).

__all__ = ["COMMON_ERRORS", "packed_only", "run_script", "model_summary", "model_totals", "layer_bits_record",
           "train_model", "summary_line"]

#: Errors whose message is a complete one-line explanation, in every script.
COMMON_ERRORS = (ModelLoadError, TrainingSetupError, ImageReadError, EvaluationError, PackedExportError,
                 PackedFormatError, LayerBitsError)


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
        keep_freed_memory()     # the scripts' allocator setting (dorefanet.memory); a library import leaves it
        if getattr(args, "summary", False):
            with results_only_on_stdout():
                print(model_summary(model, args))
            return 0
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


def model_summary(model, args):
    """``--summary``: the table (or with ``--json`` the JSON object) of :mod:`dorefanet.summary` for ``model``.

    Without ``--load`` the variables are those the model's graph creates; with a
    checkpoint or ``.npz`` they are the loaded ones (checked strictly against the
    model); a packed file must hold the model's own program, and its first and
    last layers' storage is the file's.
    """
    from dorefanet.checkpoints import check_weights, expected_variables, read_weights
    from dorefanet.packed.format import is_packed_file, read_packed
    from dorefanet.summary import format_table, summarise, to_json

    expected = expected_variables(model)
    program = model.packed_program()
    first_last = args.first_last_dtype
    source = None
    if args.load:
        source = os.path.expanduser(args.load)
        if source.endswith(".npz") and is_packed_file(source):
            header, _ = read_packed(source)
            if header["program"] != program:
                raise PackedFormatError("{}: its program is not this model's at these bit widths ({} at --dorefa "
                                        "{})".format(source, header["model"], header["bits"]))
            first_last = header.get("first_last_dtype", "float32")
            if args.first_last_dtype != "float32" and args.first_last_dtype != first_last:
                # the file's storage is a fact about it, not an option of the summary
                raise PackedFormatError("{}: stores its first and last layers as {}; --first-last-dtype {} does "
                                        "not apply".format(source, first_last, args.first_last_dtype))
        else:
            weights = read_weights(source)
            check_weights(expected, weights, source)
            expected = {name: tuple(np.shape(value)) for name, value in weights.items()}
    height, width, channels = _input_shape(model)
    summary = summarise(program, model.layer_plan, (height, width, channels), expected, first_last)
    fields = {"model": model.model_name, "dorefa": str(args.dorefa), "layer_bits": model.layer_plan.table(),
              "input": [height, width, channels], "first_last_dtype": first_last, "load": source}
    if args.json:
        return to_json(summary, **fields)
    extra = " with --layer-bits " + " ".join("{}={}".format(p, b) for p, b in args.layer_bits) \
        if args.layer_bits else ""
    title = "{} at --dorefa {}{}, input {}x{}x{}{}".format(
        model.model_name, args.dorefa, extra, height, width, channels, ", loaded from " + source if source else "")
    return format_table(summary, title)


def _input_shape(model):
    return tuple(model.inputs()[0].shape.as_list()[1:])


def model_totals(model):
    """``--summary``'s totals of ``model`` as built (float32 first and last layers): what ``--sweep`` tabulates."""
    from dorefanet.checkpoints import expected_variables
    from dorefanet.summary import summarise

    return summarise(model.packed_program(), model.layer_plan, _input_shape(model),
                     expected_variables(model))["totals"]


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


def train_model(model, args, logdir, config, dataflow, steps, callbacks, trainer, plan=None, chief=True,
                seed=None):
    """Train ``model`` into ``logdir`` (resumed or refused as :func:`dorefanet.training.plan_run` decides).

    ``args``: ``load``, ``seed``, ``epochs``, ``overwrite``.  On a cluster
    (:mod:`dorefanet.distributed`) the handshake's ``plan`` replaces this
    process's own, only the ``chief`` reads ``--load`` and writes checkpoints,
    and ``seed`` is the worker's graph seed.  The run holds its logdir
    (:mod:`dorefanet.logdir_lock`) until it ends.  Returns the plan the run followed.
    """
    from dorefanet.checkpoints import StrictInit, read_weights
    from dorefanet.tf_setup import tf
    from dorefanet.training import launch, plan_run

    if plan is None:
        plan = plan_run(logdir, config, steps, args.epochs, overwrite=args.overwrite)
    try:
        init = None
        if args.load and not plan.resumed and chief:
            init = StrictInit(read_weights(args.load), args.load)
        np.random.seed(args.seed)
        tf.set_random_seed(args.seed if seed is None else seed)
        launch(model, dataflow, plan, steps, args.epochs, callbacks, trainer, session_init=init, chief=chief)
    finally:
        plan.release()   # the logdir is free for the next run of this process (or another)
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
