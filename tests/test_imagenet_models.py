"""The AlexNet and ResNet-18 graphs: names and shapes (data/zoo_spec.json), layouts, fc0 flatten order,
quantize-which-layer rule, preprocessing, loss and a training step.

AlexNet's fully-connected layers are large, so graphs that are run use batches of 1-2 and small images
(96x96 gives AlexNet a 2x2 final map, which is enough to test the flatten order; ResNet-18's shapes do
not depend on the image size).
"""
import json
import os
import re

import numpy as np
import pytest

from conftest import ROOT, load_script
from dorefanet import network
from dorefanet.cli import Bits
from dorefanet.tf_setup import tf
from dorefanet.driver import make_model  # noqa: E402
from tensorpack.tfutils.tower import TowerContext

from dorefanet.checkpoints import build_inference_graph

alexnet = load_script("alexnet-dorefa.py")
resnet = load_script("resnet-dorefa.py")

with open(os.path.join(ROOT, "data", "zoo_spec.json")) as _f:
    ZOO_SPEC = json.load(_f)

SCRIPTS = {"alexnet": alexnet, "resnet": resnet}
SMALL = {"alexnet": 96, "resnet": 64}


def parse_bits(text):
    return tuple(part if part == "t" else int(part) for part in text.split(","))


def variable_shapes(graph):
    return {v.op.name: v.shape.as_list() for v in graph.get_collection(tf.GraphKeys.GLOBAL_VARIABLES)}


def inference_graph(kind, bits, data_format, image_size=224):
    graph = tf.Graph()
    with graph.as_default():
        tf.set_random_seed(7)
        build_inference_graph(make_model(SCRIPTS[kind], bits, data_format, image_size))
    return graph


@pytest.mark.parametrize("script", [alexnet, resnet])
def test_a_model_without_tensorflow_is_the_same_model(script):
    from dorefanet.tf_model import TrainableModel

    bare, full = make_model(script, tensorflow=False), make_model(script)
    assert type(bare).__name__ == "Model" and isinstance(full, TrainableModel)
    assert bare.layer_plan.table() == full.layer_plan.table() and bare.packed_program() == full.packed_program()
    assert list(bare.input_shape) == full.inputs()[0].shape.as_list()[1:]
    assert bare.input_dtype == full.inputs()[0].dtype.name


# ---------------------------------------------------------------- names and shapes
SPEC_CASES = [(key.split("-")[0], key.split("-")[1], key, "channels_first") for key in sorted(ZOO_SPEC)]
SPEC_CASES += [("alexnet", "1,2,32", "alexnet-1,2,6", "channels_first"),
               ("alexnet", "1,2,4", "alexnet-1,2,6", "channels_first"),
               ("alexnet", "1,2,6", "alexnet-1,2,6", "channels_last"),
               ("alexnet", "t,32,32", "alexnet-t,32,32", "channels_last"),
               ("resnet", "1,4,32", "resnet-1,4,32", "channels_last")]


@pytest.mark.parametrize("kind, bits, key, data_format", SPEC_CASES)
def test_variables_match_zoo_spec(kind, bits, key, data_format):
    shapes = variable_shapes(inference_graph(kind, parse_bits(bits), data_format))
    expected = ZOO_SPEC[key]
    assert sorted(set(expected) - set(shapes)) == [], "missing"
    assert sorted(set(shapes) - set(expected)) == [], "extra"
    assert {n: s for n, s in shapes.items() if s != expected[n]} == {}, "mis-shaped"


@pytest.mark.parametrize("kind, dtype", [("alexnet", tf.uint8), ("resnet", tf.float32)])
def test_stable_tensor_names(kind, dtype):
    graph = inference_graph(kind, (1, 2, 6) if kind == "alexnet" else (1, 4, 32), "channels_last", SMALL[kind])
    image = graph.get_tensor_by_name("input:0")
    assert image.dtype == dtype and image.shape.as_list() == [None, SMALL[kind], SMALL[kind], 3]
    assert graph.get_tensor_by_name("label:0").dtype == tf.int32
    assert graph.get_tensor_by_name("output:0").shape.as_list() == [None, 1000]
    assert graph.get_tensor_by_name("output:0").op.type == "Softmax"
    for name in ("wrong-top1:0", "wrong-top5:0"):
        tensor = graph.get_tensor_by_name(name)
        assert tensor.dtype == tf.float32 and tensor.shape.as_list() == [None]


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="data_format"):
        make_model(alexnet, (1, 2, 6), "NCWH")
    with pytest.raises(ValueError, match="activation bit width"):
        make_model(resnet, (1, 0, 32))
    model = make_model(alexnet, Bits(1, 2, 6), "NHWC")
    assert model.bits == (1, 2, 6) and model.data_format == "channels_last"


