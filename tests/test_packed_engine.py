"""The packed format and engine against the TensorFlow graph: exactness, sizes, CLI and errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, load_script, run_probed
from dorefanet.checkpoints import save_npz
from dorefanet.packed import PackedFormatError, load_packed, read_packed
from dorefanet.packed import engine as packed_engine
from dorefanet.packed.export import export_packed
from dorefanet.packed.format import pack_weight_planes, unpack_weight_planes
from packed_reference import compare_with_graph
from dorefanet.synthetic_weights import calibrated_weights
from dorefanet.bits import parse_layer_bits
from dorefanet.driver import make_model  # noqa: E402

svhn = load_script("svhn-digit-dorefa.py")
alexnet = load_script("alexnet-dorefa.py")
resnet = load_script("resnet-dorefa.py")
cifar = load_script("cifar10-resnet-dorefa.py")

#: the small models of the exactness tests below: script and image side
SMALL = {"svhn": (svhn, 40), "cifar": (cifar, 32)}
#: ResNet-20 with float conv0 and fc given quantized weights, a stage-2 entry block that reads a float (A = 32)
#: activation with quantized weights (its 3x3 stride-2 conv and 1x1 stride-2 shortcut on the float path), and a
#: 4-bit stage 3 (integer-GEMM path) between 2-bit stages; fc reads the average pool, so its A stays 32
CIFAR_MIXED = "2,2,32;conv0=8,32,32;stage2blk1/(conv1|shortcut)=2,32,32;stage3blk.*=4,4,32;fc=8,32,32"


def _bits(text):
    return tuple(b if b == "t" else int(b) for b in text.split(","))


def _small_model(name, setting):
    """``name``'s model at ``setting``: ``W,A,G``, optionally followed by ``;PATTERN=W,A,G`` --layer-bits entries."""
    dorefa, *entries = setting.split(";")
    return make_model(SMALL[name][0], _bits(dorefa), layer_bits=[parse_layer_bits(e) for e in entries])


def _images(shape, dtype, seed=0):
    return np.random.RandomState(seed).uniform(0, 255, shape).astype(dtype)


def _exported(tmp_path, model, images, name="model"):
    """Calibrated weights for ``model`` saved as an npz, and the packed file exported from it."""
    weights = calibrated_weights(model, images)
    npz = str(tmp_path / (name + ".npz"))
    save_npz(weights, npz)
    out = str(tmp_path / (name + ".packed.npz"))
    export_packed(model, npz, out)
    return weights, npz, out


def _check(model, weights, images, packed_path):
    engine = load_packed(packed_path)
    result = compare_with_graph(model, weights, images, engine)
    print(model.model_name, model.bits, result)
    # tracing runs every op on its own; without a trace the engine fuses quantizing into convolutions and
    # pooling: the same float32 operations, so the same probabilities to the bit
    np.testing.assert_array_equal(engine.predict(images), engine.predict(images, trace=[]))
    # ties are float-rounding accidents of the graph's float32 sums: rare among the activations (measured up to
    # 3e-4 of them at 8 bits, with 255 boundaries each); an image that meets one differs downstream and is
    # exempt from the 1e-4 probability check, but must still give the same class
    assert result.root_ties <= max(2, 1e-3 * result.activations), result
    assert result.argmax_equal == result.images, result
    return result


