"""The rewrites of a program before the engine runs it: named passes, applied in the order of :data:`PASSES`.

A program (:mod:`.program`) lists what the TensorFlow graph computes, op by op.  Each pass replaces
neighbouring ops by one op that computes the same float32 values in fewer passes over full maps, or marks
ops that the engine runs as one step; none changes a value, so the engine's output is the op-by-op program's
to the bit (``tests/test_packed_passes.py`` runs each pass's model with and without it).

A pass is ``rewrite(program, layers, affines) -> program``: a new list, in which the ops it leaves alone are
the same dicts.  ``layers`` and ``affines`` are the loaded model's (``PackedModel.layers``, ``.affines``), for
the passes whose exactness depends on the weights.  Tracing runs the program as it is: the trace needs each
``activate``'s float input.
"""
import math

import numpy as np

__all__ = ["PASSES", "apply", "input_scale", "merge_pad_maxpool", "fold_input_scale", "merge_normalize_pad",
           "merge_affine_activate", "merge_affine_clip", "merge_gap_scale", "merge_clip_fc", "fuse_activate"]


def _chained(first, second):
    """Whether ``second`` reads only ``first``'s result and overwrites it (nothing else reads that map)."""
    dst = first.get("dst", "x")
    return second.get("src", "x") == dst and second.get("dst", "x") == dst


def _merge_pairs(program, merge):
    """``program`` with each pair ``(op, next)`` for which ``merge(op, next)`` gives an op replaced by that op,
    left to right (a merged op is not merged again with the op after it)."""
    out = []
    i = 0
    while i < len(program):
        merged = merge(program[i], program[i + 1]) if i + 1 < len(program) else None
        if merged is None:
            out.append(program[i])
            i += 1
        else:
            out.append(merged)
            i += 2
    return out


def _float32_affine(affines, layer):
    """Whether the batch norm ``layer``'s scale and shift are float32 (or absent), as the one-pass kernels take
    them; numpy's product and sum would round wider ones differently."""
    return all(a is None or a.dtype == np.float32 for a in affines[layer])


def merge_pad_maxpool(program, layers, affines):
    """``pad`` (symmetric, 1 on every side), ``maxpool`` (VALID, size >= 2) -> a max pooling with 1 pixel of
    padding that never wins (ResNet's stem): exact because a mirrored border pixel is a copy of a pixel in the
    same window, so it can never change a maximum."""
    def merge(op, nxt):
        if (op["op"] == "pad" and nxt["op"] == "maxpool" and op["mode"] == "symmetric"
                and op["before"] == op["after"] == 1 and nxt["padding"] == "VALID" and nxt["size"] >= 2
                and _chained(op, nxt)):
            return dict(nxt, pads=[1, 1, 1, 1], src=op.get("src", "x"))
        return None

    return _merge_pairs(program, merge)


def input_scale(normalize, conv, layers):
    """``1 / std`` if the float convolution ``conv`` can take ``normalize``'s input as it is, with its weights
    multiplied by ``1 / std``; else None.

    That is exact where the normalisation is a division by one power of two (SVHN's ``x / 256``) with no
    mean: ``x * (w / 2^k)`` and ``(x / 2^k) * w`` are the same real number, so every fused multiply-add of
    the convolution rounds the same sum, as long as no scaled weight falls below float32's smallest
    normal number (checked).
    """
    if (normalize["op"] != "normalize" or conv["op"] != "conv" or conv["quantized"] or "pad" in normalize
            or not _chained(normalize, conv)
            or np.any(np.ravel(0.0 if normalize.get("mean") is None else normalize["mean"]) != 0)):
        return None
    stds = {float(v) for v in np.ravel(normalize["std"])}
    if len(stds) != 1:
        return None
    std = stds.pop()
    layer = layers.get(conv["layer"])
    if std <= 0 or math.frexp(std)[0] != 0.5 or layer is None or layer.codes is not None:
        return None
    scaled = np.abs(layer.float_w * np.float32(1 / std))
    if np.any((scaled != 0) & (scaled < np.finfo(np.float32).tiny)):
        return None
    return 1 / std


def fold_input_scale(program, layers, affines):
    """``normalize`` (by one power of two, no mean), float ``conv`` -> the convolution alone with ``input_scale``:
    its weights take over the division (SVHN's input), which saves a pass over the input; exact where
    :func:`input_scale` says so."""
    def merge(op, nxt):
        scale = input_scale(op, nxt, layers)
        return None if scale is None else dict(nxt, input_scale=scale, src=op.get("src", "x"))

    return _merge_pairs(program, merge)