# ---------------------------------------------------------------- which layers are quantized
@pytest.mark.parametrize("kind, first, last", [("alexnet", "conv0", "fct"), ("resnet", "conv1", "fct")])
def test_quantize_rule(monkeypatch, kind, first, last):
    """fw on every */W but the first and last layer's; fg right after each quantized layer."""
    quantized, gradient_quantized = [], []
    real = network.get_dorefa

    def recording_get_dorefa(*bits):
        fw, fa, fg = real(*bits)

        def rec_fw(v):
            quantized.append(v.op.name)
            return fw(v)

        def rec_fg(x):
            gradient_quantized.append(x.op.name.split("/")[-2])
            return fg(x)

        return rec_fw, fa, rec_fg

    monkeypatch.setattr(network, "get_dorefa", recording_get_dorefa)
    bits = (1, 2, 6) if kind == "alexnet" else (1, 4, 32)
    inference_graph(kind, bits, "channels_last", SMALL[kind])
    spec = ZOO_SPEC["alexnet-1,2,6" if kind == "alexnet" else "resnet-1,4,32"]
    expected = sorted(n for n in spec if n.endswith("/W") and n.split("/")[0] not in (first, last))
    assert sorted(quantized) == expected
    assert sorted(gradient_quantized) == sorted(n.split("/")[-2] for n in expected)


# ---------------------------------------------------------------- preprocessing in the graph
@pytest.mark.parametrize("kind", ["alexnet", "resnet"])
def test_image_preprocess(kind):
    rng = np.random.RandomState(0)
    image = rng.randint(0, 256, size=(2, 64, 64, 3)).astype(np.uint8)
    with tf.Graph().as_default() as graph:
        build_inference_graph(make_model(SCRIPTS[kind], image_size=64))
        with tf.Session(graph=graph) as session:
            got = session.run("image_preprocess/truediv:0", {"input:0": image})
    if kind == "alexnet":  # BGR mean/std of model-zoo.md, by hand
        mean = np.array([0.406, 0.456, 0.485]) * 255
        std = np.array([0.225, 0.224, 0.229]) * 255
        expected = (image - mean) / std
    else:
        expected = image / 256.0
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- layouts
def random_values(shapes, seed):
    """Plausible random values for every variable: He-scaled weights, non-trivial batch-norm statistics."""
    rng = np.random.RandomState(seed)
    values = {}
    for name, shape in sorted(shapes.items()):
        leaf = name.split("/")[-1]
        if leaf == "W":
            fan_in = int(np.prod(shape[:-1]))
            values[name] = rng.randn(*shape) * np.sqrt(2.0 / fan_in)
        elif leaf in ("Wp", "Wn"):
            values[name] = rng.uniform(0.5, 1.5)
        elif leaf == "gamma":
            values[name] = rng.uniform(0.5, 1.5, shape)
        elif name.endswith("variance/EMA"):
            values[name] = rng.uniform(0.5, 1.5, shape)
        else:  # biases, beta, mean/EMA
            values[name] = rng.randn(*shape) * 0.1
    return {k: np.asarray(v, dtype=np.float32) for k, v in values.items()}


def run_graph(graph, values, fetches, image):
    with graph.as_default(), tf.Session(graph=graph) as sess:
        for v in tf.global_variables():
            v.load(values[v.op.name], sess)
        return sess.run(fetches, {"input:0": image})


def logits_name(graph):
    return graph.get_tensor_by_name("output:0").op.inputs[0].name


@pytest.mark.parametrize("kind, bits", [("alexnet", "32,32,32"), ("alexnet", "1,2,6"),
                                        ("resnet", "32,32,32"), ("resnet", "1,4,32")])
def test_channels_first_equals_channels_last(kind, bits):
    size = SMALL[kind]
    graphs = {fmt: inference_graph(kind, parse_bits(bits), fmt, size) for fmt in ("channels_first", "channels_last")}
    shapes = variable_shapes(graphs["channels_last"])
    assert shapes == variable_shapes(graphs["channels_first"])
    values = random_values(shapes, seed=1)
    image = np.random.RandomState(2).randint(0, 256, size=(2, size, size, 3))
    out = {fmt: run_graph(g, values, [logits_name(g), "output:0"], image) for fmt, g in graphs.items()}
    first, last = out["channels_first"], out["channels_last"]
    scale = np.abs(last[0]).max()
    assert scale > 1e-3  # a dead network would make the comparison vacuous
    # Quantized activations can in principle flip a level on round-off, so the quantized
    # cases get a looser (still layout-bug-revealing) tolerance.
    tol = 1e-4 if bits == "32,32,32" else 1e-3
    np.testing.assert_allclose(first[0], last[0], rtol=tol, atol=tol * scale)
    np.testing.assert_allclose(first[1], last[1], rtol=tol, atol=1e-6)


