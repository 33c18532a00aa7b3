"""The command line shared by every script: ``--dorefa W,A,G`` and the common flags.

Each script calls :func:`make_parser`, adds its own flags to the returned
argument groups, parses, and then calls :func:`check_modes` so that the same
conflicts are refused the same way everywhere.
"""
import argparse
import os
import sys
from typing import NamedTuple, Union

from dorefa import TERNARY, check_bits

__all__ = ["Bits", "dorefa_bits", "make_parser", "check_modes", "run_reporting_errors"]


class Bits(NamedTuple):
    """A validated (W, A, G) bit-width triple; W may be ``'t'`` (TTQ)."""

    w: Union[int, str]
    a: int
    g: int

    def __str__(self):
        return "{},{},{}".format(self.w, self.a, self.g)


def dorefa_bits(text):
    """argparse ``type`` for ``--dorefa W,A,G`` (e.g. ``1,2,6``, ``32,32,32``, ``t,32,32``)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 3 or not all(parts):
        raise argparse.ArgumentTypeError(
            "expected three comma-separated bit widths W,A,G (e.g. 1,2,6), got {!r}".format(text))
    values = []
    for name, part in zip("WAG", parts):
        if part == TERNARY:
            values.append(part)
            continue
        try:
            values.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                "{} must be an integer from 1 to 32{}, got {!r} in {!r}".format(
                    name, " or 't'" if name == "W" else "", part, text)) from None
    try:
        return Bits(*check_bits(*values))
    except ValueError as err:
        raise argparse.ArgumentTypeError("{} in {!r}".format(err, text)) from None


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
        "--dorefa", type=dorefa_bits, default=dorefa_bits(default_dorefa), metavar="W,A,G",
        help="bit widths of weights, activations and gradients; 32 = not quantized, "
             "W = 't' selects TTQ (with A = G = 32)")
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
    model.add_argument("--json", action="store_true", help="with --run: print one JSON object per image")
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
    if args.json and not args.run:
        parser.error("--json only applies to --run")
    if args.engine == "packed" and not (args.run or args.eval):
        parser.error("--engine packed runs --eval or --run on a --export-packed file")
    if args.first_last_dtype != "float32" and not args.export_packed:
        parser.error("--first-last-dtype only applies to --export-packed")
    if args.gpu is not None:
        ids = [part.strip() for part in args.gpu.split(",")]
        if not all(part.isdigit() for part in ids) or len(set(ids)) != len(ids):
            parser.error("--gpu takes distinct comma-separated GPU ids such as 0,1,2,3, got {!r}".format(args.gpu))
        args.gpu = ",".join(ids)
        # before TensorFlow first looks for GPUs, so that it only ever sees these
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu
    return args


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
