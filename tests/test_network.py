"""The one description of each network (dorefanet.network) and the packed program derived from it.

``tests/data/packed_programs.json`` holds the programs the three scripts wrote by hand before their
networks were described once (commit 04d6316, for nine bit settings each): the derived programs must be
those, op for op.  The SVHN net's and AlexNet's are equal as they are; ResNet-18's registers are now
allocated by the builder (``r1`` where the hand-written program said ``short`` or ``stem``), so there the
test compares what every op reads: the same ops reading the outputs of the same ops.  That the programs
compute what the TensorFlow graphs compute is ``tests/test_packed_engine.py``.
"""
import json
import os

import numpy as np
import pytest

from conftest import ROOT, load_script
from dorefanet.bits import LayerPlan
from dorefanet.packed.program import ProgramBuilder, validate_program
from dorefanet.tf_setup import tf
from dorefanet.driver import make_model  # noqa: E402

svhn = load_script("svhn-digit-dorefa.py")
alexnet = load_script("alexnet-dorefa.py")
resnet = load_script("resnet-dorefa.py")
cifar = load_script("cifar10-resnet-dorefa.py")

with open(os.path.join(ROOT, "tests", "data", "packed_programs.json")) as _f:
    HAND_WRITTEN = json.load(_f)


def parse_bits(text):
    return tuple(part if part == "t" else int(part) for part in text.split(","))


def model(kind, bits):
    if kind == "svhn":
        return make_model(svhn, bits)
    if kind == "alexnet":
        return make_model(alexnet, bits, "channels_last")
    if kind == "cifar":
        return make_model(cifar, bits)
    return make_model(resnet, bits, "channels_last")


def dataflow(program):
    """Each op without its registers, plus the indices of the ops whose outputs it reads (-1: the image)."""
    producer = {"x": -1}
    ops = []
    for i, op in enumerate(program):
        op = dict(op)
        src, dst = op.pop("src", "x"), op.pop("dst", "x")
        op["reads"] = [producer[r] for r in (src if isinstance(src, list) else [src])]
        producer[dst] = i
        ops.append(op)
    return ops, producer["x"]


@pytest.mark.parametrize("key", sorted(HAND_WRITTEN))
def test_derived_program_is_the_hand_written_one(key):
    kind, bits = key.split("-")
    program = model(kind, parse_bits(bits)).packed_program()
    validate_program(program, key)
    if kind == "resnet":
        assert dataflow(program) == dataflow(HAND_WRITTEN[key])
    else:
        assert program == HAND_WRITTEN[key]


def test_program_builder_registers_and_folding():
    """A toy residual net: the shortcut gets its own register, batch norms fold only where they can."""
    def network(net, x):
        x = net.conv("c0", x, 8, 3, quantized=False)
        x = net.activate(net.bn("bn0", x))                 # folds into c0
        short = net.conv("short", x, 8, 1)
        with net.scope("blk"):
            y = net.bn("bn1", net.activate(net.conv("c1", x, 8, 3)))   # after activate: an affine op
        x = net.add(short, y)
        return net.fc("fc", net.gap("gap", x), 10, quantized=False)

    program = ProgramBuilder(LayerPlan(network, (1, 2, 32))).program(network, (0, 0, 0), 256.0)
    assert [op["op"] for op in program] == ["normalize", "conv", "activate", "conv", "conv", "activate", "affine",
                                            "add", "gap", "fc", "softmax"]
    assert program[1]["bn"] == "bn0" and "bn" not in program[4]
    assert program[3]["layer"] == "short" and program[3]["dst"] == "r1"    # x is still read by blk/c1
    assert program[4]["layer"] == "blk/c1" and "src" not in program[4]     # x's last reader takes x over
    assert program[6]["layer"] == "blk/bn1"
    assert program[7]["src"] == ["r1", "x"] and "dst" not in program[7]
    assert all("src" not in op and "dst" not in op for op in program[8:])


def test_program_builder_refuses_a_map_it_folded_away():
    def network(net, x):
        z = net.conv("c0", x, 8, 3)
        y = net.bn("bn0", z)
        return net.add(y, z)     # z, the map before bn0, no longer exists in the packed program

    with pytest.raises(ValueError, match="reads the output of c0 before its batch norm bn0"):
        ProgramBuilder(LayerPlan(network, (1, 32, 32))).program(network, (0, 0, 0), 1.0)


@pytest.mark.parametrize("data_format, flatten, transposed", [
    ("channels_last", "chw", "to_chw"), ("channels_first", "hwc", "to_hwc"),
    ("channels_last", "hwc", None), ("channels_first", "chw", None)])
