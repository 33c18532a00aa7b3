"""Each program pass of the packed engine (``dorefanet.packed.passes``) is exact, and applies only where it is.

A test per pass builds a small packed model by hand (random weights written with ``write_packed``, a program
from the op constructors of ``dorefanet.packed.program``) on which the pass applies, and checks that the
engine's output with all passes equals, to the bit, its output without that pass and the op-by-op run that a
trace makes; then that the pass leaves alone the programs its conditions exclude.  No TensorFlow: the engine
against the graph is tests/test_packed_engine.py.
"""
import numpy as np
import pytest

from dorefanet.packed import load_packed, passes
from dorefanet.packed import program as ops
from dorefanet.packed.format import pack_weight_planes, write_packed


class _Net:
    """Layers with random weights for a hand-written program, and the packed file of both."""

    def __init__(self, seed=0):
        self.rng = np.random.RandomState(seed)
        self.layers, self.arrays = {}, {}

    def affine(self, name, channels, gain=0.5, shift=0.5):
        """``<name>/scale`` and ``/shift``: a batch norm (or a layer's folded one) that keeps values around
        ``shift``, spread by ``gain``."""
        self.arrays[name + "/scale"] = (gain * self.rng.uniform(0.5, 1.5, channels)).astype(np.float32)
        self.arrays[name + "/shift"] = (shift + 0.1 * self.rng.randn(channels)).astype(np.float32)

    def float_layer(self, name, shape):
        self.layers[name] = {"kind": "float", "shape": list(shape)}
        self.arrays[name + "/W"] = (self.rng.randn(*shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)
        self.affine(name, shape[-1])

    def dorefa_layer(self, name, shape, bits):
        codes = self.rng.randint(0, 1 << bits, shape)
        self.layers[name] = {"kind": "dorefa", "shape": list(shape), "bits": bits}
        self.arrays[name + "/planes"] = pack_weight_planes(np.stack([(codes >> b) & 1 for b in range(bits)]))
        # the sum of n weights in [-1, 1] times codes in [0, 1] spreads about 0.4 sqrt(n): back to about [0, 1]
        self.affine(name, shape[-1], gain=1.2 / np.sqrt(np.prod(shape[:-1])))

    def write(self, tmp_path, program, input_shape):
        path = str(tmp_path / "net{}.packed.npz".format(len(list(tmp_path.iterdir()))))
        height, width, channels = input_shape
        header = {"model": "passes-test", "bits": "2,2,32", "classes": 0, "layers": self.layers,
                  "input": {"height": height, "width": width, "channels": channels, "dtype": "float32"},
                  "program": program}
        write_packed(path, header, self.arrays)
        return path


def _images(shape, seed=1):
    return np.random.RandomState(seed).uniform(0, 255, shape).astype(np.float32)


def _without(monkeypatch, path, rewrite):
    """The model loaded with every pass but ``rewrite``."""
    with monkeypatch.context() as patched:
        patched.setattr(passes, "PASSES", tuple(p for p in passes.PASSES if p is not rewrite))
        return load_packed(path)


def _assert_exact(monkeypatch, path, images, rewrite):
    """``rewrite`` changes the program the engine runs, and its output stays the same to the bit: with all passes,
    without ``rewrite`` and op by op (a trace).  Returns the output."""
    model, without = load_packed(path), _without(monkeypatch, path, rewrite)
    assert model._fast_program != without._fast_program, "the pass does not apply to this program"
    out = model.predict(images)
    assert np.unique(out).size > 1, "a constant output compares nothing"
    assert np.array_equal(out, without.predict(images))
    assert np.array_equal(out, model.predict(images, trace=[]))
    return out


def _assert_leaves(rewrite, program, layers=None, affines=None):
    """``rewrite`` leaves ``program`` as it is."""
    assert rewrite(program, layers or {}, affines or {}) == program


def test_every_pass_is_in_the_pipeline_once_and_the_engine_runs_its_result(tmp_path):
    assert len(set(passes.PASSES)) == len(passes.PASSES) == 8
    assert passes.PASSES[-1] is passes.fuse_activate     # it groups what the merges made
    net = _Net()
    net.affine("bn0", 3)
    program = [ops.normalize([128.0] * 3, 64.0), ops.affine("bn0"), ops.activate(2)]
    model = load_packed(net.write(tmp_path, program, (4, 4, 3)))
    assert model._fast_program == passes.apply(model.program, model.layers, model.affines)
    assert [op["op"] for op in model._fast_program] == ["normalize", "affine_activate"]


# ------------------------------------------------------------------ merge_pad_maxpool
def test_merge_pad_maxpool_is_exact(tmp_path, monkeypatch):
    program = [ops.normalize([128.0] * 3, 64.0), ops.pad(1, 1, mode="symmetric"), ops.maxpool(3, 2)]
    path = _Net().write(tmp_path, program, (9, 9, 3))
    out = _assert_exact(monkeypatch, path, _images((2, 9, 9, 3)), passes.merge_pad_maxpool)
    assert out.shape == (2, 5 * 5 * 3) and out.min() < 0       # negative maxima: a zero pixel would have won


def test_merge_pad_maxpool_only_where_the_padding_never_wins(tmp_path):
    norm, maxpool = ops.normalize([128.0] * 3, 64.0), ops.maxpool(3, 2)
    for program in ([norm, ops.pad(1, 1), maxpool],                                   # zeros can win
                    [norm, ops.pad(2, 2, mode="symmetric"), maxpool],                 # 2 mirrored pixels
                    [norm, ops.pad(1, 0, mode="symmetric"), maxpool],
                    [norm, ops.pad(1, 1, mode="symmetric"), ops.maxpool(1, 1)],       # a window of one pixel
                    [norm, ops.pad(1, 1, mode="symmetric"), ops.maxpool(3, 2, padding="SAME")],
                    [norm, ops.pad(1, 1, mode="symmetric", dst="r1"), ops.maxpool(3, 2, src="r1")]):  # kept
        _assert_leaves(passes.merge_pad_maxpool, program)
    # why a zero padding must stay: merged anyway, it gives other maxima on negative values
    images = _images((1, 9, 9, 3))
    padded = load_packed(_Net().write(tmp_path, [norm, ops.pad(1, 1), maxpool], (9, 9, 3))).predict(images)
    forced = load_packed(_Net().write(tmp_path, [norm, dict(maxpool, pads=[1, 1, 1, 1])], (9, 9, 3)))
    assert not np.array_equal(padded, forced.predict(images))


# ------------------------------------------------------------------ fold_input_scale
@pytest.mark.parametrize("out", [16, 48, 64, 10])        # the float kernel's 16-, 48-, 64-channel tiles; im2col
def test_fold_input_scale_is_exact(tmp_path, monkeypatch, out):
    net = _Net()
    net.float_layer("conv0", (3, 3, 3, out))
    program = [ops.normalize([0.0] * 3, 256.0), ops.conv("conv0", out, 3, quantized=False)]
    path = net.write(tmp_path, program, (10, 10, 3))
    _assert_exact(monkeypatch, path, _images((2, 10, 10, 3)), passes.fold_input_scale)
    assert load_packed(path)._fast_program[0]["input_scale"] == 1 / 256


class _FloatLayer:
    codes = None

    def __init__(self, w):
        self.float_w = np.asarray(w, np.float32)


@pytest.mark.parametrize("normalize,weights,folds", [
    ({"op": "normalize", "std": [256.0]}, [0.5, -0.25, 0.0], True),                # SVHN's input
    ({"op": "normalize", "std": [0.5, 0.5, 0.5], "mean": [0, 0, 0]}, [3.0], True),  # one power of two, mean 0
    ({"op": "normalize", "std": [255.0]}, [0.5], False),                             # not a power of two
    ({"op": "normalize", "std": [256.0, 128.0, 256.0]}, [0.5], False),              # per channel
    ({"op": "normalize", "std": [256.0], "mean": [1.0, 0, 0]}, [0.5], False),       # a mean rounds first
    ({"op": "normalize", "std": 256.0, "mean": 127.5}, [0.5], False),                # scalar constants
    ({"op": "normalize", "std": 256.0, "mean": 0.0}, [0.5], True),
    ({"op": "normalize", "std": [256.0], "pad": [3, 2]}, [0.5], False),             # writes a padded map
    ({"op": "normalize", "std": [256.0]}, [0.5, 1e-36], False),                     # a weight would go subnormal
])
def test_fold_input_scale_only_where_it_is_exact(normalize, weights, folds):
    conv = {"op": "conv", "layer": "conv0", "quantized": False, "kernel": [1, 1], "stride": 1, "padding": "VALID",
            "groups": 1, "out": 16}
    layers = {"conv0": _FloatLayer(weights)}
    scale = passes.input_scale(normalize, conv, layers)
    assert (scale is not None) == folds
    merged = passes.fold_input_scale([normalize, conv], layers, {})
    assert len(merged) == (1 if folds else 2)
    if folds:
        assert merged[0]["input_scale"] == 1 / np.ravel(normalize["std"])[0] and merged[0]["layer"] == "conv0"
    assert passes.input_scale(normalize, dict(conv, quantized=True), layers) is None
    assert passes.input_scale(normalize, dict(conv, src="r1"), layers) is None              # not its input


# ------------------------------------------------------------------ merge_normalize_pad
def test_merge_normalize_pad_is_exact(tmp_path, monkeypatch):
    program = [ops.normalize([100.0, 110.0, 120.0], [50.0, 60.0, 70.0]), ops.pad(2, 1)]
    path = _Net().write(tmp_path, program, (5, 6, 3))
    out = _assert_exact(monkeypatch, path, _images((2, 5, 6, 3)), passes.merge_normalize_pad)
    assert out.shape == (2, 8 * 9 * 3)


def test_merge_normalize_pad_only_for_zeros_after_a_normalisation_without_one():
    norm = ops.normalize([100.0, 110.0, 120.0], [50.0, 60.0, 70.0])
    for program in ([norm, ops.pad(1, 1, mode="symmetric")],                  # the border is not zeros
                    [dict(norm, pad=[1, 1]), ops.pad(1, 1)],                   # already writes a padded map
                    [dict(norm, dst="r1"), ops.pad(1, 1, src="r1")],          # the unpadded map is kept
                    [norm, ops.relu(), ops.pad(1, 1)]):
        _assert_leaves(passes.merge_normalize_pad, program)


# ------------------------------------------------------------------ merge_affine_activate
@pytest.mark.parametrize("bits", [1, 2, 8])
def test_merge_affine_activate_is_exact(tmp_path, monkeypatch, bits):
    net = _Net()
    net.affine("bn0", 3)
    program = [ops.normalize([128.0] * 3, 64.0), ops.affine("bn0"), ops.activate(bits)]
    path = net.write(tmp_path, program, (6, 6, 3))
    _assert_exact(monkeypatch, path, _images((2, 6, 6, 3)), passes.merge_affine_activate)


def test_merge_affine_activate_only_for_a_quantizing_activate_of_float32_maps():
    affine, float32 = ops.affine("bn0"), {"bn0": (np.ones(3, np.float32), None)}
    for program, affines in (([affine, ops.activate(32)], float32),           # a clip, not a quantizer
                             ([affine, ops.activate(2)], {"bn0": (np.ones(3), None)}),    # float64 scale
                             ([affine, ops.activate(2)], {"bn0": (None, np.zeros(3))}),   # float64 shift
                             ([dict(affine, dst="r1"), ops.activate(2, src="r1")], float32),
                             ([affine, ops.relu(), ops.activate(2)], float32)):
        _assert_leaves(passes.merge_affine_activate, program, affines=affines)


# ------------------------------------------------------------------ merge_affine_clip
def test_merge_affine_clip_is_exact(tmp_path, monkeypatch):
    net = _Net()
    net.affine("bn0", 3)
    program = [ops.normalize([128.0] * 3, 64.0), ops.affine("bn0"), ops.clip()]
    path = net.write(tmp_path, program, (6, 6, 3))
    out = _assert_exact(monkeypatch, path, _images((2, 6, 6, 3)), passes.merge_affine_clip)
    assert out.min() == 0 and out.max() == 1 and np.unique(out).size > 3      # clipped on both sides, and not only


def test_merge_affine_clip_only_for_a_clip_of_float32_maps():
    affine, float32 = ops.affine("bn0"), {"bn0": (np.ones(3, np.float32), np.zeros(3, np.float32))}
    for program, affines in (([affine, ops.relu()], float32),
                             ([affine, ops.clip()], {"bn0": (np.ones(3), None)}),
                             ([dict(affine, dst="r1"), ops.clip(src="r1")], float32)):
        _assert_leaves(passes.merge_affine_clip, program, affines=affines)


# ------------------------------------------------------------------ merge_gap_scale
def test_merge_gap_scale_is_exact(tmp_path, monkeypatch):
    program = [ops.normalize([128.0] * 3, 64.0), ops.gap(), ops.scale(1 / 3)]
    path = _Net().write(tmp_path, program, (7, 7, 3))
    _assert_exact(monkeypatch, path, _images((3, 7, 7, 3)), passes.merge_gap_scale)


def test_merge_gap_scale_only_once_and_for_its_own_result():
    gap = ops.gap()
    for program in ([dict(gap, by=2.0), ops.scale(0.5)],                       # already scales its means
                    [dict(gap, dst="r1"), ops.scale(0.5, src="r1")],
                    [gap, ops.relu(), ops.scale(0.5)]):
        _assert_leaves(passes.merge_gap_scale, program)


# ------------------------------------------------------------------ merge_clip_fc
def test_merge_clip_fc_is_exact(tmp_path, monkeypatch):
    net = _Net()
    net.float_layer("fc0", (4 * 4 * 3, 20))
    program = [ops.normalize([128.0] * 3, 100.0), ops.clip(), ops.fc("fc0", 20, quantized=False)]
    path = net.write(tmp_path, program, (4, 4, 3))
    _assert_exact(monkeypatch, path, _images((7, 4, 4, 3)), passes.merge_clip_fc)


def test_merge_clip_fc_only_for_a_float_layer_reading_the_clip():
    clip, fc = ops.clip(), ops.fc("fc0", 20, quantized=False)
    for program in ([clip, dict(fc, quantized=True)],                         # clips codes: nothing to do
                    [dict(clip, dst="r1"), dict(fc, src="r1")],
                    [ops.relu(), fc]):
        _assert_leaves(passes.merge_clip_fc, program)


def test_an_affine_clip_fc_chain_merges_the_first_pair():
    """Where two passes' pairs overlap, the earlier pass in PASSES takes its pair, as the op list reads."""
    affines = {"bn0": (np.ones(3, np.float32), np.zeros(3, np.float32))}
    program = [ops.affine("bn0"), ops.clip(), ops.fc("fc0", 20, quantized=False)]
    assert [op["op"] for op in passes.apply(program, {}, affines)] == ["affine_clip", "fc"]


# ------------------------------------------------------------------ fuse_activate
def test_fuse_activate_is_exact(tmp_path, monkeypatch):
    """Every fused step the engine has: a float conv and its activate, a popcount conv with a max pooling and its
    activate, a grouped popcount conv, a max pooling of floats and its activate, a popcount fc and an
    integer-GEMM fc (4 x 4 bit planes) with theirs."""
    net = _Net()
    net.float_layer("c0", (3, 3, 3, 16))
    net.dorefa_layer("c1", (3, 3, 16, 32), 2)
    net.dorefa_layer("c2", (3, 3, 16, 16), 2)
    net.dorefa_layer("c3", (3, 3, 16, 16), 2)
    net.dorefa_layer("f0", (2 * 2 * 16, 32), 2)
    net.dorefa_layer("f1", (32, 32), 4)
    net.float_layer("f2", (32, 10))
    program = [ops.normalize([0.0] * 3, 255.0), ops.conv("c0", 16, 3, quantized=False), ops.activate(2),
               ops.conv("c1", 32, 3), ops.maxpool(2, 2), ops.activate(2),
               ops.conv("c2", 16, 3, groups=2), ops.activate(2),
               ops.conv("c3", 16, 3), ops.relu(), ops.maxpool(2, 2), ops.activate(2),
               ops.fc("f0", 32), ops.activate(4), ops.fc("f1", 32), ops.activate(2),
               ops.fc("f2", 10, quantized=False)]
    path = net.write(tmp_path, program, (8, 8, 3))
    images = _images((3, 8, 8, 3))
    _assert_exact(monkeypatch, path, images, passes.fuse_activate)
    fused = [(op["op"], op.get("fused")) for op in load_packed(path)._fast_program if "fused" in op]
    assert fused == [("conv", 1), ("conv", 2), ("conv", 1), ("maxpool", 1), ("fc", 1), ("fc", 1)]
    trace = []
    load_packed(path).predict(images, trace=trace)
    assert all(np.unique(codes).size > 1 for _, codes, _ in trace)       # every activation spread over levels


def test_fuse_activate_only_for_a_quantizing_activate_of_its_own_result():
    conv, act = ops.conv("c0", 16, 3), ops.activate(2)
    for program in ([conv, ops.activate(32)],                                 # a clip: the float map is the output
                    [conv, ops.activate(2, dst="r1")],                        # its input map is kept
                    [dict(conv, dst="r1"), ops.activate(2, src="r1")],
                    [conv, ops.relu(), act],
                    [conv, ops.maxpool(2, 2), ops.maxpool(2, 2), act],        # (the second pooling fuses instead)
                    [ops.fc("f0", 10), ops.maxpool(2, 2), act],              # only a conv pools before
                    [ops.maxpool(2, 2), ops.maxpool(2, 2)],
                    [ops.relu(), act],
                    [conv]):
        assert "fused" not in passes.fuse_activate(program, {}, {})[0], program
