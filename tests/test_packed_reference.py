"""tests/packed_reference.py finds every quantized activation of a graph, on both quantizer paths."""
import numpy as np
import pytest

import dorefa
from conftest import load_script
from packed_reference import graph_outputs
from dorefanet.synthetic_weights import calibrated_weights
from dorefanet.driver import make_model  # noqa: E402

svhn = load_script("svhn-digit-dorefa.py")


@pytest.mark.parametrize("bits, activations", [((1, 2, 4), 6), ((8, 8, 8), 6), ((32, 32, 32), 0)])
def test_graph_outputs_sees_the_same_activations_on_both_quantizer_paths(monkeypatch, bits, activations):
    """The fused activations of quantize_clipped are found (and checked) like the plain graph's Round ops.

    The SVHN net quantizes 6 activations (after pool0, bn1, pool1, bn3, bn4, bn5).  Both graphs must give the
    same scaled values ``clip(v) * n`` and the same probabilities, bit for bit: quantize_clipped's forward
    value does not depend on the path.
    """
    model = make_model(svhn, bits)
    images = np.random.RandomState(3).uniform(0, 255, (8, 40, 40, 3)).astype(np.float32)
    weights = calibrated_weights(model, images)
    results = {}
    for use_xla in (True, False):
        monkeypatch.setattr(dorefa, "USE_XLA", use_xla)
        results[use_xla] = graph_outputs(model, weights, images)
    (p_xla, s_xla), (p_tf, s_tf) = results[True], results[False]
    assert len(s_xla) == len(s_tf) == activations
    for a, b in zip(s_xla, s_tf):
        np.testing.assert_array_equal(a, b)
        assert len(np.unique(np.rint(a))) > 1   # activations spread over levels: a meaningful comparison
    np.testing.assert_array_equal(p_xla, p_tf)
