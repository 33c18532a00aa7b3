#!/usr/bin/env python
"""DoReFa-Net on SVHN digits: train, evaluate, run and export at any (W,A,G) bit widths.

    ./svhn-digit-dorefa.py --dorefa 1,2,4 --synthetic --epochs 3     # built-in digits, no download
    ./svhn-digit-dorefa.py --dorefa 1,2,4 --data SVHN_DIR             # the published recipe
    ./svhn-digit-dorefa.py --dorefa 1,2,4 --load LOGDIR --eval --data SVHN_DIR
    ./svhn-digit-dorefa.py --dorefa 1,2,4 --load MODEL --run a.png b.png [--json]
    ./svhn-digit-dorefa.py --dorefa 1,2,4 --load LOGDIR --export model.npz
    ./svhn-digit-dorefa.py --dorefa 1,2,4 --summary [--json]          # per-layer bits, MACs, BOPs, sizes
    ./svhn-digit-dorefa.py --sweep 32,32,32 1,2,4 1,1,4 --synthetic --epochs 3 [--seeds 3]   # table + plot

Network and recipe: docs/networks.md (SVHN digit net); published errors
(1,1,4) 3.1-3.2%, (1,2,4) 3.0-3.1%, (32,32,32) about 2.3%.
"""
import os
import sys

from dorefanet.tf_setup import tf  # noqa: I100  (prepares TensorFlow; must come first)

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from dorefanet.cli import check_modes, dorefa_bits, make_parser, run_reporting_errors  # noqa: E402
from dorefanet.driver import COMMON_ERRORS, layer_bits_record, run_script, summary_line, train_model  # noqa: E402
from dorefanet.layer_bits import LayerBitsError  # noqa: E402
from dorefanet.inference import evaluate_topk, load_predictor, run_images  # noqa: E402
from dorefanet.network import DescribedNetwork  # noqa: E402
from dorefanet.svhn_data import SVHNDataError, load_svhn, synthetic_digits  # noqa: E402
from dorefanet.training import available_gpus, select_trainer  # noqa: E402

from tensorpack import ClassificationError, InferenceRunner, ModelDesc, ScalarStats  # noqa: E402
from tensorpack.tfutils.summary import add_moving_summary  # noqa: E402

IMAGE_SIZE = 40
RECIPE_EPOCHS = 200
RECIPE_STEPS_PER_EPOCH = 4721   # one pass over train + extra at batch 128
LR_HALVING_EPOCHS = 100
LOGDIR_PATTERN = "train_log/svhn-dorefa-W,A,G"
SWEEP_LOGDIR = "train_log/svhn-sweep"