# ------------------------------------------------------------------ format
def test_weight_planes_round_trip():
    rng = np.random.RandomState(0)
    bits = rng.randint(0, 2, (3, 5, 5, 7, 9)).astype(np.uint8)
    packed = pack_weight_planes(bits)
    assert packed.shape == (3, (5 * 5 * 7 * 9 + 7) // 8) and packed.dtype == np.uint8
    assert np.array_equal(unpack_weight_planes(packed, (5, 5, 7, 9)), bits)
    # little bit order: element 0 is bit 0 of byte 0
    assert pack_weight_planes(np.array([[1, 0, 0, 0, 0, 0, 0, 0, 0, 1]]))[0].tolist() == [1, 2]


def _settings(name, seed, settings, marks=()):
    return [pytest.param(name, bits, seed, id="{}-{}".format(name, "mixed" if ";" in bits else bits), marks=marks)
            for bits in settings]


@pytest.mark.parametrize("name, bits, seed", [
    *_settings("svhn", 0, ["1,2,4", "t,32,32", "32,32,32", "3,2,32"]),
    *_settings("svhn", 1, ["1,1,32", "1,32,32", "8,8,8"]),
    # ResNet-20: identity-shortcut adds of quantized activations, stride-2 3x3 SAME convs and 1x1 stride-2
    # projection shortcuts, the float nonlin after the last add; popcount (W x A <= 8), integer-GEMM (4,4 and
    # 8,8) and float paths
    *_settings("cifar", 2, ["2,2,32", "1,2,32", "1,1,32", "4,4,32", "32,32,32", CIFAR_MIXED]),
    # about 7 s each (TTQ's graphs build slower; 4,4,32 already takes the integer-GEMM path)
    *_settings("cifar", 2, ["t,32,32", "8,8,8"], marks=pytest.mark.slow)])
def test_engine_matches_graph(tmp_path, name, bits, seed):
    model = _small_model(name, bits)
    size = SMALL[name][1]
    images = _images((48, size, size, 3), np.float32, seed=seed)
    weights, _, path = _exported(tmp_path, model, images)
    _check(model, weights, images, path)
    header, _ = read_packed(path)
    if ";" in bits:     # a --layer-bits table: the header keeps it
        assert header["layer_bits"] == model.layer_plan.table()
    # each layer packed as the kind its own W says
    for layer, layer_bits in model.layer_plan.layers.items():
        kind = header["layers"][layer]["kind"]
        assert kind == {1: "binary", "t": "ternary", 32: "float"}.get(layer_bits[0], "dorefa"), layer


def test_integer_gemm_path_matches_popcount_path(tmp_path, monkeypatch):
    """The wide-bits integer GEMM and the bit-plane popcounts give the same integers."""
    model = make_model(svhn, (2, 3, 32))
    images = _images((16, 40, 40, 3), np.float32, seed=2)
    weights, _, path = _exported(tmp_path, model, images)
    popcount = load_packed(path).predict(images)
    monkeypatch.setattr(packed_engine, "POPCOUNT_MAX_PLANE_PAIRS", 0)
    gemm = load_packed(path).predict(images)
    np.testing.assert_array_equal(popcount, gemm)


@pytest.mark.slow
@pytest.mark.parametrize("bits", ["32,32,32", "t,32,32", "1,32,32", "1,1,32", "8,8,8", "1,2,32", "1,2,6", "1,2,4"])
def test_alexnet_published_rows_match_graph(tmp_path, bits):
    model = make_model(alexnet, _bits(bits), "channels_last", 224)
    images = _images((6, 224, 224, 3), np.uint8)
    weights, _, path = _exported(tmp_path, model, images)
    _check(model, weights, images, path)


def test_resnet18_matches_graph(tmp_path):
    model = make_model(resnet, (1, 4, 32), "channels_last", 224)
    images = _images((6, 224, 224, 3), np.float32)
    weights, _, path = _exported(tmp_path, model, images)
    _check(model, weights, images, path)


def test_packed_sizes(tmp_path):
    """The size targets: AlexNet 1,2,6 and ResNet-18 1,4,32 at least 10x smaller, SVHN 1,2,4 at least 20x."""
    cases = [(make_model(svhn, (1, 2, 4)), 20), (make_model(alexnet, (1, 2, 6), "channels_last", 224), 10),
             (make_model(resnet, (1, 4, 32), "channels_last", 224), 10)]
    for i, (model, factor) in enumerate(cases):
        image_spec = model.inputs()[0]
        images = _images([2] + image_spec.shape.as_list()[1:], image_spec.dtype.as_numpy_dtype)
        _, npz, path = _exported(tmp_path, model, images, name="m{}".format(i))
        float_bytes = sum(v.nbytes for v in np.load(npz).values())
        assert float_bytes / os.path.getsize(path) >= factor, (model.model_name, float_bytes, os.path.getsize(path))


# ------------------------------------------------------------------ reading errors
def _svhn_packed(tmp_path):
    model = make_model(svhn, (1, 2, 4))
    return _exported(tmp_path, model, _images((8, 40, 40, 3), np.float32))


def test_results_do_not_depend_on_batch_or_thread_count(tmp_path):
    """The engine keeps each layer's checked kernel plans per input shape and thread count and reuses them:
    a batch, its images one by one, and one thread against all of them give the same probabilities."""
    import numba

    _, _, path = _svhn_packed(tmp_path)
    engine = load_packed(path)
    images = _images((5, 40, 40, 3), np.float32, seed=3)
    whole = engine.predict(images)
    np.testing.assert_array_equal(np.concatenate([engine.predict(images[i:i + 1]) for i in range(5)]), whole)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        np.testing.assert_array_equal(engine.predict(images), whole)
        np.testing.assert_array_equal(engine.predict(images[:1]), whole[:1])
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(engine.predict(images), whole)
    plans = engine.layers["conv1"]._plans
    assert {key[1][0] for key in plans} == {1, 5} and len(plans) == (2 if threads == 1 else 4)


def test_bad_packed_files_are_refused_with_one_line(tmp_path):
    _, npz, path = _svhn_packed(tmp_path)
    header, arrays = read_packed(path)

    def rewritten(name, header=header, arrays=arrays):
        target = str(tmp_path / name)
        np.savez(target, __packed__=np.array(json.dumps(header)), **arrays)
        return target

    cases = {
        npz: "not a packed model",
        rewritten("v2.npz", dict(header, version=2)): "format version",
        rewritten("nolayer.npz", arrays={k: v for k, v in arrays.items() if k != "conv3/planes"}): "conv3/planes",
        rewritten("shape.npz", arrays=dict(arrays, **{"conv3/planes": arrays["conv3/planes"][:, :-1]})):
            "conv3/planes is uint8",
        rewritten("op.npz", dict(header, program=header["program"] + [{"op": "teleport"}])): "teleport",
        str(tmp_path / "missing.npz"): "file not found",
    }
    pickled = str(tmp_path / "pickled.npz")
    np.savez(pickled, __packed__=np.array([{"a": 1}], dtype=object))
    cases[pickled] = "pickle"
    for bad, expected in cases.items():
        with pytest.raises(PackedFormatError, match=expected) as info:
            read_packed(bad)
        assert "\n" not in str(info.value) and bad in str(info.value)


def test_wrong_input_shape_is_a_clear_error(tmp_path):
    _, _, path = _svhn_packed(tmp_path)
    with pytest.raises(ValueError, match=r"expects images of shape \[batch, 40, 40, 3\]"):
        load_packed(path).predict(np.zeros((1, 32, 32, 3), np.float32))


@pytest.mark.slow
def test_engine_runs_without_tensorflow(tmp_path):
    """Reading and running a packed file never imports TensorFlow (it may not be installed)."""
    _, _, path = _svhn_packed(tmp_path)
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorflow', 'tensorpack', 'tf_keras', 'keras'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy as np\n"
        "from dorefanet.packed import load_packed\n"
        "p = load_packed(sys.argv[1]).predict(np.zeros((2, 40, 40, 3), np.float32))\n"
        "assert p.shape == (2, 10) and abs(float(p.sum()) - 2) < 1e-4\n"
        "print('ok', sorted(m for m in sys.modules if m.startswith('tensorflow')))\n")
    out = subprocess.run([sys.executable, "-c", code, path], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok []"


# ------------------------------------------------------------------ command line
def _script(name, *args, env=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, name)] + list(args), capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env)