def test_graph_builder_flattens_in_the_order_the_weights_expect(data_format, flatten, transposed):
    from dorefanet.network import GraphBuilder

    with tf.Graph().as_default() as graph:
        shape = [2, 3, 4, 5] if data_format == "channels_first" else [2, 4, 5, 3]
        x = tf.compat.v1.placeholder(tf.float32, shape)
        def network(net, x):
            return net.fc("fc", x, 7, quantized=False, flatten=flatten)

        GraphBuilder(LayerPlan(network, (32, 32, 32)), data_format).build(network, x)
        names = [op.name for op in graph.get_operations() if op.type == "Transpose"]
    assert names == ([transposed] if transposed else [])


def test_graph_builder_rejects_an_unknown_float_activation():
    from dorefanet.network import GraphBuilder

    with pytest.raises(ValueError, match="activation_at_32"):
        GraphBuilder(None, activation_at_32="tanh")


@pytest.mark.parametrize("kind, bits, key, size", [("svhn", "1,2,4", None, 40), ("alexnet", "1,2,6", "alexnet-1,2,6", 224),
                                                   ("resnet", "1,4,32", "resnet-1,4,32", 224),
                                                   ("cifar", "2,2,32", None, 32)])
def test_layer_inputs_agree_with_the_weight_shapes(kind, bits, key, size):
    """The map each layer reads, as derived from the program, fits that layer's kernel in the zoo spec (for a
    model without one, in the TensorFlow graph the same description builds)."""
    from dorefanet.checkpoints import expected_variables
    from dorefanet.packed.program import layer_inputs

    built = model(kind, parse_bits(bits))
    with open(os.path.join(ROOT, "data", "zoo_spec.json")) as f:
        spec = json.load(f)[key] if key else expected_variables(built)
    found = layer_inputs(built.packed_program(), (size, size, 3))
    layers = [op["layer"] for op, _ in found]
    assert len(layers) == {"svhn": 8, "alexnet": 8, "resnet": 22, "cifar": 22}[kind]
    for op, shape in found:
        w = list(spec[op["layer"] + "/W"])
        assert w[-1] == op["out"], op["layer"]
        if op["op"] == "fc":
            assert int(np.prod(shape)) == w[0], op["layer"]
        else:
            assert shape[2] // op["groups"] == w[2] and list(op["kernel"]) == w[:2], op["layer"]
    if kind == "alexnet":
        assert dict((op["layer"], shape) for op, shape in found)["fc0"] == (6, 6, 256)
    if kind == "svhn":
        assert dict((op["layer"], shape) for op, shape in found)["fc1"] == (1, 1, 512)
    if kind == "cifar":
        # He et al.'s ResNet-20: stride-2 entry blocks of stages 2 and 3, each with a 1x1 stride-2 projection
        # shortcut reading the map its 3x3 conv reads; the fc reads the 64 average-pooled channels
        reads = dict((op["layer"], shape) for op, shape in found)
        assert reads["stage2blk1/shortcut"] == reads["stage2blk1/conv1"] == (32, 32, 16)
        assert reads["stage3blk1/shortcut"] == reads["stage3blk1/conv1"] == (16, 16, 32)
        assert reads["stage3blk3/conv2"] == (8, 8, 64) and reads["fc"] == (64,)
        assert [op["stride"] for op, _ in found if op["op"] == "conv" and op["stride"] != 1] == [2] * 4


def test_every_builder_speaks_every_word_with_the_same_signature():
    """The three builders (TensorFlow graph, packed program, layer plan) share one declared interface."""
    import inspect

    from dorefanet.builder import Builder, NetworkBuilder, Recorder
    from dorefanet.network import GraphBuilder
    from dorefanet.packed.program import ProgramBuilder

    words = {name for name in vars(NetworkBuilder) if not name.startswith("_")}
    assert words == {"conv", "fc", "bn", "activate", "nonlin", "maxpool", "avgpool", "gap", "pad", "dropout",
                     "scale", "add", "scope"}
    for builder in (GraphBuilder, ProgramBuilder, Recorder):
        assert issubclass(builder, Builder)
        for word in words:
            assert inspect.signature(getattr(builder, word)) == inspect.signature(getattr(NetworkBuilder, word)), \
                (builder.__name__, word)


def test_scopes_name_the_layers_inside_them_in_every_builder():
    from dorefanet.bits import LayerPlan
    from dorefanet.packed.program import ProgramBuilder

    def network(net, x):
        with net.scope("outer"):
            with net.scope("inner"):
                x = net.conv("conv", x, 4, 3, quantized=False)
            x = net.activate(x)
        return net.fc("fc", x, 2)

    plan = LayerPlan(network, (1, 2, 32))
    assert list(plan.layers) == ["outer/inner/conv", "fc"] and plan.activation_bits == [2]
    program = ProgramBuilder(plan).program(network, (0, 0, 0), 1.0)
    assert [op.get("layer") for op in program if op["op"] in ("conv", "fc")] == ["outer/inner/conv", "fc"]
