"""The one command line of every script: its flags, their checks, and errors as one line.

:func:`make_parser` builds the parser of a script from its recipe and data
source (argument groups; every default shown in the help); :func:`parse_args`
parses and refuses conflicts with ``parser.error``, the same way in every script.
What each mode then does is :mod:`dorefanet.driver`.
"""
import argparse
import json
import os
import re
import sys

from dorefanet.bits import Bits, LayerBitsError, parse_bits, parse_layer_bits
from dorefanet.cluster import DEFAULT_TIMEOUT, resolve_cluster
from dorefanet.model import run_name

__all__ = ["Bits", "dorefa_bits", "layer_bits_entry", "make_parser", "parse_args", "check_modes", "check_run_table",
           "run_config", "run_reporting_errors", "packed_only", "resolve_devices", "TRAINERS"]

#: replicated: the towers of one process; collective: one process per machine (--cluster or TF_CONFIG).
TRAINERS = ("replicated", "collective")


def dorefa_bits(text):
    """argparse ``type`` for ``--dorefa W,A,G`` (e.g. ``1,2,6``, ``32,32,32``, ``t,32,32``)."""
    try:
        return parse_bits(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def layer_bits_entry(text):
    """argparse ``type`` for one ``--layer-bits PATTERN=W,A,G`` entry: ``(pattern, Bits)``."""
    try:
        return parse_layer_bits(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to each flag's help, unless the help already states its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "(default:" in text or default is None or default is False or default == argparse.SUPPRESS \
                or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def make_parser(script):
    """The parser of ``script`` (a module with ``__doc__``, ``RECIPE`` and ``DATA``; see :mod:`dorefanet.model`)."""
    recipe, data = script.RECIPE, script.DATA
    # --help shows the title and the usage examples, not the notes after them
    parser = argparse.ArgumentParser(description="\n\n".join(script.__doc__.split("\n\n")[:2]),
                                     formatter_class=_Formatter)
    quantization = parser.add_argument_group("quantization")
    quantization.add_argument(
        "--dorefa", type=dorefa_bits, default=None, metavar="W,A,G",
        help="bit widths of weights, activations and gradients of every quantized layer; 32 = not quantized, "
             "W = 't' selects TTQ (with A = G = 32). With --load LOGDIR and no bit flags, the run's own "
             "(default: {})".format(recipe["default_dorefa"]))
    quantization.add_argument(
        "--layer-bits", type=layer_bits_entry, nargs="+", default=[], metavar="PATTERN=W,A,G",
        help="bit widths of single layers: PATTERN is a layer name (conv0, fc1, conv2blk1/c3x3a) or a regular "
             "expression matching whole names, later entries win; W = the layer's weights, A = the activation "
             "it reads, G = the gradient into it (e.g. conv0=8,32,32 'conv[12]=2,2,8')")
    parser.set_defaults(default_dorefa=dorefa_bits(recipe["default_dorefa"]))

    group = parser.add_argument_group("data")
    group.add_argument("--data", metavar="DIR", help="dataset directory")
    data.add_flags(group)

    runs = run_name(recipe)
    t = parser.add_argument_group("training")
    t.add_argument("--logdir", metavar="DIR",
                   help="where checkpoints and logs go; a killed run started again with the same command resumes "
                        "there (default: train_log/{}-dorefa-W,A,G)".format(runs))
    t.add_argument("--seed", type=int, default=0,
                   help="random seed: the data order and augmentation, the initial weights, fg's noise and dropout; "
                        "on the CPU the same command and seed end with the same weights, bit for bit")
    t.add_argument("--deterministic-ops", action="store_true",
                   help="TensorFlow's op determinism (tf.config.experimental.enable_op_determinism), which GPU "
                        "runs need to repeat bit for bit; it picks other kernels, so results differ from runs "
                        "without it (docs/training.md, 'Reproducible runs')")
    t.add_argument("--gpu", metavar="IDS",
                   help="comma-separated GPU ids to train on (default: all visible GPUs, else the CPU)")
    t.add_argument("--epochs", type=int, default=recipe["epochs"], help="epochs to train; the recipe by default")
    t.add_argument("--steps-per-epoch", type=int, default=None,
                   help="training steps per epoch (default: one pass over the training data)")
    t.add_argument("--batch", type=int, default=recipe["batch"],
                   help="total batch size, split evenly over the towers (--gpu) of every worker (--cluster); "
                        "also the batch of --eval")
    t.add_argument("--overwrite", action="store_true",
                   help="start over even if --logdir holds a finished run (it is moved aside, not deleted)")
    t.add_argument("--data-format", choices=("channels_first", "channels_last"), default=None,
                   help="layout of the feature maps inside the network; by default channels_first when a GPU "
                        "is visible, {} on the CPU (measured faster there). Checkpoints work in either "
                        "layout".format(recipe.get("cpu_data_format", "channels_last")))
    t.add_argument("--sweep", type=dorefa_bits, nargs="+", metavar="W,A,G",
                   help="train each of these configurations in its own run under --logdir (default: "
                        "train_log/{}-sweep), then write results.md, results.json and error_vs_bits.png there; "
                        "the same command resumes a killed sweep".format(runs))
    t.add_argument("--seeds", type=int, default=1,
                   help="with --sweep: runs per configuration, seeds --seed, --seed + 1, ...")
    t.add_argument("--trainer", choices=TRAINERS, default=None,
                   help="replicated: synchronous data-parallel training in one process, one tower per --gpu "
                        "(tensorpack SyncMultiGPUTrainerReplicated); collective: the same on several machines, "
                        "one process per machine, gradients all-reduced between them over gRPC "
                        "(docs/distributed.md). Default: collective with --cluster or TF_CONFIG, else replicated")
    t.add_argument("--cluster", metavar="HOST:PORT,...",
                   help="train on several machines: every worker's address, the same list on each (or TF_CONFIG)")
    t.add_argument("--task", type=int, metavar="I", help="with --cluster: this machine's index in it (0 = the chief)")
    t.add_argument("--worker-timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="with --cluster: how long a worker waits for the others at start-up and in each all-reduce "
                        "before it stops with an error; must exceed the chief's validation and checkpoint time")

    model = parser.add_argument_group("loading, evaluation and inference")
    model.add_argument("--load", metavar="PATH",
                       help="a logdir (its latest checkpoint), a checkpoint, or an .npz of name -> array")
    model.add_argument("--eval", action="store_true", help="evaluate the loaded model on the test/validation set")
    model.add_argument("--run", nargs="+", metavar="IMAGE", help="classify these image files")
    model.add_argument("--summary", action="store_true",
                       help="print one row per layer (kind, output shape, W/A/G bits, parameters, MACs, bit "
                            "operations, float and packed bytes) and the totals, then exit; needs no data or "
                            "checkpoint (with --load: of the loaded model)")
    model.add_argument("--json", action="store_true",
                       help="with --run: print one JSON object per image; with --summary: one JSON object")
    model.add_argument("--export", metavar="OUT.npz",
                       help="write the loaded model's variables (no optimizer state) to an .npz")
    model.add_argument("--export-packed", metavar="OUT.npz",
                       help="write the loaded model as a bit-packed file (integer weight codes, batch norm folded) "
                            "for --engine packed; format: docs/packed-format.md")
    model.add_argument("--export-onnx", metavar="OUT.onnx",
                       help="write the loaded model (a logdir, checkpoint, .npz or --export-packed file) as an ONNX "
                            "graph (opset 21) with QuantizeLinear/DequantizeLinear around each quantized weight and "
                            "activation, for ONNX Runtime and other runtimes; needs the package onnx; "
                            "docs/onnx.md")
    model.add_argument("--first-last-dtype", choices=("float32", "float16"), default="float32",
                       help="with --export-packed: storage of the unquantized first and last layers; float16 is "
                            "smaller but no longer exact")
    model.add_argument("--engine", choices=("tensorflow", "packed"), default="tensorflow",
                       help="what runs --eval and --run: the TensorFlow graph on --load, or the bit-operation engine "
                            "on a --export-packed file")
    return parser


def parse_args(script, argv=None):
    """Parse and check the flags of ``script``; conflicts and bad values end in ``parser.error``.

    Sets ``args.training``, ``args.argv``, ``args.cluster`` (a :class:`dorefanet.cluster.Cluster` or
    None) and ``args.trainer``; ``--gpu`` becomes ``CUDA_VISIBLE_DEVICES``.
    """
    parser = make_parser(script)
    args = parser.parse_args(argv)
    dorefa_given = args.dorefa is not None
    args = check_modes(parser, args)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.training = not (args.eval or args.run or args.export or args.export_packed or args.export_onnx
                         or args.summary)
    _check_sweep(parser, args, dorefa_given)
    script.DATA.check_flags(parser, args, needs_data=args.training or args.eval)
    for flag in ("epochs", "batch", "steps_per_epoch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error("--{} must be a positive integer, got {}".format(flag.replace("_", "-"), value))
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be >= 0, got {}".format(args.workers))
    smallest = script.RECIPE.get("min_image_size")
    if smallest and getattr(args, "image_size", smallest) < smallest:
        parser.error("--image-size must be at least {}, got {}".format(smallest, args.image_size))
    _parse_cluster(parser, args)
    return parser, args


def _check_sweep(parser, args, dorefa_given):
    if args.sweep is None:
        if args.seeds != 1:
            parser.error("--seeds only applies to --sweep")
        return
    clashes = [flag for flag, given in (("--dorefa", dorefa_given),
                                        ("--layer-bits", args.layer_bits), ("--load", args.load),
                                        ("--summary", args.summary), ("--overwrite", args.overwrite),
                                        ("--cluster", args.cluster)) if given]
    if clashes:
        parser.error("--sweep cannot be combined with {}: it gives each run its --dorefa and its own run "
                     "directory".format(clashes[0]))
    names = [str(bits) for bits in args.sweep]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        parser.error("--sweep lists {} more than once".format(", ".join(twice)))
    if args.seeds < 1:
        parser.error("--seeds must be a positive integer, got {}".format(args.seeds))


def _parse_cluster(parser, args):
    """``args.cluster``: the :class:`dorefanet.cluster.Cluster` of --cluster/--task or TF_CONFIG, or None."""
    try:
        cluster = resolve_cluster(args)
    except ValueError as err:
        parser.error(str(err))
    if cluster is not None and cluster.size == 1:
        cluster = None  # a cluster of one machine is the ordinary training
    if cluster is not None and not args.training:
        parser.error("--cluster/TF_CONFIG is for training; --eval, --run and --export run in one process")
    if args.trainer == "collective" and cluster is None and args.training:
        parser.error("--trainer collective needs the workers: --cluster HOST:PORT,... --task I, or TF_CONFIG")
    if args.trainer == "replicated" and cluster is not None:
        parser.error("--trainer replicated trains in one process; --cluster/TF_CONFIG needs --trainer collective")
    if not args.worker_timeout > 0:
        parser.error("--worker-timeout must be a positive number of seconds, got {:g}".format(args.worker_timeout))
    args.cluster = cluster
    args.trainer = "collective" if cluster is not None else "replicated"


def packed_only(args):
    """Whether the flags need no TensorFlow: the packed engine's ``--eval`` / ``--run``, or ``--export-onnx`` of a
    packed file."""
    if getattr(args, "export_onnx", None) and args.load:
        from dorefanet.packed.format import is_packed_file

        return is_packed_file(os.path.expanduser(args.load))
    return (args.engine == "packed" and bool(args.eval or args.run)
            and not (args.export or args.export_packed or getattr(args, "fake", False)))


def resolve_devices(parser, recipe, args):
    """``args.towers`` and the default ``--data-format``, once ``CUDA_VISIBLE_DEVICES`` reflects ``--gpu``.

    The packed engine's modes ask TensorFlow nothing: they run on the CPU.
    """
    gpus = 0
    if not packed_only(args):
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
        args.data_format = "channels_first" if gpus else recipe.get("cpu_data_format", "channels_last")


_EXCLUSIVE_MODES = ("eval", "run", "export", "export_packed", "export_onnx")


def check_modes(parser, args):
    """Refuse conflicting or incomplete mode flags with ``parser.error``; apply ``--gpu``.

    ``--gpu`` must be distinct GPU ids; it becomes ``CUDA_VISIBLE_DEVICES``
    here, before anything asks TensorFlow for devices.
    """
    chosen = ["--" + m.replace("_", "-") for m in _EXCLUSIVE_MODES if getattr(args, m, None)]
    if len(chosen) > 1:
        parser.error("{} cannot be combined; choose one".format(" and ".join(chosen)))
    if chosen and not args.load:
        parser.error("{} needs --load PATH (a logdir, checkpoint or .npz)".format(chosen[0]))
    if args.summary and chosen:
        parser.error("--summary cannot be combined with {}; it only prints the model's summary".format(chosen[0]))
    if args.json and not (args.run or args.summary):
        parser.error("--json only applies to --run and --summary")
    if args.engine == "packed" and not (args.run or args.eval):
        parser.error("--engine packed runs --eval or --run on a --export-packed file")
    if args.export_onnx is not None and not args.export_onnx.endswith(".onnx"):
        parser.error("--export-onnx writes an .onnx file; got {!r}".format(args.export_onnx))
    if args.export_onnx is not None and os.path.isdir(args.export_onnx):
        parser.error("--export-onnx {}: is a directory".format(args.export_onnx))
    if args.first_last_dtype != "float32" and not (args.export_packed or args.summary):
        parser.error("--first-last-dtype only applies to --export-packed (and --summary)")
    # a --summary of a --load takes the run's own bits, as the other modes on a loaded model do
    _bits_of_the_run(parser, args, chosen or (["--summary"] if args.summary and args.load else []))
    if args.gpu is not None:
        ids = [part.strip() for part in args.gpu.split(",")]
        if not all(part.isdigit() for part in ids) or len(set(ids)) != len(ids):
            parser.error("--gpu takes distinct comma-separated GPU ids such as 0,1,2,3, got {!r}".format(args.gpu))
        args.gpu = ",".join(ids)
        # before TensorFlow first looks for GPUs, so that it only ever sees these
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu
    return args


def run_config(path):
    """What ``path`` records of its bit widths: ``{"dorefa", "layer_bits", "layer_table"}`` or None.

    From the ``config.json`` of the training run that ``path`` (a logdir or a
    checkpoint in one) belongs to, or from the header of a packed file; a plain
    ``.npz`` records nothing.
    """
    if not path:
        return None
    path = os.path.expanduser(path)
    if path.endswith(".npz"):
        return _packed_config(path)
    logdir = path if os.path.isdir(path) else os.path.dirname(path)
    try:
        with open(os.path.join(logdir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) and "dorefa" in config else None


def _packed_config(path):
    from dorefanet.packed.format import HEADER, is_packed_file

    if not is_packed_file(path):
        return None
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data[HEADER][()]))
        table = header.get("layer_bits") or {}
        return {"dorefa": header["bits"], "packed": True,
                "layer_bits": [[re.escape(layer), bits] for layer, bits in table.items()]}
    except (OSError, ValueError, KeyError):
        return None   # reading the file properly reports what is wrong with it


def _bits_of_the_run(parser, args, modes):
    """``--dorefa`` / ``--layer-bits``: as given, else the loaded run's own (not when training), else the default.

    ``args.run_table`` is the run's recorded ``{layer: "W,A,G"}`` when bit flags
    were given too: the script refuses a model whose table differs from it.
    """
    args.run_table = None
    config = run_config(args.load) if modes else None
    given = args.dorefa is not None or bool(args.layer_bits)
    if config is not None and not given:
        args.dorefa = dorefa_bits(config["dorefa"])
        args.layer_bits = [layer_bits_entry("{}={}".format(p, b)) for p, b in config.get("layer_bits", [])]
    elif config is not None and not config.get("packed"):   # a packed file's own check names the layer
        args.run_table = config.get("layer_table") or {"*": config["dorefa"]}
    if args.dorefa is None:
        args.dorefa = args.default_dorefa


def check_run_table(args, model):
    """Refuse bit flags that give ``model`` other bit widths than the loaded run was trained with."""
    if args.run_table is None:
        return
    table = model.layer_plan.table()
    if "*" in args.run_table:   # a run recorded before per-layer bits: only --dorefa is known
        if str(args.dorefa) != args.run_table["*"] or model.layer_plan.mixed:
            raise LayerBitsError("{} was trained at --dorefa {}; these bit flags differ (leave them out to use the "
                             "run's own)".format(args.load, args.run_table["*"]))
        return
    for layer, bits in table.items():
        if args.run_table.get(layer) != bits:
            raise LayerBitsError("{} was trained with {} at {}, not {} as these bit flags give; leave --dorefa and "
                             "--layer-bits out to use the run's own".format(
                                 args.load, layer, args.run_table.get(layer), bits))


def _one_line_os_error(err):
    where = " ".join(str(name) for name in (err.filename, err.filename2) if name is not None)
    return "{}: {}".format(where, err.strerror) if where and err.strerror else str(err)


def run_reporting_errors(action, expected_errors, training):
    """Run ``action()`` and turn the errors users cause into one line on stderr and an exit status.

    ``expected_errors``: exception types whose message is already a complete
    one-line explanation (bad file, bad directory, mismatched weights...).
    Returns ``action()``'s status, 2 for those errors and ``OSError`` (e.g. an
    unwritable path), 130 for Ctrl-C (with how to resume when ``training``).
    """
    try:
        return action()
    except tuple(expected_errors) as err:
        print("error: {}".format(err), file=sys.stderr)
    except OSError as err:
        print("error: {}".format(_one_line_os_error(err)), file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted{}".format("; run the same command again to resume from the last checkpoint"
                                     if training else ""), file=sys.stderr)
        return 130
    return 2