def merge_normalize_pad(program, layers, affines):
    """``normalize``, ``pad`` (constant) -> a normalisation that writes into the zero-padded map (ResNet's input):
    exact because the padding's zeros are written, not computed, and the other values are the same
    normalisation's."""
    def merge(op, nxt):
        if (op["op"] == "normalize" and nxt["op"] == "pad" and nxt["mode"] == "constant" and "pad" not in op
                and _chained(op, nxt)):
            return dict(op, pad=[nxt["before"], nxt["after"]])
        return None

    return _merge_pairs(program, merge)


def merge_affine_activate(program, layers, affines):
    """``affine``, ``activate`` (1..8 bits) -> ``affine_activate``: the batch norm and the quantizing of each value
    in one pass with no float map stored; exact because the pass computes the same float32 product and sum
    (float32 scale and shift, no fused multiply-add) and quantizes that value."""
    def merge(op, nxt):
        if (op["op"] == "affine" and nxt["op"] == "activate" and 1 <= nxt["bits"] <= 8 and _chained(op, nxt)
                and _float32_affine(affines, op["layer"])):
            return dict(op, op="affine_activate", bits=nxt["bits"])
        return None

    return _merge_pairs(program, merge)


def merge_affine_clip(program, layers, affines):
    """``affine``, ``clip`` -> ``affine_clip``, the batch norm and the 32-bit activation in one pass (ResNet's
    ``lastbn``): exact because it computes the same float32 product, sum and clip per value."""
    def merge(op, nxt):
        if (op["op"] == "affine" and nxt["op"] == "clip" and _chained(op, nxt)
                and _float32_affine(affines, op["layer"])):
            return dict(op, op="affine_clip")
        return None

    return _merge_pairs(program, merge)


def merge_gap_scale(program, layers, affines):
    """``gap``, ``scale`` -> a ``gap`` that multiplies its means (ResNet's tail, where an op's cost is mostly its
    code and data brought back into cache after the convolutions): exact because it multiplies the same float32
    means by the same float32 factor."""
    def merge(op, nxt):
        if op["op"] == "gap" and nxt["op"] == "scale" and "by" not in op and _chained(op, nxt):
            return dict(op, by=nxt["by"])
        return None

    return _merge_pairs(program, merge)


def merge_clip_fc(program, layers, affines):
    """``clip``, float ``fc`` -> an ``fc`` that clips its input while copying it (the last layer of all three
    networks): exact because the layer multiplies the same clipped float32 values."""
    def merge(op, nxt):
        if op["op"] == "clip" and nxt["op"] == "fc" and not nxt["quantized"] and _chained(op, nxt):
            return dict(nxt, clip_input=True, src=op.get("src", "x"))
        return None

    return _merge_pairs(program, merge)


def _fused_span(program, i):
    """How many ops after op ``i`` it runs fused with: 1 for ``activate``, 2 for ``maxpool, activate``; else 0."""
    if program[i]["op"] not in ("conv", "fc", "maxpool"):
        return 0
    dst = program[i].get("dst", "x")
    for span in (1, 2):
        if i + span >= len(program):
            return 0
        nxt = program[i + span]
        # each op must read the previous result and overwrite it: nothing else reads the float map
        if nxt.get("src", "x") != dst or nxt.get("dst", "x") != dst:
            return 0
        if nxt["op"] == "activate":
            return span if 1 <= nxt["bits"] <= 8 else 0
        if nxt["op"] != "maxpool" or program[i]["op"] != "conv":
            return 0
    return 0


def fuse_activate(program, layers, affines):
    """A ``conv`` / ``fc`` / ``maxpool`` followed by a quantizing ``activate`` (1..8 bits), for a ``conv`` possibly
    with a ``maxpool`` in between, gets ``fused`` = how many ops after it the engine runs with it as one step,
    the codes written straight from the float32 results (no float map stored): exact because the codes are the
    quantizer's of the same float32 values, and quantizing is monotone, so it commutes with a max pooling."""
    out = list(program)
    i = 0
    while i < len(program):
        span = _fused_span(program, i)
        if span:
            out[i] = dict(program[i], fused=span)
        i += span + 1
    return out


#: The passes the engine applies, in this order.  Where the second op of one pass's pair is the first of
#: another's (``affine``, ``clip``, ``fc``), the earlier pass takes the pair; the fusion comes last, as it
#: groups the merged ops.
PASSES = (merge_pad_maxpool, fold_input_scale, merge_normalize_pad, merge_affine_activate, merge_affine_clip,
          merge_gap_scale, merge_clip_fc, fuse_activate)


def apply(program, layers, affines, passes=None):
    """``program`` rewritten by ``passes`` (default: :data:`PASSES` as it is at the call) one after the other."""
    for rewrite in PASSES if passes is None else passes:
        program = rewrite(program, layers, affines)
    return program
