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
match to 1e-4 in probability.
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
    n = len(images)
    diverged = np.zeros(n, bool)
    root_ties = activations = 0
    max_tie = 0.0
    for layer, ((scaled, codes, levels), g_scaled) in enumerate(zip(trace, graph_scaled)):
        g_scaled = np.asarray(g_scaled)
        assert g_scaled.shape == scaled.shape, "activation {}: shape {} vs graph {}".format(
            layer, scaled.shape, g_scaled.shape)
        activations += codes.size
        differs = (np.rint(g_scaled) != codes).reshape(n, -1)
        for i in np.flatnonzero(differs.any(axis=1) & ~diverged):
            g = g_scaled.reshape(n, -1)[i][differs[i]]
            distance = np.abs(g - np.floor(g) - 0.5) / levels
            assert distance.max() < TIE, (
                "image {}, activation {}: {} codes differ from the graph, one {:.2e} from a rounding boundary "
                "(graph {:.6f}, engine {:.6f} quantization steps): not a float tie".format(
                    i, layer, int(differs[i].sum()), float(distance.max()), float(g[distance.argmax()]),
                    float(scaled.reshape(n, -1)[i][differs[i]][distance.argmax()])))
            root_ties += int(differs[i].sum())
            max_tie = max(max_tie, float(distance.max()))
            diverged[i] = True
    clean = ~diverged
    diff = np.abs(p_engine - p_graph).max(axis=1)
    max_clean = float(diff[clean].max()) if clean.any() else 0.0
    assert max_clean <= PROB_TOL, "clean images differ by up to {:.2e} in probability".format(max_clean)
    return Comparison(n, int(clean.sum()), int(diverged.sum()), root_ties, activations, max_clean,
                      int((p_engine.argmax(1) == p_graph.argmax(1)).sum()), max_tie)