@pytest.mark.slow
def test_svhn_cli_packed_run_prints_what_tensorflow_prints(tmp_path):
    import cv2

    model = make_model(svhn, (1, 2, 4))
    images = _images((16, 40, 40, 3), np.float32, seed=3)
    _, npz, _ = _exported(tmp_path, model, images)
    packed = str(tmp_path / "cli.packed.npz")
    out = _script("svhn-digit-dorefa.py", "--dorefa", "1,2,4", "--load", npz, "--export-packed", packed)
    assert out.returncode == 0, out.stderr
    assert "smaller" in out.stdout and os.path.exists(packed)
    pictures = []
    for i in range(3):
        pictures.append(str(tmp_path / "digit{}.png".format(i)))
        cv2.imwrite(pictures[-1], images[i].astype(np.uint8))
    for extra in ([], ["--json"]):
        graph = _script("svhn-digit-dorefa.py", "--dorefa", "1,2,4", "--load", npz, "--run", *pictures, *extra)
        engine = _script("svhn-digit-dorefa.py", "--dorefa", "1,2,4", "--load", packed, "--engine", "packed",
                         "--run", *pictures, *extra)
        assert graph.returncode == engine.returncode == 0, graph.stderr + engine.stderr
        assert engine.stdout.count("digit") == 3
        _assert_same_output(engine.stdout, graph.stdout, as_json=bool(extra))


