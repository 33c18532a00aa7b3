"""Comparing the packed engine with the TensorFlow graph, activation by activation.

Float32 sums in a different order can put a pre-activation on the other side
of a rounding boundary (a tie within float error).  That one differing code
then changes everything after it, so whole-output tolerances cannot tell a
tie from a bug.  :func:`compare_with_graph` walks the quantized activations of
both in order and, per image, finds the first layer where the codes differ:
every code that differs there must be a tie in the graph's own values
(within ``TIE`` of a rounding boundary ``(k + 0.5) / n``, in activation units;
float32 sums of hundreds of terms and a batch norm can be that far off); anything
else is a real difference and fails.  Images with no differing code are "clean" and must
match to 1e-4 in probability.  :func:`compare_quantized` is that rule between any two runs (the engine and
ONNX Runtime in tests/test_onnx_export.py).
"""
from typing import NamedTuple

import numpy as np

from dorefanet.checkpoints import build_inference_graph
from dorefanet.tf_setup import tf

#: How close to a rounding boundary (in activation units, [0, 1]) a graph value must be for a differing code
#: to be a float tie.
TIE = 3e-5
#: Largest allowed probability difference on clean images.
PROB_TOL = 1e-4


class Comparison(NamedTuple):
    images: int
    clean: int          # images whose every activation code equals the graph's
    tie_images: int     # images that diverged at a rounding tie (then differ downstream)
    root_ties: int      # differing codes at the first divergence of each image
    activations: int    # quantized activations per batch, all layers
    max_clean_diff: float
    argmax_equal: int
    max_tie_distance: float   # farthest graph value from its boundary among the root ties (activation units)


def _activation_levels(op):
    """``n`` if ``op`` is quantize_clipped's fused quantizer, whose value is ``round(clip(v) * n) * float32(1/n)``,
    else None."""
    if op.type != "QuantizeAndDequantizeV4":
        return None
    assert not op.get_attr("signed_input") and op.get_attr("range_given"), op.name
    return np.float32(2 ** op.get_attr("num_bits") - 1)


def graph_outputs(model, weights, images):
    """The graph's probabilities and, per quantizing activation in creation order, its scaled input ``v * n``.

    Quantized activations come in two forms: ``quantize``'s (and the plain-TensorFlow ``quantize_clipped``'s)
    ``Round`` of a batch-shaped tensor, whose input is fetched; and the fused ``QuantizeAndDequantizeV4`` op of
    ``quantize_clipped``, which hides its rounding.  For the latter the op's input ``v`` is fetched and
    ``clip(v, 0, 1) * n`` recomputed in float32 (exact IEEE operations, so the value that the op rounds), and the
    op's own output must equal that value rounded half to even times float32(1/n) (bit for bit but for the sign
    of a zero): the engine is compared with the codes the graph computed.
    """
    with tf.Graph().as_default() as graph:
        image, _ = build_inference_graph(model)
        quantizers = [op for op in graph.get_operations()
                      if (op.type == "Round" or _activation_levels(op) is not None)
                      and op.inputs[0].shape.as_list()[0] is None]   # batch-shaped: activations
        fetches = [(op.inputs[0], op.outputs[0]) for op in quantizers]
        with tf.Session() as sess:
            for var in tf.global_variables():
                var.load(np.asarray(weights[var.op.name], np.float32), sess)
            probs, values = sess.run([graph.get_tensor_by_name("output:0"), fetches], {image: images})
        scaled = []
        for op, (inputs, outputs) in zip(quantizers, values):
            if op.type == "Round":
                scaled.append(inputs)
                continue
            n = _activation_levels(op)
            s = np.clip(inputs, np.float32(0), np.float32(1)).astype(np.float32) * n
            expected = (np.rint(s) * (np.float32(1) / n)).astype(np.float32)
            positive_zero = np.float32(0)   # -0.0 + 0.0 is +0.0: compares the bits of everything but a zero's sign
            np.testing.assert_array_equal((outputs + positive_zero).view(np.uint32),
                                          (expected + positive_zero).view(np.uint32),
                                          err_msg="{}: the graph's quantized activations are not "
                                          "round(clip(v) * n) * float32(1/n)".format(op.name))
            scaled.append(s)
    return probs, scaled


def compare_with_graph(model, weights, images, packed_model):
    """Run both on ``images``; raise ``AssertionError`` on any real difference; return a :class:`Comparison`."""
    p_graph, graph_scaled = graph_outputs(model, weights, images)
    trace = []
    p_engine = packed_model.predict(images, trace=trace)
    assert len(trace) == len(graph_scaled), "{} quantized activations in the engine, {} in the graph".format(
        len(trace), len(graph_scaled))
    return compare_quantized(p_graph, graph_scaled, p_engine, [codes for _, codes, _ in trace],
                             [levels for _, _, levels in trace], [scaled for scaled, _, _ in trace])


def compare_quantized(reference_probs, reference_scaled, probs, codes, levels, scaled=None, names=("graph", "engine"),
                      prob_tol=PROB_TOL):
    """The tie rule between two runs of one model on the same images (raise ``AssertionError`` on a real difference,
    return a :class:`Comparison`).

    Per quantizing activation, in order: ``reference_scaled`` the reference's own value ``v * n`` that it rounds,
    ``codes`` the other run's integer codes, ``levels`` n; ``scaled`` (optional) the other run's ``v * n``, for the
    messages only.  ``names``: what the two runs are called in them; ``prob_tol``: the clean images' tolerance.
    """
    n = len(probs)
    diverged = np.zeros(n, bool)
    root_ties = activations = 0
    max_tie = 0.0
    for layer, (g_scaled, layer_codes, layer_levels) in enumerate(zip(reference_scaled, codes, levels)):
        g_scaled = np.asarray(g_scaled)
        assert g_scaled.shape == layer_codes.shape, "activation {}: shape {} vs {} {}".format(
            layer, layer_codes.shape, names[0], g_scaled.shape)
        activations += layer_codes.size
        differs = (np.rint(g_scaled) != layer_codes).reshape(n, -1)
        for i in np.flatnonzero(differs.any(axis=1) & ~diverged):
            g = g_scaled.reshape(n, -1)[i][differs[i]]
            distance = np.abs(g - np.floor(g) - 0.5) / layer_levels
            other = (scaled[layer] if scaled is not None else layer_codes).reshape(n, -1)[i][differs[i]]
            assert distance.max() < TIE, (
                "image {}, activation {}: {} codes differ from the {}, one {:.2e} from a rounding boundary "
                "({} {:.6f}, {} {:.6f} quantization steps): not a float tie".format(
                    i, layer, int(differs[i].sum()), names[0], float(distance.max()), names[0],
                    float(g[distance.argmax()]), names[1], float(other[distance.argmax()])))
            root_ties += int(differs[i].sum())
            max_tie = max(max_tie, float(distance.max()))
            diverged[i] = True
    clean = ~diverged
    diff = np.abs(probs - reference_probs).max(axis=1)
    max_clean = float(diff[clean].max()) if clean.any() else 0.0
    assert max_clean <= prob_tol, "clean images differ by up to {:.2e} in probability".format(max_clean)
    return Comparison(n, int(clean.sum()), int(diverged.sum()), root_ties, activations, max_clean,
                      int((probs.argmax(1) == reference_probs.argmax(1)).sum()), max_tie)