class SVHNModel(DescribedNetwork, ModelDesc):
    """The SVHN digit net of docs/networks.md for one (W, A, G)."""

    model_name = "svhn-digit"
    image_mean = (0.0, 0.0, 0.0)
    image_std = 256.0     # the input is BGR 0..255 divided by 256
    activation_at_32 = "relu"

    def __init__(self, bits, steps_per_epoch=RECIPE_STEPS_PER_EPOCH, data_format="channels_last", layer_bits=()):
        self.bits = bits
        self.steps_per_epoch = int(steps_per_epoch)
        self.data_format = data_format
        self.plan_layers(layer_bits)

    def inputs(self):
        return [tf.TensorSpec([None, IMAGE_SIZE, IMAGE_SIZE, 3], tf.float32, "input"),
                tf.TensorSpec([None], tf.int32, "label")]

    def network(self, net, x):
        """The layers, described once: built by TensorFlow (``net`` a GraphBuilder) and as the packed program."""
        # conv0 and fc1 stay in float (quantized=False), as published
        x = net.conv("conv0", x, 48, 5, padding="VALID", quantized=False, bias=True)
        x = net.activate(net.maxpool("pool0", x, 2, padding="SAME"))
        x = net.activate(net.bn("bn1", net.conv("conv1", x, 64, 3)))
        x = net.bn("bn2", net.conv("conv2", x, 64, 3))
        x = net.activate(net.maxpool("pool1", x, 2, padding="SAME"))
        x = net.activate(net.bn("bn3", net.conv("conv3", x, 128, 3, padding="VALID")))
        x = net.activate(net.bn("bn4", net.conv("conv4", x, 128, 3)))
        x = net.activate(net.bn("bn5", net.conv("conv5", x, 128, 3, padding="VALID")))
        x = net.dropout("drop", x, rate=0.5)
        x = net.nonlin(net.bn("bn6", net.conv("conv6", x, 512, 5, padding="VALID")))
        return net.fc("fc1", x, 10, quantized=False, bias=True)

    def build_graph(self, image, label):
        x = image / self.image_std
        if self.data_format == "channels_first":
            x = tf.transpose(x, [0, 3, 1, 2])
        logits = self.network_logits(x)
        tf.nn.softmax(logits, name="output")

        wrong = tf.cast(tf.logical_not(tf.nn.in_top_k(logits, label, 1)), tf.float32, name="wrong-top1")
        cost = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(logits=logits, labels=label),
                              name="cross_entropy_loss")
        fc_weights = [v for v in tf.trainable_variables() if v.op.name.startswith("fc") and
                      v.op.name.endswith("/W")]
        wd_cost = tf.multiply(1e-7, tf.add_n([tf.nn.l2_loss(v) for v in fc_weights]), name="wd_cost")
        total = tf.add_n([cost, wd_cost], name="cost")
        add_moving_summary(cost, wd_cost, total, tf.reduce_mean(wrong, name="train_error"))
        return total

    def optimizer(self):
        lr = tf.train.exponential_decay(
            learning_rate=1e-3, global_step=tf.train.get_or_create_global_step(),
            decay_steps=self.steps_per_epoch * LR_HALVING_EPOCHS, decay_rate=0.5, staircase=True,
            name="learning_rate")
        tf.summary.scalar("lr", lr)
        return tf.train.AdamOptimizer(lr, epsilon=1e-5)


# ------------------------------------------------------------------ data
def resize_like_test_data(image):
    """Any BGR image -> the network's 40x40 float input, through SVHN's 32x32 crop size."""
    if image.shape[:2] != (32, 32):
        shrink = image.shape[0] > 32 or image.shape[1] > 32
        image = cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return cv2.resize(image, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_LINEAR).astype(np.float32)


class ArrayFlow:
    """A DataFlow over in-memory ``(images, labels)``, reshuffled every epoch when ``shuffle``."""

    def __init__(self, images, labels, shuffle, seed=0):
        self.images, self.labels, self.shuffle, self.seed = images, labels, shuffle, seed
        self.rng = np.random.RandomState(seed)

    def __len__(self):
        return len(self.labels)

    def reset_state(self):
        self.rng = np.random.RandomState((self.seed + os.getpid()) % 2 ** 32)

    def __iter__(self):
        order = self.rng.permutation(len(self.labels)) if self.shuffle else range(len(self.labels))
        for i in order:
            yield [self.images[i], self.labels[i]]


def source_flow(args, split):
    """The raw ``[image uint8 32x32x3, label]`` flow of ``split`` from --data or --synthetic."""
    if args.synthetic:
        images, labels = synthetic_digits(split, seed=args.seed)
    else:
        images, labels = load_svhn(args.data, split)
    return ArrayFlow(images, labels, shuffle=split == "train", seed=args.seed)


def make_dataflow(flow, train, batch, workers):
    from tensorpack.dataflow import AugmentImageComponent, BatchData, MultiProcessRunnerZMQ, imgaug

    augmentors = [imgaug.Resize((IMAGE_SIZE, IMAGE_SIZE))]
    if train:
        augmentors += [imgaug.Brightness(30), imgaug.Contrast((0.5, 1.5))]
    df = AugmentImageComponent(flow, augmentors)
    df = BatchData(df, batch, remainder=not train)
    if train and workers > 0:
        df = MultiProcessRunnerZMQ(df, workers)
    return df


# ------------------------------------------------------------------ modes
def make_model(args, steps_per_epoch=RECIPE_STEPS_PER_EPOCH):
    return SVHNModel(args.dorefa, steps_per_epoch, args.data_format, args.layer_bits)