def _assert_same_output(engine, graph, as_json):
    """The same text; for --json the same objects, probabilities (printed in full) within 1e-5."""
    if not as_json:
        assert engine == graph
        return
    engine = [json.loads(line) for line in engine.splitlines()]
    graph = [json.loads(line) for line in graph.splitlines()]
    assert len(engine) == len(graph) > 0
    for e, g in zip(engine, graph):
        assert e["image"] == g["image"] and len(e["top"]) == len(g["top"])
        for a, b in zip(e["top"], g["top"]):
            assert abs(a.pop("prob") - b.pop("prob")) < 1e-5 and a == b


@pytest.mark.slow
def test_svhn_cli_packed_eval_prints_what_tensorflow_prints_without_tensorflow(tmp_path):
    import scipy.io

    model = make_model(svhn, (1, 1, 32))
    images = _images((8, 40, 40, 3), np.float32, seed=4)
    _, npz, packed = _exported(tmp_path, model, images)
    rng = np.random.RandomState(5)
    for split in ("train", "test"):
        scipy.io.savemat(str(tmp_path / "{}_32x32.mat".format(split)),
                         {"X": rng.randint(0, 256, (32, 32, 3, 37)).astype(np.uint8),
                          "y": rng.randint(1, 11, (37, 1)).astype(np.uint8)})
    common = ["--dorefa", "1,1,32", "--eval", "--data", str(tmp_path)]
    graph, graph_imports = run_probed("svhn-digit-dorefa.py", "--load", npz, *common)
    engine, engine_imports = run_probed("svhn-digit-dorefa.py", "--load", packed, "--engine", "packed", *common)
    assert graph.returncode == engine.returncode == 0, graph.stderr + engine.stderr
    assert engine.stdout == graph.stdout and engine.stdout.startswith("test error: ")
    # the packed engine's --eval imports neither TensorFlow nor tensorpack; the probe sees the graph's do
    assert engine_imports == "imported: tensorflow=False tensorpack=False", engine.stderr
    assert graph_imports == "imported: tensorflow=True tensorpack=True", graph.stderr


@pytest.mark.slow
def test_alexnet_cli_export_and_run_packed(tmp_path):
    import cv2

    model = make_model(alexnet, (1, 2, 6), "channels_last", 64)
    images = _images((4, 64, 64, 3), np.uint8, seed=6)
    _, npz, _ = _exported(tmp_path, model, images)
    packed = str(tmp_path / "alex.packed.npz")
    size = ["--image-size", "64"]
    assert _script("alexnet-dorefa.py", "--load", npz, "--export-packed", packed, *size).returncode == 0
    picture = str(tmp_path / "cat.png")
    cv2.imwrite(picture, _images((80, 96, 3), np.uint8, seed=7))
    for extra in ([], ["--json"]):
        graph = _script("alexnet-dorefa.py", "--load", npz, "--run", picture, *extra, *size)
        engine = _script("alexnet-dorefa.py", "--load", packed, "--engine", "packed", "--run", picture, *extra, *size)
        assert graph.returncode == engine.returncode == 0, graph.stderr + engine.stderr
        _assert_same_output(engine.stdout, graph.stdout, as_json=bool(extra))
    assert '"wnid"' in engine.stdout


@pytest.mark.slow
def test_imagenet_packed_eval_and_run_import_no_tensorflow(tmp_path):
    """--engine packed --eval / --run of alexnet-dorefa.py never import TensorFlow (nor tensorpack) and
    print what the TensorFlow engine prints; the probe does see TensorFlow in the TensorFlow engine's runs."""
    import cv2

    from dorefanet.imagenet_data import load_class_names

    model = make_model(alexnet, (1, 2, 6), "channels_last", 64)
    _, npz, packed = _exported(tmp_path, model, _images((4, 64, 64, 3), np.uint8, seed=9))
    classes = load_class_names()
    for i in range(5):     # 5 images in batches of 2: a partial last batch
        folder = tmp_path / "data" / "val" / classes[(3 * i) % 4][0]
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / "v{}.JPEG".format(i)), _images((70 + 5 * i, 90, 3), np.uint8, seed=20 + i))
    picture = str(tmp_path / "cat.png")
    cv2.imwrite(picture, _images((80, 96, 3), np.uint8, seed=7))
    size = ["--image-size", "64"]
    for mode in (["--eval", "--data", str(tmp_path / "data"), "--batch", "2"], ["--run", picture]):
        engine, engine_imports = run_probed("alexnet-dorefa.py", "--load", packed, "--engine", "packed", *mode, *size)
        graph, graph_imports = run_probed("alexnet-dorefa.py", "--load", npz, *mode, *size)
        assert engine.returncode == graph.returncode == 0, engine.stderr + graph.stderr
        assert engine_imports == "imported: tensorflow=False tensorpack=False", engine.stderr
        assert graph_imports == "imported: tensorflow=True tensorpack=True", graph.stderr
        assert engine.stdout == graph.stdout and engine.stdout
    # a packed file's errors still come without TensorFlow
    bad, imports = run_probed("resnet-dorefa.py", "--load", packed, "--engine", "packed", "--run", picture, *size)
    assert bad.returncode == 2 and "is a packed alexnet model" in bad.stderr, bad.stderr
    assert imports == "imported: tensorflow=False tensorpack=False"


