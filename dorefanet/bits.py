"""Bit widths: one (W, A, G) triple (:class:`Bits`), parsed, checked and written; and per layer (:class:`LayerPlan`).

TensorFlow-free, so that the packed engine's ``--eval`` / ``--run`` can check flags
without it; :mod:`dorefa` re-exports :func:`check_bits` and :data:`TERNARY`.

Per layer, ``--layer-bits PATTERN=W,A,G`` resolved against a network's description.

What the three numbers mean for one layer ``L`` (a ``conv`` or ``fc``):

* ``W``: ``fw`` on ``L/W``, the layer's weights (``t``: TTQ, with ``L/Wp`` and ``L/Wn``);
* ``A``: the bits of the activation ``L`` *reads*: the ``activate`` (or ``nonlin``)
  right before it quantizes to A bits (32: the model's float activation, relu or
  clip);
* ``G``: ``fg`` on ``L``'s output, i.e. the bits of the gradient flowing back into ``L``.

Defaults: ``--dorefa W,A,G`` for every layer the model quantizes, ``32,32,32`` for
the layers it keeps in float (the first and the last, as published).  Entries
are applied in order, later ones winning; ``PATTERN`` is a layer name or a
regular expression that must match whole names.  Refused, with a one-line
:class:`LayerBitsError`: a pattern that matches no layer, ``A < 32`` on a layer
that reads no activation (the first layer reads the image), and one activation
read by layers that ask for different ``A`` (ResNet-18's first blocks feed the
shortcut and the stem from the same activation).
"""
import numbers
import re
from typing import NamedTuple, Union

from dorefanet.builder import Node, Recorder

__all__ = ["TERNARY", "Bits", "check_width", "check_bits", "parse_bits", "parse_layer_bits", "LayerBitsError",
           "LayerPlan", "FLOAT"]

#: The weight "bit width" that selects Trained Ternary Quantization.
TERNARY = "t"


class Bits(NamedTuple):
    """A checked (W, A, G) bit-width triple; W may be ``'t'`` (TTQ); ``str()`` gives ``'1,2,6'``."""

    w: Union[int, str]
    a: int
    g: int

    def __str__(self):
        return "{},{},{}".format(self.w, self.a, self.g)


#: The weight "bit width" that selects Trained Ternary Quantization.
TERNARY = "t"


def check_width(value, what, allow_ternary=False):
    allowed = "an integer from 1 to 32" + (" or 't' (TTQ)" if allow_ternary else "")
    if allow_ternary and isinstance(value, str) and value == TERNARY:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError("invalid {}: {!r}; expected {}".format(what, value, allowed))
    if not 1 <= int(value) <= 32:
        raise ValueError("invalid {}: {!r}; expected {}".format(what, value, allowed))
    return int(value)


def check_bits(bitW, bitA, bitG):
    """Validate a (W, A, G) triple and return it normalised to ints (or ``'t'`` for W).

    Raises ``ValueError`` naming the bad value: widths are integers in 1..32
    (32 = not quantized); W may be ``'t'`` (TTQ), which implies A = G = 32.
    """
    bitW = check_width(bitW, "weight bit width (W)", allow_ternary=True)
    bitA = check_width(bitA, "activation bit width (A)")
    bitG = check_width(bitG, "gradient bit width (G)")
    if bitW == TERNARY and (bitA, bitG) != (32, 32):
        raise ValueError("W = 't' (TTQ) implies A = G = 32, got A = {}, G = {}".format(bitA, bitG))
    return bitW, bitA, bitG


FLOAT = Bits(32, 32, 32)


class LayerBitsError(ValueError):
    """A ``--layer-bits`` entry cannot be applied (one-line message)."""


