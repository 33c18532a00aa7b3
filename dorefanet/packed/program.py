"""The layer program of a packed model: a list of small JSON-able ops the engine interprets.

A model's program is not written by hand: :class:`ProgramBuilder` derives it
from the model's one description of its layers (``network(net, x)``, see
:mod:`dorefanet.builder`), which TensorFlow builds too.  The exactness tests
run both on the same weights.

Every op reads the register ``src`` (default ``"x"``) and writes ``dst``
(default ``"x"``); only residual networks need other registers.  Maps are NHWC.

* ``normalize``: ``(float32(x) - mean) / std`` (``mean`` omitted when all zero);
* ``conv`` / ``fc``: a layer's weights ``<layer>/...``; its real-valued output ``z``
  becomes ``z * scale + shift`` when the file has ``<layer>/scale`` /
  ``<layer>/shift`` (a bias and a following batch norm, folded);
* ``affine``: a batch norm on its own, ``x * <layer>/scale + <layer>/shift``;
* ``maxpool`` / ``avgpool``, ``pad``, ``gap`` (global average), ``scale``;
* ``relu``, ``clip`` (to [0, 1]), ``activate`` (clip, then quantize to ``bits``);
* ``add`` (sum of the registers in ``src``), ``softmax``.
"""

from dorefanet.builder import Builder

__all__ = ["normalize", "conv", "fc", "affine", "maxpool", "avgpool", "pad", "relu", "clip", "activate",
           "gap",
           "scale", "add", "softmax", "OPS", "validate_program", "ProgramBuilder", "layer_inputs", "same_pads"]


def _op(kind, src=None, dst=None, **fields):
    op = {"op": kind}
    op.update({k: v for k, v in fields.items() if v is not None})
    if src is not None:
        op["src"] = src
    if dst is not None:
        op["dst"] = dst
    return op


def normalize(mean, std, **reg):
    """``(float32(x) - mean) / std``, per BGR channel; ``std`` may be one number."""
    mean = [float(v) for v in mean]
    std = [float(v) for v in std] if isinstance(std, (list, tuple)) else [float(std)]
    return _op("normalize", mean=mean if any(mean) else None, std=std, **reg)


def conv(layer, out, kernel, stride=1, padding="SAME", groups=1, quantized=True, bias=False, bn=None, **reg):
    """A 2-D convolution named ``layer`` (TensorFlow semantics); ``bn`` names the batch norm folded after it.

    ``padding``: ``"SAME"``, ``"VALID"``.  ``quantized``: whether ``fw`` applies to its weights.
    """
    kernel = [int(kernel), int(kernel)] if isinstance(kernel, int) else [int(k) for k in kernel]
    return _op("conv", layer=layer, out=int(out), kernel=kernel, stride=int(stride), padding=padding,
               groups=int(groups), quantized=bool(quantized), bias=bool(bias), bn=bn, **reg)


def fc(layer, out, quantized=True, bias=False, bn=None, flatten="hwc", **reg):
    """A fully-connected layer; ``flatten`` is the order its ``[in, out]`` weight rows expect (hwc or chw)."""
    return _op("fc", layer=layer, out=int(out), quantized=bool(quantized), bias=bool(bias), bn=bn, flatten=flatten,
               **reg)


def affine(layer, **reg):
    """The batch norm ``layer`` applied on its own (not right after a convolution)."""
    return _op("affine", layer=layer, **reg)


def maxpool(size, stride, padding="VALID", **reg):
    return _op("maxpool", size=int(size), stride=int(stride), padding=padding, **reg)


def avgpool(size, stride, padding="VALID", **reg):
    return _op("avgpool", size=int(size), stride=int(stride), padding=padding, **reg)


def pad(before, after, mode="constant", **reg):
    """Pad height and width by ``before`` / ``after``; ``mode`` is ``constant`` (zeros) or ``symmetric``."""
    return _op("pad", before=int(before), after=int(after), mode=mode, **reg)


def relu(**reg):
    return _op("relu", **reg)


def clip(**reg):
    return _op("clip", **reg)


