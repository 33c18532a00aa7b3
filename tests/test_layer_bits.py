"""Bit widths per layer (--layer-bits): resolution, the per-layer quantizers against numpy, the packed engine
on mixed models against TensorFlow, and the command line (config.json, --load with no bit flags, errors)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, load_script
from dorefanet.bits import LayerBitsError, LayerPlan, parse_layer_bits
from dorefanet.tf_setup import tf
from dorefanet.driver import make_model  # noqa: E402

svhn = load_script("svhn-digit-dorefa.py")
alexnet = load_script("alexnet-dorefa.py")
resnet = load_script("resnet-dorefa.py")

#: the issue's example: 8-bit first layer, 2-bit conv1/conv2 with 8-bit gradients, 4-bit last layer
SVHN_MIXED = [("conv0", (8, 32, 32)), ("conv[12]", (2, 2, 8)), ("fc1", (4, 32, 32))]


def svhn_plan(default=(1, 2, 4), entries=()):
    return make_model(svhn, default, layer_bits=entries).layer_plan


# ------------------------------------------------------------------ resolution
def test_defaults_are_dorefa_for_quantized_layers_and_float_for_first_and_last():
    plan = svhn_plan()
    assert plan.layers["conv0"] == (32, 32, 32) and plan.layers["fc1"] == (32, 32, 32)
    assert all(plan.layers["conv%d" % i] == (1, 2, 4) for i in range(1, 7))
    assert not plan.mixed
    # conv1 reads the activation after pool0 at 2 bits; fc1 reads conv6's nonlin unquantized
    assert plan.activation_bits == [2, 2, 2, 2, 2, 2, 32]


def test_entries_apply_in_order_and_match_whole_names():
    plan = svhn_plan(entries=[("conv[1-6]", (2, 2, 8)), ("conv6", (1, 1, 32))])
    assert plan.layers["conv1"] == plan.layers["conv5"] == (2, 2, 8) and plan.layers["conv6"] == (1, 1, 32)
    assert plan.layers["conv0"] == (32, 32, 32)
    assert plan.mixed and plan.activation_bits == [2, 2, 2, 2, 2, 1, 32]
    with pytest.raises(LayerBitsError, match=r"--layer-bits conv=8,8,8: 'conv' matches no layer; the layers are "
                                             r"conv0, conv1, conv2, conv3, conv4, conv5, conv6, fc1"):
        svhn_plan(entries=[("conv", (8, 8, 8))])   # a regular expression must match a whole name


def test_conv0_with_quantized_input_is_refused():
    with pytest.raises(LayerBitsError, match="conv0 asks for A = 2, but conv0 reads the input image"):
        svhn_plan(entries=[("conv0", (1, 2, 4))])


def test_layers_reading_one_activation_must_agree_on_a():
    with pytest.raises(LayerBitsError, match="conv3blk1/shortcut and conv3blk1/c3x3a read the same activation but "
                                             "ask for A = 2 and 4"):
        make_model(resnet, (1, 4, 32), "channels_last", 64, [("conv3blk1/shortcut", (1, 2, 32))])
    plan = make_model(resnet, (1, 4, 32), "channels_last", 64, [("conv3blk1/(shortcut|c3x3a)", (1, 2, 32))]).layer_plan
    assert plan.layers["conv3blk1/shortcut"] == plan.layers["conv3blk1/c3x3a"] == (1, 2, 32)


@pytest.mark.parametrize("text, message", [("conv0", "expected PATTERN=W,A,G"), ("=1,2,4", "expected PATTERN=W,A,G"),
                                           ("conv0=1,2", "three comma-separated"), ("conv0=t,2,32", "TTQ"),
                                           ("conv0=0,32,32", "weight bit width"), ("c[=1,2,4", "regular expression")])
def test_bad_entries(text, message):
    with pytest.raises(ValueError, match=message):
        parse_layer_bits(text)


# ------------------------------------------------------------------ the quantizers of each layer
def _reference_weights(w, bits):
    w = w.astype(np.float64)
    if bits == 1:
        return np.where(w >= 0, 1.0, -1.0) * np.abs(w).mean()
    n = 2 ** bits - 1
    t = np.tanh(w)
    t = t / np.abs(t).max() * 0.5 + 0.5
    return 2 * np.round(t * n) / n - 1


def test_each_layer_is_quantized_at_its_own_widths(session):
    """Weights, activations and gradients of a mixed SVHN net, layer by layer, against numpy."""
    from tensorpack.tfutils.tower import TowerContext

    model = make_model(svhn, (1, 2, 4), layer_bits=SVHN_MIXED + [("conv4", (3, 4, 2))])
    image = tf.placeholder(tf.float32, [4, 40, 40, 3])
    label = tf.placeholder(tf.int32, [4])
    with TowerContext("", is_training=True):
        cost = model.build_graph(image, label)
    graph = session.graph
    session.run(tf.global_variables_initializer())
    layers = {"conv0": 8, "conv1": 2, "conv2": 2, "conv3": 1, "conv4": 3, "fc1": 4}
    kernels, layer_inputs, outputs, after_fg = {}, {}, {}, {}
    for name in layers:
        op = graph.get_operation_by_name(name + ("/MatMul" if name == "fc1" else "/Conv2D"))
        layer_inputs[name], kernels[name] = op.inputs[0], op.inputs[1]
        outputs[name] = graph.get_tensor_by_name(name + "/output:0")
    for name in ("conv1", "conv4"):
        after_fg[name] = [c for c in outputs[name].consumers() if c.type == "IdentityN"][0].outputs[0]
    rng = np.random.RandomState(0)
    feed = {image: rng.uniform(0, 255, (4, 40, 40, 3)).astype(np.float32), label: rng.randint(0, 10, 4)}
    names = sorted(layers)
    values = session.run({"w": [graph.get_tensor_by_name(n + "/W:0") for n in names],
                          "wq": [kernels[n] for n in names]}, feed)
    for name, w, wq in zip(names, values["w"], values["wq"]):
        np.testing.assert_allclose(wq, _reference_weights(w, layers[name]), atol=2e-6, err_msg=name)

    # activations: each layer reads clip(x) rounded to its own A (conv0 reads the image, fc1 a float map)
    reads = {"conv1": 2, "conv3": 2, "conv4": 4}
    for name, bits in reads.items():
        quantizer = layer_inputs[name].op
        assert quantizer.type == "QuantizeAndDequantizeV4" and quantizer.get_attr("num_bits") == bits, name
        before, after = session.run([quantizer.inputs[0], quantizer.outputs[0]], feed)
        n = 2 ** bits - 1
        np.testing.assert_allclose(after, np.round(np.clip(before, 0, 1) * n) / n, atol=1e-6, err_msg=name)
    assert layer_inputs["fc1"].op.type != "QuantizeAndDequantizeV4"

    # gradients: the gradient into conv1 (G = 8) and conv4 (G = 2) is the one arriving at its output,
    # max-normalised per sample and rounded (stochastically) to that layer's G bits
    for name, bits in (("conv1", 8), ("conv4", 2)):
        dy, dq = session.run(tf.gradients(cost, [after_fg[name], outputs[name]]), feed)
        n = 2 ** bits - 1
        m = np.abs(dy).reshape(4, -1).max(axis=1).reshape(4, 1, 1, 1)
        exact = (dy / m * 0.5 + 0.5) * n
        levels = (dq / (2 * m) + 0.5) * n
        np.testing.assert_allclose(levels, np.round(levels), atol=2e-3, err_msg=name)
        assert np.all(np.abs(levels - exact) <= 1 + 1e-3), name        # a neighbouring level of the exact value
        distinct = len(np.unique(np.round(levels)))
        # 4-bit levels also lie on the 8-bit grid: that conv1 gets 8 bits shows in how many levels it uses
        assert distinct <= n + 1 and (bits != 8 or distinct > 16), (name, distinct)


# ------------------------------------------------------------------ the packed engine on mixed models
def _engine_matches_graph(tmp_path, model, images):
    from dorefanet.checkpoints import save_npz
    from dorefanet.packed import load_packed, read_packed
    from dorefanet.packed.export import export_packed
    from dorefanet.synthetic_weights import calibrated_weights
    from packed_reference import compare_with_graph

    weights = calibrated_weights(model, images)
    npz, out = str(tmp_path / "m.npz"), str(tmp_path / "m.packed.npz")
    save_npz(weights, npz)
    export_packed(model, npz, out)
    header, _ = read_packed(out)
    assert header["layer_bits"] == model.layer_plan.table()
    for layer, bits in model.layer_plan.layers.items():
        kind = header["layers"][layer]["kind"]
        assert kind == {1: "binary", "t": "ternary", 32: "float"}.get(bits[0], "dorefa"), layer
    result = compare_with_graph(model, weights, images, load_packed(out))
    assert result.root_ties <= max(2, 1e-3 * result.activations), result
    assert result.argmax_equal == result.images, result
    return header


def test_mixed_svhn_engine_matches_graph(tmp_path):
    model = make_model(svhn, (1, 2, 4), layer_bits=SVHN_MIXED + [("conv3", ("t", 32, 32)), ("conv5", (3, 1, 32))])
    header = _engine_matches_graph(tmp_path, model, np.random.RandomState(3).uniform(0, 255, (32, 40, 40, 3))
                                   .astype(np.float32))
    assert header["layers"]["conv1"]["bits"] == 2 and header["layers"]["conv0"]["bits"] == 8
    # conv3 (TTQ) and fc1 read float activations (clipped: the model's A is 2), conv5 a 1-bit one
    assert [op.get("bits", op["op"]) for op in header["program"] if op["op"] in ("activate", "clip", "relu")] == \
        [2, 2, "clip", 2, 1, 2, "clip"]


def test_mixed_alexnet_engine_matches_graph(tmp_path):
    model = make_model(alexnet, (1, 2, 6), "channels_last", 224,
                                 [("conv0", (8, 32, 32)), ("conv[34]", (2, 2, 8)), ("fc0", (1, 4, 6)),
                                  ("fct", (8, 8, 32))])
    _engine_matches_graph(tmp_path, model, np.random.RandomState(4).uniform(0, 255, (4, 224, 224, 3))
                          .astype(np.uint8))


def test_mixed_resnet_engine_matches_graph(tmp_path):
    model = make_model(resnet, (1, 4, 32), "channels_last", 224,
                                 [("conv1", (8, 32, 32)), ("conv3blk.*", (2, 2, 32)), ("fct", (8, 32, 32))])
    _engine_matches_graph(tmp_path, model, np.random.RandomState(5).uniform(0, 255, (6, 224, 224, 3))
                          .astype(np.float32))


# ------------------------------------------------------------------ the command line
def _script(name, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, name)] + [str(a) for a in args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)


def _probabilities(out):
    return [[entry["prob"] for entry in json.loads(line)["top"]] for line in out.stdout.splitlines()]


@pytest.mark.slow
def test_mixed_svhn_trains_reloads_and_runs_packed(tmp_path):
    import cv2

    logdir = str(tmp_path / "run")
    flags = ["--dorefa", "1,2,4", "--layer-bits", "conv0=8,32,32", "conv[12]=2,2,8", "fc1=4,32,32"]
    done = _script("svhn-digit-dorefa.py", *flags, "--synthetic", "--epochs", 1, "--steps-per-epoch", 3,
                   "--workers", 0, "--logdir", logdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1].startswith("done: test error ")
    with open(os.path.join(logdir, "config.json")) as f:
        config = json.load(f)
    assert config["layer_table"]["conv0"] == "8,32,32" and config["layer_table"]["conv2"] == "2,2,8"
    assert config["layer_table"]["conv3"] == "1,2,4" and config["layer_table"]["fc1"] == "4,32,32"
    assert config["resume_key"]["layer_table"] == config["layer_table"]

    picture = str(tmp_path / "a.png")
    cv2.imwrite(picture, np.random.RandomState(0).randint(0, 256, (32, 32, 3)).astype(np.uint8))
    graph = _script("svhn-digit-dorefa.py", "--load", logdir, "--run", picture, "--json")   # no bit flags
    assert graph.returncode == 0, graph.stderr[-3000:]
    packed = str(tmp_path / "m.packed.npz")
    export = _script("svhn-digit-dorefa.py", "--load", logdir, "--export-packed", packed)
    assert export.returncode == 0, export.stderr[-3000:]
    engine = _script("svhn-digit-dorefa.py", "--load", packed, "--engine", "packed", "--run", picture, "--json")
    assert engine.returncode == 0, engine.stderr[-3000:]
    np.testing.assert_allclose(_probabilities(engine), _probabilities(graph), atol=1e-4)

    # flags that contradict the run or the file are refused, naming the layer
    conflict = _script("svhn-digit-dorefa.py", "--dorefa", "1,2,4", "--load", logdir, "--run", picture)
    assert conflict.returncode == 2
    assert conflict.stderr.strip().splitlines()[-1] == (
        "error: {} was trained with conv0 at 8,32,32, not 32,32,32 as these bit flags give; leave --dorefa and "
        "--layer-bits out to use the run's own".format(logdir))
    conflict = _script("svhn-digit-dorefa.py", *flags[:2], "--load", packed, "--engine", "packed", "--run", picture)
    assert conflict.returncode == 2 and "was packed with conv0 at 8,32,32, not 32,32,32" in conflict.stderr


@pytest.mark.slow
def test_layer_bits_errors_are_parser_errors():
    done = _script("svhn-digit-dorefa.py", "--layer-bits", "conv9=1,2,4", "--synthetic")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "svhn-digit-dorefa.py: error: --layer-bits conv9=1,2,4: 'conv9' matches no layer; the layers are conv0, "
        "conv1, conv2, conv3, conv4, conv5, conv6, fc1")


def test_ttq_on_one_layer_adds_its_scalars_only():
    from dorefanet.checkpoints import expected_variables

    names = expected_variables(make_model(svhn, (1, 2, 4), layer_bits=[("conv3", ("t", 32, 32))]))
    assert sorted(n for n in names if n.endswith(("/Wp", "/Wn"))) == ["conv3/Wn", "conv3/Wp"]


@pytest.mark.slow
@pytest.mark.parametrize("script, flags", [
    ("alexnet-dorefa.py", ["--layer-bits", "conv0=8,32,32", "fc0=2,4,8", "fct=4,32,32"]),
    ("resnet-dorefa.py", ["--layer-bits", "conv1=8,32,32", "conv3blk.*=2,2,8", "fct=8,32,32"])])
def test_mixed_imagenet_models_train_reload_and_run_packed(tmp_path, script, flags):
    """A few steps on --fake images, then --load with no bit flags, --export-packed and both engines on a picture."""
    import cv2

    logdir = str(tmp_path / "run")
    done = _script(script, *flags, "--fake", "--batch", 2, "--epochs", 1, "--steps-per-epoch", 2, "--workers", 0,
                   "--image-size", 64, "--logdir", logdir)
    assert done.returncode == 0, done.stderr[-3000:]
    picture = str(tmp_path / "a.png")
    cv2.imwrite(picture, np.random.RandomState(1).randint(0, 256, (80, 96, 3)).astype(np.uint8))
    packed = str(tmp_path / "m.packed.npz")
    export = _script(script, "--load", logdir, "--export-packed", packed, "--image-size", 64)
    assert export.returncode == 0, export.stderr[-3000:]
    graph = _script(script, "--load", logdir, "--run", picture, "--json", "--image-size", 64)
    engine = _script(script, "--load", packed, "--engine", "packed", "--run", picture, "--json", "--image-size", 64)
    assert graph.returncode == 0 and engine.returncode == 0, (graph.stderr[-2000:], engine.stderr[-2000:])
    np.testing.assert_allclose(_probabilities(engine), _probabilities(graph), atol=1e-4)
