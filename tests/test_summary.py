"""``--summary``: the per-layer figures agree with real exported files and with MACs counted by hand."""
import json

import numpy as np
import pytest

from conftest import load_script
from dorefanet.checkpoints import expected_variables, save_npz
from dorefanet.packed.export import export_packed
from dorefanet.packed.format import HEADER
from dorefanet.summary import summarise
from dorefanet.synthetic_weights import calibrated_weights
from dorefanet.driver import make_model  # noqa: E402

svhn = load_script("svhn-digit-dorefa.py")
alexnet = load_script("alexnet-dorefa.py")
resnet = load_script("resnet-dorefa.py")

# every kind of packed layer: float (conv0, fc1), binary (W = 1), dorefa (conv2, 2 bits), ternary (conv3)
MIXED = [("conv2", (2, 2, 4)), ("conv3", ("t", 32, 32))]
MIXED_FLAGS = ["--dorefa", "1,2,4", "--layer-bits", "conv2=2,2,4", "conv3=t,32,32"]


def _owner(name):
    for suffix in ("/mean/EMA", "/variance/EMA", "/gamma", "/beta", "/Wp", "/Wn", "/W", "/b",
                   "/planes", "/E", "/scale", "/shift"):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    raise AssertionError(name)


def _bytes_by_owner(arrays, bn_of=None):
    """``{layer: nbytes}`` of a file's arrays; a batch norm's go to the layer it is folded into."""
    out = {}
    for name, value in arrays.items():
        owner = _owner(name)
        owner = (bn_of or {}).get(owner, owner)
        out[owner] = out.get(owner, 0) + value.nbytes
    return out


