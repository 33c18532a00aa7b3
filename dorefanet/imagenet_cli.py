"""The command line of ``alexnet-dorefa.py`` and ``resnet-dorefa.py``: train, --eval, --run, --export.

Everything an ImageNet script does besides defining its network: the ImageNet
flags (on top of :func:`dorefanet.cli.make_parser`), the training run of a
model's recipe, top-1 / top-5 evaluation and single-image classification.
The ImageNet pieces themselves (data, preprocessing, the model base class,
class names) are ``imagenet_utils``; the modes every script shares are
:mod:`dorefanet.driver`.
"""
import argparse
import functools
import os
import sys

from dorefanet import cli
from dorefanet.cluster import DEFAULT_TIMEOUT, DistributedError, resolve_cluster
from dorefanet.driver import layer_bits_record, packed_only, run_script, summary_line, train_model
from dorefanet.errors import TrainingSetupError
from dorefanet.inference import evaluate_topk, load_predictor, run_images
from dorefanet.layer_bits import LayerBitsError
from dorefanet.imagenet_data import (IMAGE_SIZE, RESIZE_SHORTER, ClassNamesError, ImageNetDataError,
                                     ValidationBatches, default_parallelism, list_imagenet_files, load_class_names,
                                     preprocess_image)

# TensorFlow and tensorpack (imagenet_utils, dorefanet.training, dorefanet.checkpoints) are imported
# only by the modes that use them: the packed engine's --eval / --run run without.

__all__ = ["ILSVRC12_TRAIN_IMAGES", "make_imagenet_parser", "parse_imagenet_args", "imagenet_main"]

#: Images in the ILSVRC12 training set; an epoch of ``--fake`` data pretends to be one pass over them.
ILSVRC12_TRAIN_IMAGES = 1281167
#: Batches of random images validated per epoch by ``--fake`` training and evaluated by ``--eval --fake``.
FAKE_EVAL_BATCHES = 2
#: replicated: the towers of one process; collective: one process per machine (--cluster or TF_CONFIG).
TRAINERS = ("replicated", "collective")


def make_imagenet_parser(model_class, description, default_dorefa, epilog=None):
    """The command line of an ImageNet script: :func:`cli.make_parser` plus the ImageNet flags.

    Defaults come from ``model_class`` (its recipe: ``max_epoch``,
    ``total_batch_size``; its CPU layout).
    """
    parser, groups = cli.make_parser(description, default_dorefa, epilog=epilog)
    data = groups["data"]
    data.add_argument("--fake", action="store_true",
                      help="random ImageNet-shaped images instead of --data, to try or benchmark training "
                           "(or --eval) without the dataset")
    data.add_argument("--workers", type=int, default=None,
                      help="parallel data loading: processes that decode and augment training images and "
                           "threads that decode validation images; 0 loads in the main process. By default half "
                           "the CPUs ({})".format(
                               default_parallelism()))
    t = groups["training"]
    t.add_argument("--epochs", type=int, default=model_class.max_epoch, help="epochs to train; the recipe by default")
    t.add_argument("--steps-per-epoch", type=int, default=None,
                   help="training steps per epoch; by default one pass over the training images "
                        "(ILSVRC12: {} // --batch)".format(ILSVRC12_TRAIN_IMAGES))
    t.add_argument("--batch", type=int, default=model_class.total_batch_size,
                   help="total batch size, split evenly over the towers (--gpu) of every worker (--cluster); "
                        "also the batch of --eval")
    t.add_argument("--overwrite", action="store_true",
                   help="start over even if --logdir holds a finished run (it is moved aside, not deleted)")
    t.add_argument("--trainer", choices=TRAINERS, default=None,
                   help="replicated: synchronous data-parallel training in one process, one tower per --gpu "
                        "(tensorpack SyncMultiGPUTrainerReplicated); collective: the same on several machines, "
                        "one process per machine, gradients all-reduced between them over gRPC (docs/distributed.md). "
                        "Default: collective with --cluster or TF_CONFIG, else replicated")
    # -- several machines (dorefanet/distributed.py, docs/distributed.md) --
    t.add_argument("--cluster", metavar="HOST:PORT,...",
                   help="train on several machines: every worker's address, the same list on each (or TF_CONFIG)")
    t.add_argument("--task", type=int, metavar="I", help="with --cluster: this machine's index in it (0 = the chief)")
    t.add_argument("--worker-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="with --cluster: how long a worker waits for the others at start-up and in each all-reduce "
                        "before it stops with an error; must exceed the chief's validation and checkpoint time")
    t.add_argument("--data-format", choices=("channels_first", "channels_last"), default=None,
                   help="layout of the feature maps inside the network; by default channels_first when a GPU "
                        "is visible, {} on the CPU (measured faster there). Checkpoints work in either "
                        "layout".format(model_class.cpu_data_format))
    # A developer flag for fast tests: the published weights need 224 (AlexNet's fc0 depends on it).
    t.add_argument("--image-size", type=int, default=IMAGE_SIZE, help=argparse.SUPPRESS)
    groups["model"].add_argument("--export", metavar="OUT.npz",
                                 help="write the loaded model's variables (no optimizer state) to an .npz")
    return parser