# ---------------------------------------------------------------- AlexNet fc0 flatten order
@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
@pytest.mark.parametrize("bits", ["32,32,32", "1,32,32"])
def test_alexnet_fc0_flattens_channels_first(data_format, bits):
    """fc0 = flatten_(c,h,w)(relu(pool4)) @ fw(W) + b, by numpy, in both layouts (BWN: sign(W) * mean|W|)."""
    graph = inference_graph("alexnet", parse_bits(bits), data_format, 96)
    values = random_values(variable_shapes(graph), seed=3)
    image = np.random.RandomState(4).randint(0, 256, size=(2, 96, 96, 3))
    pool4, fc0 = run_graph(graph, values, ["pool4/output:0", "fc0/output:0"], image)
    act = np.maximum(pool4, 0)  # A = 32: nonlin is relu and fa the identity
    if data_format == "channels_last":
        act = act.transpose(0, 3, 1, 2)
    assert act.shape == (2, 256, 2, 2)
    w = values["fc0/W"]
    if bits.startswith("1,"):
        w = np.where(w >= 0, 1.0, -1.0) * np.abs(w).mean()
    expected = act.reshape(2, -1) @ w + values["fc0/b"]
    np.testing.assert_allclose(fc0, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())



@pytest.mark.parametrize("data_format", ["channels_first", "channels_last"])
def test_alexnet_fc0_one_hot_weight_picks_chw_element(data_format):
    """Output unit 10 copies element (c, h, w) = (5, 0, 1) and unit 11 copies (5, 1, 0), positions that a
    (h, w, c) flatten would confuse."""
    graph = inference_graph("alexnet", (32, 32, 32), data_format, 96)
    values = random_values(variable_shapes(graph), seed=5)
    values["fc0/W"] = np.zeros_like(values["fc0/W"])
    values["fc0/b"] = np.zeros_like(values["fc0/b"])
    picks = [(5, 0, 1), (5, 1, 0)]
    for j, (c, h, w) in enumerate(picks):
        values["fc0/W"][c * 4 + h * 2 + w, 10 + j] = 1.0
    image = np.random.RandomState(6).randint(0, 256, size=(2, 96, 96, 3))
    pool4, fc0 = run_graph(graph, values, ["pool4/output:0", "fc0/output:0"], image)
    act = np.maximum(pool4, 0)
    chw = act if data_format == "channels_first" else act.transpose(0, 3, 1, 2)
    for j, (c, h, w) in enumerate(picks):
        np.testing.assert_allclose(fc0[:, 10 + j], chw[:, c, h, w], rtol=1e-6)
    assert not np.allclose(chw[:, 5, 0, 1], chw[:, 5, 1, 0])  # the two picks are distinguishable


# ---------------------------------------------------------------- training graph
@pytest.mark.parametrize("kind, bits, optimizer, lr", [
    ("alexnet", (1, 2, 6), tf.train.AdamOptimizer, 2e-4),
    ("resnet", (1, 4, 32), tf.train.MomentumOptimizer, 0.1)])
def test_training_step(kind, bits, optimizer, lr):
    """One optimizer step: the cost is cross-entropy + L2 on the pattern's variables, and weights change."""
    size = SMALL[kind]
    model = make_model(SCRIPTS[kind], bits, "channels_last", size)
    graph = tf.Graph()
    with graph.as_default():
        tf.set_random_seed(5)
        placeholders = [tf.placeholder(s.dtype, s.shape, s.name) for s in model.inputs()]
        with TowerContext("", is_training=True):
            cost = model.build_graph(*placeholders)
        opt = model.optimizer()
        assert isinstance(opt, optimizer)
        train_op = opt.minimize(cost)
        lr_var = [v for v in tf.global_variables() if v.op.name == "learning_rate"]
        assert len(lr_var) == 1 and not lr_var[0] in tf.trainable_variables()
        decayed = [v for v in tf.trainable_variables() if re.search(model.recipe["weight_decay_pattern"], v.op.name)]
        assert decayed
        rng = np.random.RandomState(6)
        feed = {"input:0": rng.randint(0, 256, size=(2, size, size, 3)), "label:0": np.array([3, 998])}
        with tf.Session(graph=graph) as sess:
            sess.run(tf.global_variables_initializer())
            assert np.isclose(sess.run(lr_var[0]), lr)
            xent, total, wd_vars, wrong1 = sess.run(
                ["xentropy-loss:0", cost, decayed, "wrong-top1:0"], feed)
            expected_wd = model.recipe["weight_decay"] * sum(float(np.sum(np.square(v, dtype=np.float64))) / 2 for v in wd_vars)
            assert np.isclose(total, xent + expected_wd, rtol=1e-5)
            assert wrong1.shape == (2,) and set(np.unique(wrong1)) <= {0.0, 1.0}
            before = sess.run(decayed[0])
            sess.run(train_op, feed)
            assert not np.allclose(before, sess.run(decayed[0]))
            assert np.isfinite(sess.run(cost, feed))
