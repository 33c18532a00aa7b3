"""``--export-packed``: turn a model's float weights into a packed file (needs TensorFlow).

The quantized weights are computed by the graph's own quantizer (``fw`` of
:mod:`dorefa`, run by TensorFlow), then stored as their integer codes and
checked to reproduce the graph's float32 values exactly.  Batch norms and
biases are folded into per-channel ``scale`` / ``shift`` maps.  Only this
module needs TensorFlow; reading and running a packed file do not.
"""
import os

import numpy as np

from .format import pack_weight_planes, write_packed

__all__ = ["PackedExportError", "packed_arrays", "packed_model", "export_packed", "BN_EPSILON"]

#: The batch norm epsilon of all three networks (docs/networks.md).
BN_EPSILON = 1e-4


class PackedExportError(ValueError):
    """The weights cannot be packed faithfully (one-line message)."""


def _graph_quantized(layer_w, weights):
    """``{layer: fw(W)}`` computed by TensorFlow with the graph's quantizer, for ``layer_w`` = ``{layer: W bits}``."""
    from dorefa import TERNARY, get_dorefa
    from dorefanet.tf_setup import tf
    from dorefanet.training import session_config

    with tf.Graph().as_default():
        tensors, assign, feed = {}, [], {}
        for layer, bit_w in layer_w.items():
            fw, _, _ = get_dorefa(bit_w, 32, 32)
            with tf.variable_scope(layer):
                # fed, not tf.constant: grappler would spend many seconds constant-folding big weights
                w = np.asarray(weights[layer + "/W"], np.float32)
                placeholder = tf.placeholder(tf.float32, w.shape)
                feed[placeholder] = w
                tensors[layer] = fw(placeholder)
        if TERNARY in layer_w.values():
            # ternarize created the trainable scalars <layer>/Wp and <layer>/Wn; give them the file's values
            for var in tf.global_variables():
                assign.append(tf.assign(var, np.float32(weights[var.op.name])))
        with tf.Session(config=session_config()) as sess:
            sess.run(tf.global_variables_initializer())
            sess.run(assign)
            return sess.run(tensors, feed)


def _codes(layer, bits, w, wq, weights):
    """``(kind, arrays)`` of one quantized layer: its planes and scalars, checked against the graph's ``wq``."""
    from dorefa import TERNARY

    f32 = np.float32
    if bits == TERNARY:
        # TTQ's masks are W > d and W < -d with d = 0.05 * max|W|, all exact float32 operations
        d = f32(np.abs(w).max()) * f32(0.05)
        pos, neg = w > d, w < -d
        wp, wn = f32(weights[layer + "/Wp"]), f32(weights[layer + "/Wn"])
        rebuilt = np.where(pos, wp, np.where(neg, -wn, f32(0)))
        kind, arrays = "ternary", {"planes": pack_weight_planes(np.stack([pos, neg])), "Wp": wp, "Wn": wn}
    elif bits == 1:
        E = f32(np.abs(wq).max())
        b = wq > 0
        rebuilt = np.where(b, E, -E)
        kind, arrays = "binary", {"planes": pack_weight_planes(b[np.newaxis]), "E": E}
    else:
        n = (1 << bits) - 1
        q = np.rint((wq.astype(np.float64) + 1.0) / 2.0 * n).astype(np.int64)
        # q / n is what the quantizer writes; TensorFlow's graph optimizer computes it as q * (1 / n).
        # Either float32 rendering identifies the same codes.
        divided = f32(2) * (q.astype(f32) / f32(n)) - f32(1)
        multiplied = f32(2) * (q.astype(f32) * (f32(1) / f32(n))) - f32(1)
        rebuilt = multiplied if np.array_equal(multiplied, wq) else divided
        planes = np.stack([(q >> i) & 1 for i in range(bits)])
        kind, arrays = "dorefa", {"planes": pack_weight_planes(planes)}
    if not np.array_equal(rebuilt, wq):
        bad = int(np.sum(rebuilt != wq))
        raise PackedExportError("{}/W: {} of its {} quantized weights cannot be represented as {} codes; the packed "
                                "file would not match the graph".format(layer, bad, wq.size, kind))
    return kind, arrays