def parse_imagenet_args(parser, model_class, argv=None):
    """Parse and check the flags that need no TensorFlow device query; conflicts end in ``parser.error``."""
    args = cli.check_modes(parser, parser.parse_args(argv))
    training = not (args.eval or args.run or args.export or args.export_packed or args.summary)
    if args.fake and args.data:
        parser.error("--fake and --data cannot be combined; choose one data source")
    if (training or args.eval) and not (args.fake or args.data):
        parser.error("give --data ILSVRC_DIR (with train/<wnid>/ and val/) or --fake (random images) to {}".format(
            "evaluate" if args.eval else "train"))
    if args.run and (args.fake or args.data):
        parser.error("--run classifies the given image files; --data and --fake do not apply")
    for flag in ("epochs", "batch", "steps_per_epoch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error("--{} must be a positive integer, got {}".format(flag.replace("_", "-"), value))
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be >= 0, got {}".format(args.workers))
    if args.image_size < model_class.min_image_size:
        parser.error("--image-size must be at least {}, got {}".format(model_class.min_image_size, args.image_size))
    _parse_cluster(parser, args, training)
    args.training = training
    return args


def _parse_cluster(parser, args, training):
    """``args.cluster``: the :class:`distributed.Cluster` of --cluster/--task or TF_CONFIG, or None."""
    try:
        cluster = resolve_cluster(args)
    except ValueError as err:
        parser.error(str(err))
    if cluster is not None and cluster.size == 1:
        cluster = None  # a cluster of one machine is the ordinary training
    if cluster is not None and not training:
        parser.error("--cluster/TF_CONFIG is for training; --eval, --run and --export run in one process")
    if args.trainer == "collective" and cluster is None and training:
        parser.error("--trainer collective needs the workers: --cluster HOST:PORT,... --task I, or TF_CONFIG")
    if args.trainer == "replicated" and cluster is not None:
        parser.error("--trainer replicated trains in one process; --cluster/TF_CONFIG needs --trainer collective")
    if not args.worker_timeout > 0:
        parser.error("--worker-timeout must be a positive number of seconds, got {:g}".format(args.worker_timeout))
    args.cluster = cluster
    args.trainer = "collective" if cluster is not None else "replicated"


def _resolve_devices(parser, model_class, args, gpus=None):
    """Towers and the default layout; called once ``CUDA_VISIBLE_DEVICES`` reflects ``--gpu``.

    ``gpus``: the number of GPUs if known (default: ask TensorFlow).
    """
    if gpus is None:
        from dorefanet.training import available_gpus

        gpus = available_gpus()
    # On a machine without GPUs, --gpu 0,1 still builds two towers (tensorpack places them on the
    # CPU through soft placement), which is how multi-tower training is tested here.
    args.towers = len(args.gpu.split(",")) if args.gpu else max(gpus, 1)
    replicas = args.towers * (args.cluster.size if args.cluster else 1)
    if args.training and args.batch % replicas:
        where = " ({} workers x {})".format(args.cluster.size, args.towers) if args.cluster else ""
        parser.error("--batch {} cannot be split evenly over {} towers{}; use a multiple of {}".format(
            args.batch, replicas, where, replicas))
    if args.data_format is None:
        args.data_format = "channels_first" if gpus else model_class.cpu_data_format


def _single_image_sizes(image_size):
    """(shorter side, crop) of the evaluation preprocessing for a network input of ``image_size``."""
    return image_size * RESIZE_SHORTER // IMAGE_SIZE, image_size


def _preprocess_for_run(image, image_size):
    resize, crop = _single_image_sizes(image_size)
    return preprocess_image(image, resize=resize, crop=crop)


def _describe_class(class_names, label):
    wnid, words = class_names[label]
    return {"wnid": wnid, "name": words}


def _validation_flow(args, batch_size, parallel):
    """The validation batches of ``--data`` (whole set, partial last batch) or a few ``--fake`` batches."""
    if packed_only(args):     # the same batches, without tensorpack
        return ValidationBatches(args.data, batch_size, args.image_size, parallel=parallel)
    from imagenet_utils import fake_dataflow, fbresnet_augmentor, get_imagenet_dataflow

    if args.fake:
        return fake_dataflow(batch_size, args.image_size, size=FAKE_EVAL_BATCHES)
    return get_imagenet_dataflow(args.data, "val", batch_size, augmentors=fbresnet_augmentor(False, args.image_size),
                                 parallel=parallel)


def _evaluate(model, args):
    workers = default_parallelism() if args.workers is None else args.workers
    # The data directory is checked before the (slow) weights loading, so that a typo fails at once.
    dataflow = _validation_flow(args, args.batch, workers)
    predict = load_predictor(args, model)
    result = evaluate_topk(predict, dataflow)
    print("evaluated {} images".format(result.count), file=sys.stderr)
    print("top-1 error: {:.4f}".format(result.top1))
    print("top-5 error: {:.4f}".format(result.top5))
    return 0


def _run(model, args):
    class_names = load_class_names()
    predict = load_predictor(args, model)
    failed = run_images(args.run, functools.partial(_preprocess_for_run, image_size=args.image_size), predict,
                        functools.partial(_describe_class, class_names), k=5, as_json=args.json)
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
    record = dict(key, towers=args.towers, data="fake" if args.fake else "imagenet", epochs=args.epochs,
                  cluster=",".join(args.cluster.workers), step=0, error=None)
    plan = None
    if args.cluster.is_chief:
        try:
            plan = plan_chief()
            record["step"] = plan.step
        except TrainingSetupError as err:
            record["error"] = str(err)
    records = worker.handshake(record)
    if records[0]["error"]:
        raise TrainingSetupError(records[0]["error"] if args.cluster.is_chief else
                                 "the chief (worker 0) cannot start: {}".format(records[0]["error"]))
    distributed.check_agreement(records, ("cluster", "model", "dorefa", "layer_table", "batch", "image_size",
                                          "steps_per_epoch", "epochs", "towers", "data"))
    if plan is None:
        plan = distributed.follower_plan(config["logdir"], args.cluster.index, records[0]["step"],
                                         key["steps_per_epoch"])
    return plan


def _train(model, args, script):
    from dorefanet.tf_setup import tf
    from tensorpack import (ClassificationError, EstimatedTimeLeft, InferenceRunner, ScalarStats,
                            ScheduledHyperParamSetter)
    from dorefanet import distributed
    from dorefanet.training import plan_run
    from imagenet_utils import fbresnet_augmentor, get_imagenet_dataflow

    model_class = type(model)
    trainer, worker = _make_trainer(args)
    cluster = args.cluster
    replicas = args.towers * (cluster.size if cluster else 1)
    batch_per_replica = args.batch // replicas
    workers = default_parallelism() if args.workers is None else args.workers
    size = args.image_size
    if args.fake:
        # seeded, the same batch on every tower of every worker: the multi-machine test compares a cluster
        # with one process (distributed.fake_train_flow says why not one batch per tower)
        train_flow = distributed.fake_train_flow(batch_per_replica, size, args.seed)
        train_images = ILSVRC12_TRAIN_IMAGES
    else:
        files = list_imagenet_files(args.data, "train")
        train_flow = get_imagenet_dataflow(args.data, "train", batch_per_replica,
                                           augmentors=fbresnet_augmentor(True, size), parallel=workers, files=files)
        train_images = len(files)
    val_flow = _validation_flow(args, batch_per_replica, workers)
    steps = args.steps_per_epoch or max(train_images // args.batch, 1)

    logdir = args.logdir or os.path.join("train_log", "{}-dorefa-{}".format(model_class.model_name, args.dorefa))
    config = {"resume_key": {"model": model_class.model_name, "dorefa": str(args.dorefa), "batch": args.batch,
                             "steps_per_epoch": steps, "image_size": size},
              "model": model_class.model_name, "dorefa": str(args.dorefa),
              "data": "fake" if args.fake else os.path.abspath(args.data), "train_images": train_images,
              "seed": args.seed, "epochs": args.epochs, "steps_per_epoch": steps, "batch": args.batch,
              "trainer": args.trainer, "replicas": replicas, "data_format": args.data_format,
              "image_size": size, "workers": workers,
              "recipe": {"base_lr": model_class.base_lr, "lr_schedule": list(model_class.lr_schedule),
                         "weight_decay": model_class.weight_decay,
                         "weight_decay_pattern": model_class.weight_decay_pattern}}
    config.update(layer_bits_record(args, model, config["resume_key"]))
    plan = None
    if cluster is not None:
        plan = _handshake(worker, args, dict(config, logdir=logdir),
                          lambda: plan_run(logdir, config, steps, args.epochs, overwrite=args.overwrite))
    chief = cluster is None or cluster.is_chief
    # Keyed on epochs: a resumed run starts at the epoch after its checkpoint, and the
    # learning_rate variable itself is restored from the checkpoint.
    callbacks = [ScheduledHyperParamSetter("learning_rate", list(model_class.lr_schedule))]
    if chief:   # validation, checkpoints and stats.json are the chief's
        callbacks += [InferenceRunner(val_flow, [ScalarStats("xentropy-loss"),
                                                 ClassificationError("wrong-top1", "val-error-top1"),
                                                 ClassificationError("wrong-top5", "val-error-top5")]),
                      EstimatedTimeLeft()]
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
        data = ["--fake"] if args.fake else ["--data", os.path.abspath(args.data)]
        if size != IMAGE_SIZE:
            data += ["--image-size", str(size)]
        print(summary_line(plan.logdir, "val-error-top1", "top-1 validation error", script, data))
    return 0


def imagenet_main(model_class, argv=None, description=None, default_dorefa="1,2,6", epilog=None, script=None):
    """Everything an ImageNet script does besides defining its network; returns the exit status.

    * training (the default): ``--data DIR`` or ``--fake``, the model's recipe,
      ``--gpu`` towers with tensorpack's replicated trainer, on several machines
      with ``--cluster`` / ``TF_CONFIG`` (docs/distributed.md), a checkpoint every epoch in ``--logdir``, resumed when the same
      command runs again, validation top-1/top-5 error every epoch, and a
      summary line at the end;
    * ``--load PATH --eval``: top-1 / top-5 error over the whole validation set;
    * ``--load PATH --run IMAGE...``: the top 5 classes of each image (``--json``: one object per line);
    * ``--load PATH --export OUT.npz``.

    ``script`` is how the summary line names the script (``./alexnet-dorefa.py``).
    0: success; 1: some ``--run`` images could not be read; 2: bad flags or
    input, reported as one ``error: ...`` line.
    """
    parser = make_imagenet_parser(model_class, description or model_class.__doc__, default_dorefa, epilog)
    args = parse_imagenet_args(parser, model_class, argv)
    if packed_only(args):
        # no TensorFlow: the network description is enough, and the layout does not matter
        _resolve_devices(parser, model_class, args, gpus=0)
    else:
        model_class = getattr(model_class, "with_tensorflow", lambda: model_class)()
        _resolve_devices(parser, model_class, args)
    try:
        model = model_class(args.dorefa, args.data_format, args.image_size, args.layer_bits)
    except LayerBitsError as err:
        parser.error(str(err))

    script = script or "./" + os.path.basename(sys.argv[0])
    return run_script(args, model, lambda: _train(model, args, script), lambda: _evaluate(model, args),
                      lambda: _run(model, args), args.training, errors=(ImageNetDataError, ClassNamesError,
                                                                          DistributedError))