def activate(bits, **reg):
    """``clip(x, 0, 1)``, then ``round(x * n) / n`` with ``n = 2^bits - 1`` (no quantization for 32)."""
    return _op("activate", bits=int(bits), **reg)


def gap(**reg):
    return _op("gap", **reg)


def scale(by, **reg):
    return _op("scale", by=float(by), **reg)


def add(*sources, dst=None):
    return _op("add", src=list(sources), dst=dst)


def softmax(**reg):
    return _op("softmax", **reg)


#: op name -> the fields it must have (besides ``op``, ``src``, ``dst``).
OPS = {
    "normalize": ("std",), "conv": ("layer", "out", "kernel", "stride", "padding", "groups", "quantized"),
    "fc": ("layer", "out", "quantized", "flatten"), "affine": ("layer",), "maxpool": ("size", "stride", "padding"),
    "avgpool": ("size", "stride", "padding"), "pad": ("before", "after", "mode"), "relu": (), "clip": (),
    "activate": ("bits",), "gap": (), "scale": ("by",), "add": (), "softmax": (),
}


def validate_program(program, where):
    """Raise ``ValueError`` (naming ``where``) unless ``program`` is a list of known, complete ops."""
    if not isinstance(program, list) or not program:
        raise ValueError("{}: the program must be a non-empty list of ops".format(where))
    for i, op in enumerate(program):
        kind = op.get("op") if isinstance(op, dict) else None
        if kind not in OPS:
            raise ValueError("{}: op {} is {!r}; expected one of {}".format(where, i, kind, ", ".join(sorted(OPS))))
        missing = [f for f in OPS[kind] if f not in op]
        if missing:
            raise ValueError("{}: op {} ({}) lacks {}".format(where, i, kind, ", ".join(missing)))
        if kind in ("maxpool", "avgpool", "conv") and op["padding"] not in ("SAME", "VALID"):
            raise ValueError("{}: op {} ({}) has padding {!r}; expected SAME or VALID".format(
                where, i, kind, op["padding"]))


class _Record:
    """One recorded op: the op, the maps it reads and the map it writes."""

    def __init__(self, op, inputs):
        self.op, self.inputs, self.out = op, inputs, _Value(self)


class _Value:
    """A map of the program being built; ``record`` wrote it (``None`` for the input image)."""

    def __init__(self, record=None):
        self.record = record
        self.folded = False   # its batch norm was folded into its producer: the pre-norm map is not kept


