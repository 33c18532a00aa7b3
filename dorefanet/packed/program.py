"""The layer program of a packed model: a list of small JSON-able ops the engine interprets.

Each script describes its network twice, side by side: as a TensorFlow graph
(for training) and as a program built from the constructors below (for the
packed engine).  The exactness tests run both on the same weights.

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

__all__ = ["normalize", "conv", "fc", "affine", "maxpool", "avgpool", "pad", "relu", "clip", "activate",
           "nonlin_relu_at_32", "activate_relu_at_32", "gap",
           "scale", "add", "softmax", "OPS", "validate_program"]


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


def nonlin_relu_at_32(bits):
    """``nonlin`` of the AlexNet and SVHN nets: ``relu`` when A is 32, else a clip to [0, 1]."""
    return relu() if bits == 32 else clip()


def activate_relu_at_32(bits):
    """``activate`` (``fa(nonlin(x))``) of the AlexNet and SVHN nets: ``relu`` when A is 32."""
    return relu() if bits == 32 else activate(bits)


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