def _folded(weights, op):
    """``(scale, shift)`` float32 vectors (or None) of a layer's bias and the batch norm after it."""
    layer = op["layer"]
    bias = np.asarray(weights[layer + "/b"], np.float64) if op.get("bias") else None
    bn = op.get("bn") if op["op"] != "affine" else layer
    if bn is None:
        return None, (bias.astype(np.float32) if bias is not None else None)
    gamma = np.asarray(weights[bn + "/gamma"], np.float64)
    beta = np.asarray(weights[bn + "/beta"], np.float64)
    mean = np.asarray(weights[bn + "/mean/EMA"], np.float64)
    var = np.asarray(weights[bn + "/variance/EMA"], np.float64)
    scale = gamma / np.sqrt(var + BN_EPSILON)
    shift = beta - mean * scale
    if bias is not None:
        shift = shift + bias * scale
    return scale.astype(np.float32), shift.astype(np.float32)


def packed_arrays(plan, program, weights, first_last_dtype="float32"):
    """``(layers, arrays)``: the header's layer specs and the file's arrays for ``program`` and ``weights``.

    ``plan`` (:class:`dorefanet.bits.LayerPlan`) gives each layer's W.
    """
    layer_ops = [op for op in program if op["op"] in ("conv", "fc")]
    layer_w = {op["layer"]: plan.layers[op["layer"]][0] for op in layer_ops if op["quantized"]}
    quantized = {layer: bits for layer, bits in layer_w.items() if bits != 32}
    graph_values = _graph_quantized(quantized, weights) if quantized else {}
    layers, arrays = {}, {}
    for op in layer_ops:
        name = op["layer"]
        w = np.asarray(weights[name + "/W"], np.float32)
        spec = {"shape": list(w.shape)}
        if name in graph_values:
            kind, fields = _codes(name, layer_w[name], w, graph_values[name], weights)
            spec["kind"] = kind
            if kind == "dorefa":
                spec["bits"] = int(layer_w[name])
        else:
            spec["kind"] = "float"
            fields = {"W": w.astype(first_last_dtype if not plan.quantized_by_default[name] else np.float32)}
        layers[name] = spec
        arrays.update({"{}/{}".format(name, k): v for k, v in fields.items()})
    for op in program:
        if op["op"] in ("conv", "fc", "affine"):
            scale, shift = _folded(weights, op)
            if scale is not None:
                arrays[op["layer"] + "/scale"] = scale
            if shift is not None:
                arrays[op["layer"] + "/shift"] = shift
    return layers, arrays


def packed_model(model, source, first_last_dtype="float32"):
    """``(header, arrays, float_bytes)`` of ``source`` read strictly for ``model``: the packed file's content, and the
    bytes of the float32 weights it was made from.

    ``model`` is the script's :class:`dorefanet.model.Model` (with TensorFlow: its variables are checked).
    """
    from dorefanet.checkpoints import check_weights, expected_variables, read_weights
    from dorefanet.tf_setup import tf

    weights = read_weights(source)
    check_weights(expected_variables(model), weights, source)
    program = model.packed_program()
    layers, arrays = packed_arrays(model.layer_plan, program, weights, first_last_dtype)
    height, width, channels = model.input_shape
    header = {"model": model.model_name, "bits": str(model.bits), "classes": int(program_classes(program)),
              "input": {"height": height, "width": width, "channels": channels, "dtype": model.input_dtype},
              "layers": layers, "program": program, "first_last_dtype": first_last_dtype,
              "source": os.path.basename(os.path.normpath(source)),
              "exported_by": "DoReFa-Net toolkit, TensorFlow {}".format(tf.__version__)}
    if model.layer_plan.mixed:
        header["layer_bits"] = model.layer_plan.table()   # only then: a --dorefa model's file is as it was
    float_bytes = sum(np.asarray(v).size * 4 for v in weights.values())
    return header, arrays, float_bytes


def export_packed(model, source, out, first_last_dtype="float32"):
    """``--export-packed``: read ``source`` strictly for ``model``, write the packed file ``out``, report sizes.

    ``model`` is the script's :class:`dorefanet.model.Model` (with TensorFlow: its variables are checked).
    """
    header, arrays, float_bytes = packed_model(model, source, first_last_dtype)
    write_packed(out, header, arrays)
    size = os.path.getsize(out)
    print("wrote {} ({} at --dorefa {}): {:.2f} MB, {:.1f}x smaller than its {:.2f} MB of float32 weights".format(
        out, model.model_name, header["bits"], size / 1e6, float_bytes / size, float_bytes / 1e6))


def program_classes(program):
    """The number of classes: the width of the program's last fully-connected layer."""
    return [op for op in program if op["op"] == "fc"][-1]["out"]
