"""One driver for every script: ``main(script)`` gives a model every mode.

A script is its network, its recipe and its data (:mod:`dorefanet.model`); its
``main`` calls :func:`main` with itself.  The modes:

* training (the default): the recipe on ``--data`` (or the data source's built-in
  set), ``--gpu`` towers with tensorpack's replicated trainer, on several machines
  with ``--cluster`` / ``TF_CONFIG`` (docs/distributed.md), a checkpoint every epoch
  in ``--logdir``, resumed when the same command runs again, an evaluation every
  epoch, and a summary line at the end;
* ``--sweep W,A,G ...``: one training per configuration (and seed), the table and plot;
* ``--load PATH`` with ``--eval`` (the error over the whole test / validation set),
  ``--run IMAGE...`` (the top 5 classes of each image), ``--export OUT.npz``,
  ``--export-packed OUT.npz``, ``--export-onnx OUT.onnx``; ``--engine packed`` runs ``--eval`` / ``--run`` on a
  packed file without TensorFlow;
* ``--summary``: each layer's bits and costs.

The data source (``script.DATA``: :class:`dorefanet.svhn_data.SVHNDigits`,
:class:`dorefanet.imagenet.ImageNetData`) gives its flags and their checks,
the training, validation and evaluation flows, ``--run``'s preprocessing and class
names, how its errors are named and reported.  TensorFlow and tensorpack are
imported only by the modes that use them.
"""
import json
import os
import shlex
import sys

import numpy as np

from dorefanet.bits import LayerBitsError, parse_bits
from dorefanet.cli import (check_run_table, dorefa_bits, packed_only, parse_args, resolve_devices,
                           run_reporting_errors)
from dorefanet.cluster import DistributedError
from dorefanet.errors import ModelLoadError, TrainingSetupError
from dorefanet.image_io import ImageReadError
from dorefanet.inference import EvaluationError, evaluate_topk, load_predictor, results_only_on_stdout, run_images
from dorefanet.memory import keep_freed_memory
from dorefanet.model import Model, lr_steps, run_name
from dorefanet.packed.export import PackedExportError
from dorefanet.packed.format import PackedFormatError
from dorefanet.packed.onnx_export import OnnxExportError

__all__ = ["COMMON_ERRORS", "main", "make_model", "model_summary", "model_totals", "layer_bits_record", "train_model",
           "summary_line"]

#: Errors whose message is a complete one-line explanation, in every script.
COMMON_ERRORS = (ModelLoadError, TrainingSetupError, ImageReadError, EvaluationError, PackedExportError,
                 PackedFormatError, OnnxExportError, LayerBitsError, DistributedError)


def make_model(script, bits=None, data_format="channels_last", image_size=None, layer_bits=(), steps_per_epoch=None,
               tensorflow=True):
    """The model of ``script`` (a module with ``network``, ``RECIPE`` and ``DATA``) at ``bits``.

    ``bits`` defaults to the recipe's ``default_dorefa``.  With ``tensorflow`` it is the
    tensorpack ``ModelDesc`` (:class:`dorefanet.tf_model.TrainableModel`); without, the
    same model that imports no TensorFlow (:class:`dorefanet.model.Model`).
    """
    cls = Model
    if tensorflow:
        from dorefanet.tf_model import TrainableModel as cls
    bits = parse_bits(script.RECIPE["default_dorefa"]) if bits is None else bits
    return cls(script.network, script.RECIPE, script.DATA, bits, data_format, image_size, layer_bits, steps_per_epoch)


def main(script, argv=None):
    """Run the mode the flags of ``script`` choose; return the exit status.

    0: success; 1: some ``--run`` images could not be read; 2: bad flags or input,
    reported as one ``error: ...`` line; 130: interrupted.
    """
    parser, args = parse_args(script, argv)
    resolve_devices(parser, script.RECIPE, args)
    errors = COMMON_ERRORS + tuple(script.DATA.errors)
    if args.sweep:
        return run_reporting_errors(lambda: sweep(script, args), errors, training=True)
    try:
        model = make_model(script, args.dorefa, args.data_format, getattr(args, "image_size", None), args.layer_bits,
                           tensorflow=not packed_only(args))
    except LayerBitsError as err:
        parser.error(str(err))
    name = "./" + os.path.basename(script.__file__)
    return run_reporting_errors(lambda: _act(model, args, name), errors, args.training)