@pytest.mark.slow
def test_cli_packed_errors_are_one_line(tmp_path):
    _, npz, packed = _svhn_packed(tmp_path)
    picture = str(tmp_path / "x.png")
    import cv2

    cv2.imwrite(picture, np.zeros((32, 32, 3), np.uint8))
    # TensorFlow's own lines follow the user's TF_CPP_MIN_LOG_LEVEL (0 shows its cuInit "CUDA error: " line);
    # this test runs with tf_setup's default, test_tf_setup checks every level
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    cases = [
        (["--dorefa", "1,2,4", "--load", npz, "--engine", "packed", "--run", picture], "not a packed model"),
        (["--dorefa", "1,1,4", "--load", packed, "--engine", "packed", "--run", picture], "pass --dorefa 1,2,4"),
        (["--dorefa", "1,2,4", "--load", packed, "--run", picture], "run it with --engine packed"),
        (["--dorefa", "1,2,4", "--load", npz, "--engine", "packed", "--synthetic"], "--engine packed runs --eval"),
        (["--dorefa", "1,2,4", "--load", npz, "--export", "a.npz", "--export-packed", "b.npz"], "cannot be combined"),
        (["--dorefa", "1,2,4", "--load", npz, "--run", picture, "--first-last-dtype", "float16"],
         "only applies to --export-packed"),
    ]
    for args, expected in cases:
        out = _script("svhn-digit-dorefa.py", *args, env=env)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert expected in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
        assert len([line for line in out.stderr.splitlines() if "error: " in line]) == 1, out.stderr
    out = _script("resnet-dorefa.py", "--load", packed, "--engine", "packed", "--run", picture, env=env)
    assert out.returncode == 2 and "is a packed svhn-digit model" in out.stderr, out.stderr


def test_first_last_float16_stores_rounded_weights(tmp_path):
    """--first-last-dtype float16: a smaller file whose first and last layers are those weights rounded to float16."""
    model = make_model(svhn, (1, 2, 4))
    images = _images((16, 40, 40, 3), np.float32, seed=8)
    weights, npz, exact = _exported(tmp_path, model, images)
    half = str(tmp_path / "half.packed.npz")
    export_packed(model, npz, half, first_last_dtype="float16")
    assert os.path.getsize(half) < os.path.getsize(exact)
    _, arrays = read_packed(half)
    for name in ("conv0/W", "fc1/W"):
        assert arrays[name].dtype == np.float16
        np.testing.assert_array_equal(arrays[name], weights[name].astype(np.float16))
    assert arrays["conv1/planes"].dtype == np.uint8
    # the engine runs it exactly like a float32 file holding the rounded weights
    rounded = dict(weights, **{name: weights[name].astype(np.float16).astype(np.float32) for name in ("conv0/W", "fc1/W")})
    save_npz(rounded, str(tmp_path / "rounded.npz"))
    export_packed(model, str(tmp_path / "rounded.npz"), str(tmp_path / "rounded.packed.npz"))
    np.testing.assert_array_equal(load_packed(half).predict(images),
                                  load_packed(str(tmp_path / "rounded.packed.npz")).predict(images))


def test_huge_page_copy_is_an_equal_writable_array_of_its_own():
    big = np.arange(3 << 20, dtype=np.float32).reshape(3, 1 << 20)       # 12 MB
    copy = packed_engine.huge_page_copy(big)
    assert copy is not big and copy.dtype == big.dtype and copy.shape == big.shape and copy.flags.writeable
    np.testing.assert_array_equal(copy, big)
    copy[0, 0] = -1
    assert big[0, 0] == 0
    small = np.ones((10, 10), np.float32)
    assert packed_engine.huge_page_copy(small) is small                   # below 4 MB: left where it is
