"""The command line shared by every script: ``--dorefa W,A,G`` and the common flags.

Each script calls :func:`make_parser`, adds its own flags to the returned
argument groups, parses, and then calls :func:`check_modes` so that the same
conflicts are refused the same way everywhere.
"""
import argparse
import json
import os
import re
import sys
from typing import NamedTuple, Union

from dorefanet.layer_bits import LayerBitsError, parse_bits, parse_layer_bits

__all__ = ["Bits", "dorefa_bits", "layer_bits_entry", "make_parser", "check_modes", "check_run_table", "run_config",
           "run_reporting_errors"]


class Bits(NamedTuple):
    """A validated (W, A, G) bit-width triple; W may be ``'t'`` (TTQ)."""

    w: Union[int, str]
    a: int
    g: int

    def __str__(self):
        return "{},{},{}".format(self.w, self.a, self.g)


def dorefa_bits(text):
    """argparse ``type`` for ``--dorefa W,A,G`` (e.g. ``1,2,6``, ``32,32,32``, ``t,32,32``)."""
    try:
        return Bits(*parse_bits(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def layer_bits_entry(text):
    """argparse ``type`` for one ``--layer-bits PATTERN=W,A,G`` entry: ``(pattern, Bits)``."""
    try:
        pattern, bits = parse_layer_bits(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return pattern, Bits(*bits)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to each flag's help, unless the help already states its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "(default:" in text or default is None or default is False or default == argparse.SUPPRESS \
                or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


def make_parser(description, default_dorefa, epilog=None, logdir_pattern="train_log/<model>-dorefa-W,A,G"):
    """Build the shared parser.

    Returns ``(parser, groups)`` where ``groups`` maps ``'quantization'``,
    ``'data'``, ``'training'`` and ``'model'`` to argparse argument groups so
    that a script adds its own flags next to the related shared ones.
    """
    parser = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=_Formatter)
    groups = {
        "quantization": parser.add_argument_group("quantization"),
        "data": parser.add_argument_group("data"),
        "training": parser.add_argument_group("training"),
        "model": parser.add_argument_group("loading, evaluation and inference"),
    }
    groups["quantization"].add_argument(
        "--dorefa", type=dorefa_bits, default=None, metavar="W,A,G",
        help="bit widths of weights, activations and gradients of every quantized layer; 32 = not quantized, "
             "W = 't' selects TTQ (with A = G = 32). With --load LOGDIR and no bit flags, the run's own "
             "(default: {})".format(default_dorefa))
    groups["quantization"].add_argument(
        "--layer-bits", type=layer_bits_entry, nargs="+", default=[], metavar="PATTERN=W,A,G",
        help="bit widths of single layers: PATTERN is a layer name (conv0, fc1, conv2blk1/c3x3a) or a regular "
             "expression matching whole names, later entries win; W = the layer's weights, A = the activation "
             "it reads, G = the gradient into it (e.g. conv0=8,32,32 'conv[12]=2,2,8')")
    parser.set_defaults(default_dorefa=dorefa_bits(default_dorefa))
    groups["data"].add_argument("--data", metavar="DIR", help="dataset directory")
    groups["training"].add_argument("--logdir", metavar="DIR",
                                    help="where checkpoints and logs go; a killed run started again with the same "
                                         "command resumes there (default: {})".format(logdir_pattern))
    groups["training"].add_argument("--seed", type=int, default=0, help="random seed")
    groups["training"].add_argument("--gpu", metavar="IDS",
                                    help="comma-separated GPU ids to train on (default: all visible GPUs, else the CPU)")
    model = groups["model"]
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
    model.add_argument("--export-packed", metavar="OUT.npz",
                       help="write the loaded model as a bit-packed file (integer weight codes, batch norm folded) "
                            "for --engine packed; format: docs/packed-format.md")
    model.add_argument("--first-last-dtype", choices=("float32", "float16"), default="float32",
                       help="with --export-packed: storage of the unquantized first and last layers; float16 is "
                            "smaller but no longer exact")
    model.add_argument("--engine", choices=("tensorflow", "packed"), default="tensorflow",
                       help="what runs --eval and --run: the TensorFlow graph on --load, or the bit-operation engine "
                            "on a --export-packed file")
    return parser, groups


_EXCLUSIVE_MODES = ("eval", "run", "export", "export_packed")


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