def _act(model, args, name):
    check_run_table(args, model)
    keep_freed_memory()     # the scripts' allocator setting (dorefanet.memory); a library import leaves it
    if args.summary:
        with results_only_on_stdout():
            print(model_summary(model, args))
        return 0
    if packed_only(args):
        with results_only_on_stdout():
            if args.export_onnx:
                return export_onnx(model, args)
            return evaluate(model, args) if args.eval else run(model, args)
    from dorefanet.tf_setup import tf
    from dorefanet.checkpoints import export_weights  # also sets up tensorpack's logger before the redirect

    if args.training:
        with tf.Graph().as_default():
            return train(model, args, name)
    with results_only_on_stdout():
        if args.export:
            export_weights(model, args.load, args.export)
            return 0
        if args.export_packed:
            from dorefanet.packed.export import export_packed

            export_packed(model, args.load, args.export_packed, args.first_last_dtype)
            return 0
        if args.export_onnx:
            return export_onnx(model, args)
        with tf.Graph().as_default():
            return evaluate(model, args) if args.eval else run(model, args)


def export_onnx(model, args):
    """``--export-onnx``: the loaded model as an ONNX graph (docs/onnx.md).

    A packed file converts as it is (it must hold the script's model; no
    TensorFlow); a logdir, checkpoint or ``.npz`` is packed in memory first
    (its weights checked strictly, as ``--export-packed`` does).
    """
    from dorefanet.inference import check_packed_header
    from dorefanet.packed.format import is_packed_file, read_packed
    from dorefanet.packed.onnx_export import DEFAULT_OPSET, import_onnx, export_onnx as write_onnx

    import_onnx()   # a missing package is reported before the weights are read
    source = os.path.expanduser(args.load)
    if is_packed_file(source):
        header, arrays = read_packed(source)
        check_packed_header(source, header, model)
    else:
        from dorefanet.packed.export import packed_model

        header, arrays, _ = packed_model(model, args.load)
    size, counts = write_onnx(header, args.export_onnx, DEFAULT_OPSET, arrays=arrays)
    print("wrote {} ({} at --dorefa {}, ONNX opset {}): {:.2f} MB, {} quantized and {} float weight tensors, "
          "{} quantized activations".format(args.export_onnx, header["model"], header["bits"], DEFAULT_OPSET,
                                            size / 1e6, counts["quantized weights"], counts["float weights"],
                                            counts["quantized activations"]))
    return 0


def evaluate(model, args):
    """``--eval``: the error over the whole test / validation set, as the data source reports it."""
    # The data is checked before the (slow) weights loading, so that a bad --data fails at once.
    dataflow = model.data.evaluation_data(args, args.batch)
    predict = load_predictor(args, model)
    model.data.report(evaluate_topk(predict, dataflow))
    return 0


def run(model, args):
    """``--run``: the top 5 classes of each image (``--json``: one object per line)."""
    describe = model.data.class_describer()
    predict = load_predictor(args, model)
    failed = run_images(args.run, model.data.preprocess(args), predict, describe, k=5, as_json=args.json)
    return 1 if failed else 0


def _make_trainer(args):
    """The tensorpack trainer and, on a cluster, this process's :class:`distributed.Worker` (else None)."""
    from dorefanet import distributed
    from dorefanet.training import select_trainer

    if args.cluster is None:
        return select_trainer(args.towers), None
    worker = distributed.Worker(args.cluster, args.worker_timeout)
    return distributed.CollectiveTrainer(args.towers, worker), worker


def _handshake(worker, args, config, plan_chief):
    """Agree with the other workers before building the graph; returns this worker's :class:`RunPlan`.

    The chief plans the run (resume or fresh) and tells the others its step;
    every worker compares the configuration that must be equal everywhere and
    stops with the same one-line error when it is not.
    """
    from dorefanet import distributed

    key = config["resume_key"]
    record = dict(key, towers=args.towers, data=config["data_kind"], epochs=args.epochs,
                  cluster=",".join(args.cluster.workers), step=0, error=None)
    plan = None
    if args.cluster.is_chief:
        try:
            plan = plan_chief()
            record["step"] = plan.step
        except TrainingSetupError as err:
            record["error"] = str(err)
    try:
        records = worker.handshake(record)
        if records[0]["error"]:
            raise TrainingSetupError(records[0]["error"] if args.cluster.is_chief else
                                     "the chief (worker 0) cannot start: {}".format(records[0]["error"]))
        distributed.check_agreement(records, ("cluster", "model", "dorefa", "layer_table", "batch", "image_size",
                                              "steps_per_epoch", "epochs", "towers", "data"))
    except BaseException:
        if plan is not None:
            plan.release()   # the chief's logdir is free again for the next start
        raise
    if plan is None:
        plan = distributed.follower_plan(config["logdir"], args.cluster.index, records[0]["step"],
                                         key["steps_per_epoch"])
    return plan


