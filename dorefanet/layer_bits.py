"""Bit widths per layer: ``--layer-bits PATTERN=W,A,G`` resolved against a network's description.

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
import re

from dorefanet.bitwidths import TERNARY, check_bits

__all__ = ["LayerBitsError", "parse_bits", "parse_layer_bits", "LayerPlan", "FLOAT"]

FLOAT = (32, 32, 32)


class LayerBitsError(ValueError):
    """A ``--layer-bits`` entry cannot be applied (one-line message)."""


def parse_bits(text):
    """``'1,2,6'`` -> ``(1, 2, 6)``; ``'t,32,32'`` -> ``('t', 32, 32)``; ``ValueError`` naming the problem."""
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
        return tuple(check_bits(*values))
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


def bits_text(bits):
    return "{},{},{}".format(*bits)


class _Node:
    def __init__(self, kind, inputs=(), layer=None, index=None):
        self.kind, self.inputs, self.layer, self.index = kind, inputs, layer, index


class _Recorder:
    """The builder interface of :mod:`dorefanet.network` that only records which op reads which."""

    def __init__(self):
        self.nodes, self._scopes, self.activations = [], [], []

    def _node(self, kind, *inputs, layer=None):
        node = _Node(kind, inputs, layer)
        self.nodes.append(node)
        return node

    def _layer(self, kind, name, x, quantized):
        return self._node(kind, x, layer=("/".join(self._scopes + [name]), kind, bool(quantized)))

    def conv(self, name, x, out, kernel, stride=1, padding="SAME", groups=1, quantized=True, bias=False):
        return self._layer("conv", name, x, quantized)

    def fc(self, name, x, out, quantized=True, bias=False, flatten="hwc"):
        return self._layer("fc", name, x, quantized)

    def _activation(self, kind, x):
        node = self._node(kind, x)
        node.index = len(self.activations)
        self.activations.append(node)
        return node

    def activate(self, x):
        return self._activation("activate", x)

    def nonlin(self, x):
        return self._activation("nonlin", x)

    def bn(self, name, x):
        return self._node("bn", x)

    def maxpool(self, name, x, size, stride=None, padding="VALID"):
        return self._node("maxpool", x)

    def avgpool(self, name, x, size, stride=None, padding="VALID"):
        return self._node("avgpool", x)

    def gap(self, name, x):
        return self._node("gap", x)

    def pad(self, x, before, after, mode="constant"):
        return self._node("pad", x)

    def dropout(self, name, x, rate):
        return x

    def scale(self, x, by):
        return self._node("scale", x)

    def add(self, a, b):
        return self._node("add", a, b)

    def scope(self, name):
        recorder = self

        class _Scope:
            def __enter__(self):
                recorder._scopes.append(name)

            def __exit__(self, *exc):
                recorder._scopes.pop()

        return _Scope()


class LayerPlan:
    """The resolved bit widths of one model: ``layers`` (name -> (W, A, G)) and each activation's A.

    ``network`` is the model's description (``network(net, x)``), ``default``
    the ``--dorefa`` triple, ``entries`` ``[(pattern, (W, A, G)), ...]`` in
    command-line order.
    """

    def __init__(self, network, default, entries=()):
        recorder = _Recorder()
        network(recorder, _Node("input"))
        layer_nodes = [n for n in recorder.nodes if n.layer is not None]
        self.default = tuple(default)
        self.entries = [(p, tuple(b)) for p, b in entries]
        self.quantized_by_default = {n.layer[0]: n.layer[2] for n in layer_nodes}
        self.kinds = {n.layer[0]: n.layer[1] for n in layer_nodes}
        self.layers = {name: (self.default if q else FLOAT) for name, q in self.quantized_by_default.items()}
        names = list(self.layers)
        for pattern, bits in self.entries:
            matched = [name for name in names if name == pattern or re.fullmatch(pattern, name)]
            if not matched:
                raise LayerBitsError("--layer-bits {}={}: {!r} matches no layer; the layers are {}".format(
                    pattern, bits_text(bits), pattern, ", ".join(names)))
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
        return {name: bits_text(bits) for name, bits in self.layers.items()}