def parse_bits(text):
    """``'1,2,6'`` -> ``Bits(1, 2, 6)``; ``'t,32,32'`` -> ``Bits('t', 32, 32)``; ``ValueError`` naming the problem."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 3 or not all(parts):
        raise ValueError("expected three comma-separated bit widths W,A,G (e.g. 1,2,6), got {!r}".format(text))
    values = []
    for name, part in zip("WAG", parts):
        if part == TERNARY:   # check_bits says where t is not allowed
            values.append(part)
            continue
        try:
            values.append(int(part))
        except ValueError:
            raise ValueError("{} must be an integer from 1 to 32{}, got {!r} in {!r}".format(
                name, " or 't'" if name == "W" else "", part, text)) from None
    try:
        return Bits(*check_bits(*values))
    except ValueError as err:
        raise ValueError("{} in {!r}".format(err, text)) from None


def parse_layer_bits(text):
    """``'conv0=8,32,32'`` -> ``('conv0', (8, 32, 32))``; ``ValueError`` for anything else."""
    pattern, sep, bits = str(text).rpartition("=")
    if not sep or not pattern:
        raise ValueError("expected PATTERN=W,A,G (e.g. conv0=8,32,32), got {!r}".format(text))
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError("{!r} is not a regular expression: {}".format(pattern, err)) from None
    try:
        return pattern, parse_bits(bits)
    except ValueError as err:
        raise ValueError("{} (in {!r})".format(err, text)) from None


class LayerPlan:
    """The resolved bit widths of one model: ``layers`` (name -> (W, A, G)) and each activation's A.

    ``network`` is the model's description (``network(net, x)``), ``default``
    the ``--dorefa`` triple, ``entries`` ``[(pattern, (W, A, G)), ...]`` in
    command-line order.
    """

    def __init__(self, network, default, entries=()):
        recorder = Recorder()
        network(recorder, Node("input"))
        layer_nodes = [n for n in recorder.nodes if n.layer is not None]
        self.default = Bits(*default)
        self.entries = [(p, Bits(*b)) for p, b in entries]
        self.quantized_by_default = {n.layer[0]: n.layer[2] for n in layer_nodes}
        self.kinds = {n.layer[0]: n.layer[1] for n in layer_nodes}
        self.layers = {name: (self.default if q else FLOAT) for name, q in self.quantized_by_default.items()}
        names = list(self.layers)
        for pattern, bits in self.entries:
            matched = [name for name in names if name == pattern or re.fullmatch(pattern, name)]
            if not matched:
                raise LayerBitsError("--layer-bits {}={}: {!r} matches no layer; the layers are {}".format(
                    pattern, bits, pattern, ", ".join(names)))
            for name in matched:
                self.layers[name] = bits
        self.activation_bits = []
        for node in recorder.activations:
            readers = [n.layer[0] for n in layer_nodes if node in n.inputs]
            wanted = sorted({self.layers[r][1] for r in readers})
            if len(wanted) > 1:
                raise LayerBitsError("--layer-bits: {} read the same activation but ask for A = {}; give them "
                                     "the same A".format(" and ".join(readers), " and ".join(map(str, wanted))))
            self.activation_bits.append(wanted[0] if wanted else (self.default[1] if node.kind == "activate"
                                                                  else 32))
        for n in layer_nodes:
            name = n.layer[0]
            if self.layers[name][1] != 32 and n.inputs[0].kind not in ("activate", "nonlin"):
                raise LayerBitsError("--layer-bits: {} asks for A = {}, but {} reads {}, not an activation that "
                                     "can be quantized; give it A = 32".format(
                                         name, self.layers[name][1], name,
                                         "the input image" if n.inputs[0].kind == "input" else
                                         "the output of a " + n.inputs[0].kind))

    def float_activation(self, activation_at_32):
        """The unquantized activation: ``relu`` only for a relu model at ``--dorefa`` A = 32, else ``clip``."""
        return "relu" if activation_at_32 == "relu" and self.default[1] == 32 else "clip"

    def quantized(self, layer):
        """Whether ``layer`` goes through ``fw`` / ``fg``: always where the model quantizes it, else if asked."""
        return self.quantized_by_default[layer] or self.layers[layer] != FLOAT

    @property
    def mixed(self):
        """Whether any layer differs from what ``--dorefa`` alone gives."""
        return any(self.layers[n] != (self.default if q else FLOAT) for n, q in self.quantized_by_default.items())

    def table(self):
        """``{layer: "W,A,G"}``, in the network's order (for config.json and packed headers)."""
        return {name: str(bits) for name, bits in self.layers.items()}