def evaluate(args):
    flow = source_flow(args, "test")   # read before the weights, so that a bad --data fails at once
    predict = load_predictor(args, make_model(args))
    result = evaluate_topk(predict, make_dataflow(flow, False, args.batch, 0))
    print("test error: {:.4f}".format(result.top1))
    return 0


def run(args):
    predict = load_predictor(args, make_model(args))
    failed = run_images(args.run, resize_like_test_data, predict, lambda c: {}, k=5, as_json=args.json)
    return 1 if failed else 0


def train(args):
    train_flow = source_flow(args, "train")
    test_flow = source_flow(args, "test")
    steps = args.steps_per_epoch or max(len(train_flow) // args.batch, 1)
    logdir = args.logdir or LOGDIR_PATTERN.replace("W,A,G", str(args.dorefa))
    config = {"resume_key": {"model": "svhn", "dorefa": str(args.dorefa), "batch": args.batch,
                             "steps_per_epoch": steps},
              "model": "svhn-digit", "dorefa": str(args.dorefa), "data": "synthetic" if args.synthetic
              else os.path.abspath(args.data), "seed": args.seed, "epochs": args.epochs,
              "steps_per_epoch": steps, "batch": args.batch, "train_images": len(train_flow),
              "test_images": len(test_flow), "data_format": args.data_format}
    towers = len(args.gpu.split(",")) if args.gpu else max(available_gpus(), 1)
    if len(train_flow) < args.batch // towers:   # tensorpack's BatchData would stop on a bare assertion
        raise SVHNDataError("{}: {} training images, fewer than one batch of {}; use a smaller --batch".format(
            "--synthetic" if args.synthetic else args.data, len(train_flow), args.batch // towers))
    model = make_model(args, steps)
    config.update(layer_bits_record(args, model, config["resume_key"]))
    callbacks = [InferenceRunner(make_dataflow(test_flow, False, args.batch, 0),
                                 [ScalarStats("cost"), ClassificationError("wrong-top1", "test-error")])]
    plan = train_model(model, args, logdir, config, make_dataflow(train_flow, True, args.batch // towers, args.workers),
                       steps, callbacks, select_trainer(towers))
    # the synthetic digits depend on --seed; real data is named by its absolute path
    data = (["--synthetic"] + (["--seed", str(args.seed)] if args.seed else [])) if args.synthetic else \
        ["--data", os.path.abspath(args.data)]
    print(summary_line(plan.logdir, "test-error", "test error", "./" + os.path.basename(__file__), data))


def sweep(args):
    """--sweep: every configuration (and seed) trained by this script in its own run, then the table and plot."""
    from dorefanet.driver import model_totals
    from dorefanet.sweep import Sweep
    from dorefanet.training import quiet_tensorpack

    quiet_tensorpack()   # the sweep's own output is its progress lines and the table; the runs log to logs/

    data = ["--synthetic"] if args.synthetic else ["--data", os.path.abspath(args.data)]
    flags = data + ["--epochs", str(args.epochs), "--batch", str(args.batch), "--workers", str(args.workers),
                    "--data-format", args.data_format]
    flags += ["--steps-per-epoch", str(args.steps_per_epoch)] if args.steps_per_epoch else []
    flags += ["--gpu", args.gpu] if args.gpu else []

    def figures(bits):
        return model_totals(SVHNModel(dorefa_bits(bits), data_format=args.data_format))

    what = "built-in digits" if args.synthetic else "SVHN " + os.path.abspath(args.data)
    title = "SVHN digit net on {}, {} epoch{}{}".format(
        what, args.epochs, "" if args.epochs == 1 else "s",
        " of {} steps".format(args.steps_per_epoch) if args.steps_per_epoch else "")
    runs = Sweep(os.path.abspath(args.logdir or SWEEP_LOGDIR), args.sweep, range(args.seed, args.seed + args.seeds),
                 os.path.abspath(__file__), flags, data, args.epochs, "test-error", r"test error: ([0-9.]+)",
                 figures, title, ["./" + os.path.basename(__file__)] + list(args.argv))
    records = runs.run()
    print(runs.write(records))
    failed = [r for r in records if r["status"] != "ok"]
    if failed:
        print("error: {} of {} runs failed ({}); the others are in the table, and running the same command again "
              "retries only those".format(len(failed), len(records), ", ".join(
                  "{} seed {}".format(r["bits"], r["seed"]) for r in failed)), file=sys.stderr)
        return 1
    return 0


def parse_args(argv=None):
    parser, groups = make_parser(__doc__.splitlines()[0], "1,2,4", logdir_pattern=LOGDIR_PATTERN)
    groups["data"].add_argument("--synthetic", action="store_true",
                                help="use the built-in rendered digits instead of --data (nothing to download)")
    groups["data"].add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                                help="data loading processes for training (0: in the training process)")
    t = groups["training"]
    t.add_argument("--epochs", type=int, default=RECIPE_EPOCHS, help="epochs to train")
    t.add_argument("--steps-per-epoch", type=int, default=None,
                   help="steps per epoch (default: one pass over the training data)")
    t.add_argument("--batch", type=int, default=128, help="total batch size")
    t.add_argument("--overwrite", action="store_true",
                   help="start over even if --logdir holds a finished run (it is moved aside, not deleted)")
    t.add_argument("--data-format", choices=["channels_last", "channels_first"], default=None,
                   help="tensor layout (default: channels_first on GPUs, channels_last on the CPU)")
    t.add_argument("--sweep", type=dorefa_bits, nargs="+", metavar="W,A,G",
                   help="train each of these configurations in its own run under --logdir (default: {}), then "
                        "write results.md, results.json and error_vs_bits.png there; the same command resumes "
                        "a killed sweep".format(SWEEP_LOGDIR))
    t.add_argument("--seeds", type=int, default=1,
                   help="with --sweep: runs per configuration, seeds --seed, --seed + 1, ...")
    groups["model"].add_argument("--export", metavar="OUT.npz",
                                 help="write the loaded model's variables (no optimizer state) to an .npz")
    args = parser.parse_args(argv)
    dorefa_given = args.dorefa is not None
    args = check_modes(parser, args)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    check_sweep(parser, args, dorefa_given)
    if args.synthetic and args.data:
        parser.error("--synthetic and --data cannot be combined; choose one data source")
    needs_data = not (args.run or args.export or args.export_packed or args.summary)
    if needs_data and not (args.synthetic or args.data):
        parser.error("give --data SVHN_DIR (with train_32x32.mat and test_32x32.mat) or --synthetic")
    for flag in ("epochs", "batch", "steps_per_epoch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error("--{} must be a positive integer, got {}".format(flag.replace("_", "-"), value))
    if args.gpu and args.batch % len(args.gpu.split(",")):
        parser.error("--batch {} must be divisible by the number of GPUs in --gpu {}".format(args.batch, args.gpu))
    if args.workers < 0:
        parser.error("--workers must be >= 0, got {}".format(args.workers))
    if args.data_format is None:
        args.data_format = "channels_first" if available_gpus() > 0 else "channels_last"
    try:
        make_model(args)
    except LayerBitsError as err:
        parser.error(str(err))
    return args


def check_sweep(parser, args, dorefa_given):
    if args.sweep is None:
        if args.seeds != 1:
            parser.error("--seeds only applies to --sweep")
        return
    clashes = [flag for flag, given in (("--dorefa", dorefa_given),
                                        ("--layer-bits", args.layer_bits), ("--load", args.load),
                                        ("--summary", args.summary), ("--overwrite", args.overwrite)) if given]
    if clashes:
        parser.error("--sweep cannot be combined with {}: it gives each run its --dorefa and its own run "
                     "directory".format(clashes[0]))
    names = [str(bits) for bits in args.sweep]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        parser.error("--sweep lists {} more than once".format(", ".join(twice)))
    if args.seeds < 1:
        parser.error("--seeds must be a positive integer, got {}".format(args.seeds))


def main(argv=None):
    args = parse_args(argv)
    if args.sweep:
        return run_reporting_errors(lambda: sweep(args), COMMON_ERRORS + (SVHNDataError,), training=True)
    training = not (args.export or args.export_packed or args.run or args.eval or args.summary)
    return run_script(args, make_model(args), lambda: train(args),
                      lambda: evaluate(args), lambda: run(args), training, errors=(SVHNDataError,))


if __name__ == "__main__":
    sys.exit(main())