@pytest.fixture(scope="module")
def svhn_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("svhn")
    model = make_model(svhn, (1, 2, 4), layer_bits=MIXED)
    images = np.random.RandomState(0).uniform(0, 255, (4, 40, 40, 3)).astype(np.float32)
    npz = str(tmp / "model.npz")
    save_npz(calibrated_weights(model, images), npz)
    packed = {dtype: str(tmp / "model.{}.packed.npz".format(dtype)) for dtype in ("float32", "float16")}
    for dtype, path in packed.items():
        export_packed(model, npz, path, first_last_dtype=dtype)
    return model, npz, packed


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_packed_and_float_bytes_are_the_real_files(svhn_files, dtype):
    model, npz, packed = svhn_files
    program = model.packed_program()
    summary = summarise(program, model.layer_plan, (40, 40, 3), expected_variables(model), dtype)
    rows = {r["layer"]: r for r in summary["layers"]}
    assert list(rows) == ["conv0", "conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "fc1"]
    bn_of = {op["bn"]: op["layer"] for op in program if op.get("bn")}

    with np.load(packed[dtype]) as data:
        arrays = {k: data[k] for k in data.files if k != HEADER}
    real = _bytes_by_owner(arrays)
    assert {name: r["packed_bytes"] for name, r in rows.items()} == real
    # the total: every array of the file but its JSON header
    assert summary["totals"]["packed_bytes"] == sum(a.nbytes for a in arrays.values())

    with np.load(npz) as data:
        floats = {k: data[k] for k in data.files}
    assert {name: r["float_bytes"] for name, r in rows.items()} == _bytes_by_owner(floats, bn_of)
    assert summary["totals"]["float_bytes"] == sum(a.nbytes for a in floats.values())
    t = summary["totals"]
    assert t["compression"] == t["float_bytes"] / t["packed_bytes"]
    assert t["params"] == sum(a.size for k, a in floats.items() if not k.endswith("/EMA"))


def test_svhn_macs_and_bops_by_hand():
    model = make_model(svhn, (1, 2, 4), layer_bits=MIXED)
    summary = summarise(model.packed_program(), model.layer_plan, (40, 40, 3), expected_variables(model))
    rows = {r["layer"]: r for r in summary["layers"]}
    # conv0: 5x5 VALID on 40x40x3 -> 36x36x48
    assert rows["conv0"]["output_shape"] == [36, 36, 48]
    assert rows["conv0"]["macs"] == 5 * 5 * 3 * 48 * 36 * 36
    assert rows["conv0"]["bops"] == 5 * 5 * 3 * 48 * 36 * 36 * 32 * 32
    # conv3: pool0 (SAME 2) 36 -> 18, conv1 and conv2 SAME 18, pool1 -> 9; 3x3 VALID on 9x9x64 -> 7x7x128
    assert rows["conv3"]["output_shape"] == [7, 7, 128]
    assert rows["conv3"]["macs"] == 3 * 3 * 64 * 128 * 7 * 7
    assert rows["conv3"]["bops"] == 3 * 3 * 64 * 128 * 7 * 7 * 2 * 32   # ternary weights, float activation
    # conv2 at 2,2,4 reads conv1's 18x18x64 map
    assert rows["conv2"]["macs"] == 3 * 3 * 64 * 64 * 18 * 18
    assert rows["conv2"]["bops"] == 3 * 3 * 64 * 64 * 18 * 18 * 2 * 2
    assert (rows["conv1"]["w"], rows["conv1"]["a"], rows["conv1"]["g"]) == (1, 2, 4)
    # fc1 reads conv6's 1x1x512
    assert rows["fc1"]["macs"] == 512 * 10
    t = summary["totals"]
    assert t["macs"] == sum(r["macs"] for r in rows.values())
    assert t["bops_vs_32"] == t["bops"] / (t["macs"] * 32 * 32)


def test_alexnet_macs_by_hand():
    model = make_model(alexnet, (1, 2, 6), "channels_last", 224)
    summary = summarise(model.packed_program(), model.layer_plan, (224, 224, 3), expected_variables(model))
    rows = {r["layer"]: r for r in summary["layers"]}
    # conv0: 12x12 stride 4 VALID on 224 -> 54x54x96; conv1: 5x5 SAME, 2 groups: 48 input channels a group
    assert rows["conv0"]["output_shape"] == [54, 54, 96]
    assert rows["conv1"]["output_shape"] == [54, 54, 256]
    assert rows["conv1"]["macs"] == 5 * 5 * (96 // 2) * 256 * 54 * 54
    assert rows["conv1"]["bops"] == 5 * 5 * (96 // 2) * 256 * 54 * 54 * 1 * 2
    assert rows["fct"]["macs"] == 4096 * 1000


def _main(script, argv, capsys):
    status = script.main(argv)
    out = capsys.readouterr()
    return status, out.out, out.err


def test_cli_summary_json_and_table(svhn_files, capsys):
    model, npz, packed = svhn_files
    status, out, err = _main(svhn, ["--summary", "--json"] + MIXED_FLAGS, capsys)
    assert status == 0, err
    fresh = json.loads(out)
    status, out, err = _main(svhn, ["--summary", "--json", "--load", npz] + MIXED_FLAGS, capsys)
    assert status == 0, err
    loaded = json.loads(out)
    assert loaded["layers"] == fresh["layers"] and loaded["totals"] == fresh["totals"]
    # a packed file: its bits come from its header, no flags needed
    status, out, err = _main(svhn, ["--summary", "--json", "--load", packed["float32"]], capsys)
    assert status == 0, err
    assert json.loads(out)["totals"] == fresh["totals"]
    assert json.loads(out)["layer_bits"]["conv3"] == "t,32,32"
    # the float16 file's first and last layers take half the bytes, as --first-last-dtype float16 predicts
    status, out, err = _main(svhn, ["--summary", "--json", "--load", packed["float16"]], capsys)
    assert status == 0, err
    half = json.loads(out)
    status, out, err = _main(svhn, ["--summary", "--json", "--first-last-dtype", "float16"] + MIXED_FLAGS, capsys)
    assert status == 0, err
    assert json.loads(out)["totals"] == half["totals"] != fresh["totals"]
    status, out, err = _main(svhn, ["--summary", "--load", packed["float32"], "--first-last-dtype", "float16"],
                             capsys)
    assert status == 2 and "--first-last-dtype float16" in err and len(err.strip().splitlines()) == 1
    status, out, err = _main(svhn, ["--summary"] + MIXED_FLAGS, capsys)
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("svhn-digit at --dorefa 1,2,4 with --layer-bits conv2=2,2,4 conv3=t,32,32")
    assert any(line.split()[:6] == ["conv3", "conv", "7x7x128", "t", "32", "32"] for line in lines)
    assert "packed size    {} bytes".format(fresh["totals"]["packed_bytes"]) in out


def test_imagenet_scripts_summarise(capsys):
    status, out, err = _main(alexnet, ["--summary", "--json", "--dorefa", "1,2,6"], capsys)
    assert status == 0, err
    summary = json.loads(out)
    assert [r["layer"] for r in summary["layers"]][:2] == ["conv0", "conv1"]
    assert summary["layers"][1]["macs"] == 5 * 5 * 48 * 256 * 54 * 54
    status, out, err = _main(resnet, ["--summary", "--json"], capsys)
    assert status == 0, err
    summary = json.loads(out)
    # every layer of the plan has a row, and the batch norms not folded into a layer have their own
    plan = make_model(resnet, (1, 4, 32), "channels_last", 224).layer_plan
    assert [r["layer"] for r in summary["layers"] if r["kind"] != "bn"] == list(plan.layers)
    assert any(r["kind"] == "bn" and r["macs"] == 0 and r["packed_bytes"] > 0 for r in summary["layers"])


@pytest.mark.parametrize("argv, flag", [
    (["--summary", "--eval", "--load", "x.npz"], "--summary"),
    (["--summary", "--export-packed", "out.npz", "--load", "x.npz"], "--summary"),
    (["--summary", "--run", "a.png", "--load", "x.npz"], "--summary"),
    (["--json", "--load", "x.npz", "--export", "y.npz"], "--json"),
    (["--summary", "--layer-bits", "conv9=2,2,4"], "--layer-bits"),
])
def test_bad_flags_are_one_line(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        svhn.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in err   # argparse: "<prog>: error: ...", prog being whatever runs the test
    assert flag in err


def test_a_load_of_another_model_is_one_line(tmp_path, capsys):
    bad = str(tmp_path / "bad.npz")
    save_npz({"conv0/W": np.zeros((1, 1, 1, 1), np.float32)}, bad)
    status, out, err = _main(svhn, ["--summary", "--load", bad], capsys)
    assert status == 2 and out == ""
    assert err.strip().startswith("error: {}".format(bad)) and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("script, bits", [("resnet", (1, 4, 32)), ("alexnet", ("t", 32, 32))])
def test_imagenet_packed_and_float_bytes_are_the_real_files(tmp_path, script, bits):
    # ResNet-18 has batch norms of their own (rows of kind bn); AlexNet grouped convolutions and TTQ scalars
    model = make_model({"resnet": resnet, "alexnet": alexnet}[script], bits, "channels_last", 64)
    images = np.random.RandomState(1).uniform(0, 255, (2, 64, 64, 3)).astype(np.float32)
    npz, packed = str(tmp_path / "m.npz"), str(tmp_path / "m.packed.npz")
    save_npz(calibrated_weights(model, images), npz)
    export_packed(model, npz, packed)
    program = model.packed_program()
    summary = summarise(program, model.layer_plan, (64, 64, 3), expected_variables(model))
    rows = {r["layer"]: r for r in summary["layers"]}
    bn_of = {op["bn"]: op["layer"] for op in program if op.get("bn")}
    with np.load(packed) as data:
        arrays = {k: data[k] for k in data.files if k != HEADER}
    with np.load(npz) as data:
        floats = {k: data[k] for k in data.files}
    assert {name: r["packed_bytes"] for name, r in rows.items()} == _bytes_by_owner(arrays)
    assert {name: r["float_bytes"] for name, r in rows.items()} == _bytes_by_owner(floats, bn_of)
    assert summary["totals"]["packed_bytes"] == sum(a.nbytes for a in arrays.values())
    assert summary["totals"]["float_bytes"] == sum(a.nbytes for a in floats.values())