class ProgramBuilder(Builder):
    """The builder (:mod:`dorefanet.builder`) that writes a packed-engine program.

    Ops are recorded on values (one per map), then :meth:`program` assigns
    registers: a map goes to ``x`` unless ``x`` still holds a map that a later
    op reads (a residual shortcut), and then to the first free of ``r1``, ``r2``,
    ...  A batch norm right after a ``conv`` / ``fc`` whose output nothing else
    reads is folded into it (``bn``); any other is an ``affine`` op.
    """

    def __init__(self, plan, activation_at_32="relu"):
        super().__init__(plan)
        self.activation_at_32 = activation_at_32
        self._records = []

    def program(self, network, mean, std):
        """The program of ``network(self, input)``: input normalisation, the layers, softmax."""
        x = self._emit(normalize(mean, std), _Value())
        self._emit(softmax(), network(self, x))
        return self._allocate_registers()

    def _emit(self, op, *inputs):
        for value in inputs:
            if value.folded:
                raise ValueError("{} reads the output of {} before its batch norm {}, which is folded into the "
                                 "layer".format(op["op"], value.record.op["layer"], value.record.op["bn"]))
        record = _Record(op, inputs)
        self._records.append(record)
        return record.out

    def _allocate_registers(self):
        last_use = {value: i for i, record in enumerate(self._records) for value in record.inputs}
        register = {self._records[0].inputs[0]: "x"}
        live = {"x"}
        program = []
        for i, record in enumerate(self._records):
            sources = [register[v] for v in record.inputs]
            live.difference_update(register[v] for v in record.inputs if last_use[v] == i)
            dst = "x" if "x" not in live else next(r for r in ("r{}".format(k) for k in range(1, i + 2))
                                                    if r not in live)
            live.add(dst)
            register[record.out] = dst
            op = dict(record.op)
            if op["op"] == "add":
                op["src"] = sources
            elif sources[0] != "x":
                op["src"] = sources[0]
            if dst != "x":
                op["dst"] = dst
            program.append(op)
        return program

    # ------------------------------------------------------------ layers with weights
    def conv(self, name, x, out, kernel, stride=1, padding="SAME", groups=1, quantized=True, bias=False):
        name = self._name(name)
        return self._emit(conv(name, out, kernel, stride=stride, padding=padding, groups=groups,
                               quantized=self.plan.quantized(name), bias=bias), x)

    def fc(self, name, x, out, quantized=True, bias=False, flatten="hwc"):
        name = self._name(name)
        return self._emit(fc(name, out, quantized=self.plan.quantized(name), bias=bias, flatten=flatten), x)

    def bn(self, name, x):
        record = x.record
        read = any(x in r.inputs for r in self._records)
        if record is None or record.op["op"] not in ("conv", "fc") or "bn" in record.op or read:
            return self._emit(affine(self._name(name)), x)
        record.op["bn"] = self._name(name)
        x.folded = True
        record.out = _Value(record)
        return record.out

    # ------------------------------------------------------------ activations
    def _float_activation(self):
        return relu() if self.plan.float_activation(self.activation_at_32) == "relu" else clip()

    def nonlin(self, x):
        bits = self._next_activation_bits()
        return self._emit(activate(bits) if bits != 32 else self._float_activation(), x)

    def activate(self, x):
        bits = self._next_activation_bits()
        if bits == 32 and self.activation_at_32 == "relu":
            return self._emit(self._float_activation(), x)
        return self._emit(activate(bits), x)   # activate(32) is a clip

    # ------------------------------------------------------------ the rest
    def maxpool(self, name, x, size, stride=None, padding="VALID"):
        return self._emit(maxpool(size, stride or size, padding), x)

    def avgpool(self, name, x, size, stride=None, padding="VALID"):
        return self._emit(avgpool(size, stride or size, padding), x)

    def gap(self, name, x):
        return self._emit(gap(), x)

    def pad(self, x, before, after, mode="constant"):
        return self._emit(pad(before, after, mode=mode), x)

    def dropout(self, name, x, rate):
        return x   # the identity at inference

    def scale(self, x, by):
        return self._emit(scale(by), x)

    def add(self, a, b):
        return self._emit(add(), a, b)


def same_pads(size, kernel, stride):
    """TensorFlow's SAME padding of one axis: ``(before, after)``, the odd one after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _window_out(size, kernel, stride, padding):
    return -(-size // stride) if padding == "SAME" else (size - kernel) // stride + 1


def layer_inputs(program, input_shape, kinds=("conv", "fc")):
    """``[(op, shape)]``: each ``conv`` / ``fc`` op (or each op of ``kinds``) and the shape of the map it reads.

    ``input_shape`` is ``(height, width, channels)`` of the images; shapes are
    HWC for maps and ``(n,)`` once flattened, whichever register they travel in.
    """
    shapes, found = {"x": tuple(input_shape)}, []
    for op in program:
        kind = op["op"]
        src = op.get("src", "x")
        shape = shapes[src[0] if isinstance(src, list) else src]
        if kind in kinds:
            found.append((op, shape))
        if kind == "conv":
            (kh, kw), stride = op["kernel"], op["stride"]
            shape = (_window_out(shape[0], kh, stride, op["padding"]), _window_out(shape[1], kw, stride, op["padding"]),
                     op["out"])
        elif kind in ("maxpool", "avgpool"):
            size, stride = op["size"], op["stride"]
            shape = (_window_out(shape[0], size, stride, op["padding"]),
                     _window_out(shape[1], size, stride, op["padding"]), shape[2])
        elif kind == "pad":
            grow = op["before"] + op["after"]
            shape = (shape[0] + grow, shape[1] + grow, shape[2])
        elif kind == "fc":
            shape = (op["out"],)
        elif kind == "gap":
            shape = (shape[-1],)
        shapes[op.get("dst", "x")] = shape
    return found
