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
#: Batches in one pass of a ``--fake`` training flow (it repeats a single random batch: it measures speed,
#: not learning; the trainer re-iterates it).
FAKE_TRAIN_BATCHES = 16
TRAINERS = ("replicated", "horovod")


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
                           "the CPUs ({}), shared among the Horovod processes of a machine".format(
                               default_parallelism()))
    t = groups["training"]
    t.add_argument("--epochs", type=int, default=model_class.max_epoch, help="epochs to train; the recipe by default")
    t.add_argument("--steps-per-epoch", type=int, default=None,
                   help="training steps per epoch; by default one pass over the training images "
                        "(ILSVRC12: {} // --batch)".format(ILSVRC12_TRAIN_IMAGES))
    t.add_argument("--batch", type=int, default=model_class.total_batch_size,
                   help="total batch size, split evenly over the towers (--gpu) or the Horovod processes; "
                        "also the batch of --eval")
    t.add_argument("--overwrite", action="store_true",
                   help="start over even if --logdir holds a finished run (it is moved aside, not deleted)")
    t.add_argument("--trainer", choices=TRAINERS, default="replicated",
                   help="replicated: synchronous data-parallel training in one process, one tower per --gpu "
                        "(tensorpack SyncMultiGPUTrainerReplicated); horovod: one process per GPU on one or "
                        "more machines, started with horovodrun (tensorpack HorovodTrainer)")
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
    if args.trainer == "horovod":
        if not training:
            parser.error("--trainer horovod is for training; --eval, --run and --export run in one process")
        if args.gpu is not None:
            parser.error("--gpu does not apply to --trainer horovod: horovodrun starts one process per GPU and "
                         "each process uses the GPU of its local rank")
    args.training = training
    return args


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
    if args.training and args.trainer == "replicated" and args.batch % args.towers:
        parser.error("--batch {} cannot be split evenly over {} towers; use a multiple of {}".format(
            args.batch, args.towers, args.towers))
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
    """The tensorpack trainer; for Horovod also ``(rank, size, local_size)`` (``(0, 1, 1)`` otherwise)."""
    from dorefanet.training import select_trainer

    if args.trainer != "horovod":
        return select_trainer(args.towers), (0, 1, 1)
    try:
        import horovod.tensorflow  # noqa: F401  (HorovodTrainer imports it; checked here for a clear message)
    except ImportError as err:
        raise TrainingSetupError(
            "--trainer horovod needs Horovod with TensorFlow support (pip install horovod[tensorflow]; start "
            "the processes with horovodrun), but it cannot be imported: {}".format(err)) from None
    from tensorpack import HorovodTrainer

    trainer = HorovodTrainer(average=True)
    return trainer, (trainer.hvd.rank(), trainer.hvd.size(), trainer.hvd.local_size())


def _follower_plan(logdir, rank, steps_per_epoch, overwrite):
    """Where a non-chief Horovod process starts.

    Only the chief (rank 0) records the run and writes checkpoints; the others
    start from the same checkpoint and epoch (their variables are overwritten
    by the chief's broadcast anyway, but the epoch drives the lr schedule) and
    log to their own directory, next to the chief's so that ``--overwrite``
    moving the chief's aside cannot pull it away from under them.
    """
    from dorefanet.checkpoints import latest_checkpoint
    from dorefanet.training import RunPlan, checkpoint_step

    own = "{}.rank{}".format(logdir.rstrip("/"), rank)
    checkpoint = None if overwrite or not os.path.isdir(logdir) else latest_checkpoint(logdir)
    if checkpoint is None:
        return RunPlan(own)
    step = checkpoint_step(checkpoint)
    return RunPlan(own, checkpoint, step, step // steps_per_epoch + 1)


def _train(model, args, script):
    from tensorpack import (ClassificationError, EstimatedTimeLeft, InferenceRunner, ScalarStats,
                            ScheduledHyperParamSetter)
    from imagenet_utils import fake_dataflow, fbresnet_augmentor, get_imagenet_dataflow

    model_class = type(model)
    trainer, (rank, processes, local_processes) = _make_trainer(args)
    replicas = processes if args.trainer == "horovod" else args.towers
    if args.batch % replicas:
        raise TrainingSetupError("--batch {} cannot be split evenly over {} Horovod processes; use a multiple "
                                 "of {}".format(args.batch, replicas, replicas))
    batch_per_replica = args.batch // replicas
    workers = max(1, default_parallelism() // local_processes) if args.workers is None else args.workers
    size = args.image_size
    if args.fake:
        train_flow = fake_dataflow(batch_per_replica, size, size=FAKE_TRAIN_BATCHES)
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
    plan = None if rank == 0 else _follower_plan(logdir, rank, steps, args.overwrite)
    callbacks = [
        # Keyed on epochs: a resumed run starts at the epoch after its checkpoint, and the
        # learning_rate variable itself is restored from the checkpoint.
        ScheduledHyperParamSetter("learning_rate", list(model_class.lr_schedule)),
        InferenceRunner(val_flow, [ScalarStats("xentropy-loss"),
                                   ClassificationError("wrong-top1", "val-error-top1"),
                                   ClassificationError("wrong-top5", "val-error-top5")]),
        EstimatedTimeLeft(),
    ]
    plan = train_model(model, args, logdir, config, train_flow, steps, callbacks, trainer, plan=plan)
    if rank == 0:
        data = ["--fake"] if args.fake else ["--data", os.path.abspath(args.data)]
        if size != IMAGE_SIZE:
            data += ["--image-size", str(size)]
        print(summary_line(plan.logdir, "val-error-top1", "top-1 validation error", script, data))
    return 0


def imagenet_main(model_class, argv=None, description=None, default_dorefa="1,2,6", epilog=None, script=None):
    """Everything an ImageNet script does besides defining its network; returns the exit status.

    * training (the default): ``--data DIR`` or ``--fake``, the model's recipe,
      ``--gpu`` towers with tensorpack's replicated trainer or ``--trainer
      horovod``, a checkpoint every epoch in ``--logdir``, resumed when the same
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
                      lambda: _run(model, args), args.training, errors=(ImageNetDataError, ClassNamesError))