def train(model, args, name):
    """Train ``model`` by its recipe on its data; ``name`` is how the summary line calls the script."""
    from dorefanet.tf_setup import tf
    from tensorpack import ClassificationError, EstimatedTimeLeft, InferenceRunner, ScalarStats
    from tensorpack.dataflow import ProxyDataFlow
    from dorefanet import distributed
    from dorefanet.training import plan_run

    data, recipe, cluster = model.data, model.recipe, args.cluster
    trainer, worker = _make_trainer(args)
    replicas = args.towers * (cluster.size if cluster else 1)
    train_flow, val_flow, fields = data.training_data(args, args.batch // replicas)
    if cluster is not None and hasattr(train_flow, "shard"):
        train_flow.shard(cluster.index, cluster.size)   # the cluster draws the one stream of the seed
    steps = args.steps_per_epoch or max(fields["train_images"] // args.batch, 1)
    model.steps_per_epoch = steps     # what an in-graph schedule counts epochs in

    bits = str(args.dorefa)
    logdir = args.logdir or os.path.join("train_log", "{}-dorefa-{}".format(run_name(recipe), bits))
    key = dict({"model": run_name(recipe), "dorefa": bits, "batch": args.batch, "steps_per_epoch": steps},
               **data.resume_fields(args))
    config = dict({"resume_key": key, "model": model.model_name, "dorefa": bits, "data": data.describe(args)},
                  **fields)
    config.update(seed=args.seed, deterministic_ops=args.deterministic_ops, epochs=args.epochs,
                  steps_per_epoch=steps, batch=args.batch, trainer=args.trainer,
                  replicas=replicas, data_format=args.data_format,
                  recipe={"base_lr": recipe["lr"], "lr_schedule": _recorded_schedule(recipe, args.epochs),
                          "weight_decay": recipe.get("weight_decay", 0.0),
                          "weight_decay_pattern": recipe.get("weight_decay_pattern")})
    config.update(layer_bits_record(args, model, key))
    plan = None
    if cluster is not None:
        plan = _handshake(worker, args, dict(config, logdir=logdir, data_kind=data.kind(args)),
                          lambda: plan_run(logdir, config, steps, args.epochs, overwrite=args.overwrite))
    chief = cluster is None or cluster.is_chief
    callbacks = []
    if chief:   # validation, checkpoints and stats.json are the chief's
        stats = [ScalarStats(name) for name in data.validation_scalars]
        stats += [ClassificationError(tensor, stat) for tensor, stat in data.validation_errors]
        # InferenceRunner takes only tensorpack DataFlows; the proxy lends that type to the data source's own
        # evaluation batches (the ones --eval reads)
        callbacks += [InferenceRunner(ProxyDataFlow(val_flow), stats), EstimatedTimeLeft()]
    # Other workers draw other fg noise (as the towers of one process do); their initial values do not
    # matter: the chief broadcasts its variables at the start.
    seed = args.seed + (1000 * cluster.index if cluster else 0)
    try:
        plan = train_model(model, args, logdir, config, train_flow, steps, callbacks, trainer, plan=plan,
                           chief=chief, seed=seed)
    except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError, tf.errors.CancelledError,
            tf.errors.AbortedError, tf.errors.InternalError) as err:
        if cluster is None:
            raise
        raise distributed.translate_runtime_error(err, cluster, args.worker_timeout) from None
    if chief:
        print(summary_line(plan.logdir, data.error_key, data.error_name, name, data.data_flags(args)))
    return 0


def _recorded_schedule(recipe, epochs):
    """What config.json records of the schedule: its ``(epoch, lr)`` steps, or the recipe's in-graph decay."""
    return lr_steps(recipe, epochs) or recipe.get("lr_schedule", ())


def sweep(script, args):
    """``--sweep``: every configuration (and seed) trained by the script in its own run, then the table and plot."""
    from dorefanet.sweep import Sweep
    from dorefanet.training import quiet_tensorpack

    quiet_tensorpack()   # the sweep's own output is its progress lines and the table; the runs log to logs/
    recipe, data = script.RECIPE, script.DATA
    data_flags = data.data_flags(args, sweep=True)
    flags = data_flags + ["--epochs", str(args.epochs), "--batch", str(args.batch)]
    flags += ["--workers", str(args.workers)] if args.workers is not None else []
    flags += ["--data-format", args.data_format]
    flags += ["--steps-per-epoch", str(args.steps_per_epoch)] if args.steps_per_epoch else []
    flags += ["--gpu", args.gpu] if args.gpu else []
    flags += ["--deterministic-ops"] if args.deterministic_ops else []
    image_size = getattr(args, "image_size", None)

    def figures(bits):
        return model_totals(make_model(script, dorefa_bits(bits), args.data_format, image_size))

    title = "{} on {}, {} epoch{}{}".format(
        recipe["title"], data.title(args), args.epochs, "" if args.epochs == 1 else "s",
        " of {} steps".format(args.steps_per_epoch) if args.steps_per_epoch else "")
    directory = os.path.abspath(args.logdir or os.path.join("train_log", run_name(recipe) + "-sweep"))
    runs = Sweep(directory, args.sweep, range(args.seed, args.seed + args.seeds), os.path.abspath(script.__file__),
                 flags, data_flags, args.epochs, data.error_key, data.eval_pattern, figures, title,
                 ["./" + os.path.basename(script.__file__)] + list(args.argv))
    records = runs.run()
    print(runs.write(records))
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        print("error: {} of {} runs failed ({}); the others are in the table, and running the same command again "
              "retries only those".format(len(failed), len(records), ", ".join(
                  "{} seed {}".format(r["bits"], r["seed"]) for r in failed)), file=sys.stderr)
        return 1
    return 0


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
    height, width, channels = model.input_shape
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


def model_totals(model):
    """``--summary``'s totals of ``model`` as built (float32 first and last layers): what ``--sweep`` tabulates."""
    from dorefanet.checkpoints import expected_variables
    from dorefanet.summary import summarise

    return summarise(model.packed_program(), model.layer_plan, model.input_shape,
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
    from dorefanet.tf_model import schedule_callbacks
    from dorefanet.training import launch, plan_run
    from tensorpack.dataflow import DataFlow, ProxyDataFlow

    if plan is None:
        plan = plan_run(logdir, config, steps, args.epochs, overwrite=args.overwrite)
    try:
        init = None
        if args.load and not plan.resumed and chief:
            init = StrictInit(read_weights(args.load), args.load)
        callbacks = schedule_callbacks(model, _run_schedule(model, args, plan)) + list(callbacks)
        if plan.resumed and hasattr(dataflow, "start_at"):
            # a resumed run continues the seed's stream of batches where the killed run stopped
            dataflow.start_at(plan.step * args.towers)
        if not isinstance(dataflow, DataFlow):   # tensorpack's input takes only its own DataFlows
            dataflow = ProxyDataFlow(dataflow)
        if args.deterministic_ops:
            _enable_op_determinism()
        np.random.seed(args.seed)
        tf.set_random_seed(args.seed if seed is None else seed)
        launch(model, dataflow, plan, steps, args.epochs, callbacks, trainer, session_init=init, chief=chief)
    finally:
        plan.release()   # the logdir is free for the next run of this process (or another)
    return plan


def _enable_op_determinism():
    """--deterministic-ops: a process-wide TensorFlow setting, which the script (not the library) may make."""
    import tensorflow

    tensorflow.config.experimental.enable_op_determinism()


def _run_schedule(model, args, plan):
    """The run's ``[(epoch, lr)]`` steps: a resumed run keeps those it started with (in fractions of its epochs)."""
    from dorefanet.atomic_file import read_json

    if plan.resumed:
        recorded = (read_json(os.path.join(plan.logdir, "config.json")) or {}).get("recipe", {}).get("lr_schedule")
        if isinstance(recorded, list):
            return [tuple(step) for step in recorded]
    return lr_steps(model.recipe, args.epochs)


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
