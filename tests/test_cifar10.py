"""cifar10-resnet-dorefa.py end to end on CIFAR-10 files written here in both layouts (no network)."""
import json
import logging
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, cifar_batch_dict, load_script, write_cifar10, write_image
from dorefanet.cifar_data import CLASS_NAMES, synthetic_cifar

SCRIPT = os.path.join(ROOT, "cifar10-resnet-dorefa.py")


def script(*args, timeout=300):
    return subprocess.run([sys.executable, SCRIPT] + [str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout)


def shapes(split, n):
    """The built-in shapes as CIFAR-10 files store images: RGB."""
    images, labels = synthetic_cifar(split, seed=11, size=n, workers=1)
    return np.ascontiguousarray(images[..., ::-1]), labels


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """The same 320 training and 70 test images (a partial last batch) in the binary and the Python version."""
    root = tmp_path_factory.mktemp("cifar")
    train, test = shapes("train", 320), shapes("test", 70)
    return {layout: write_cifar10(root / layout, layout, train, test) for layout in ("binary", "python")}


def test_the_script_is_its_network_recipe_and_data(capsys):
    cifar = load_script("cifar10-resnet-dorefa.py")
    with open(SCRIPT) as f:
        assert len(f.read().splitlines()) <= 130
    assert set(vars(cifar)) >= {"network", "RECIPE", "DATA", "main"}
    from dorefanet.driver import make_model

    model = make_model(cifar, (2, 2, 32), tensorflow=False)
    table = model.layer_plan.table()
    assert len(table) == 22   # conv0, 18 convs of the 9 blocks, 2 projections, fc
    assert table["conv0"] == table["fc"] == "32,32,32" and table["stage2blk1/shortcut"] == "2,2,32"
    level = logging.getLogger("tensorpack").level
    assert cifar.main(["--summary", "--json"]) == 0
    assert logging.getLogger("tensorpack").level == level   # a later training in this process logs as before
    summary = json.loads(capsys.readouterr().out)
    # He et al.'s ResNet-20: 0.27M parameters, about 41M multiply-adds per 32x32 image
    assert summary["totals"]["params"] == 272474 and summary["totals"]["macs"] == 40813184


@pytest.mark.slow
def test_trains_on_either_layout_resumes_evaluates_runs_and_exports(layouts, tmp_path):
    logdir = tmp_path / "log"
    train = ["--batch", 32, "--steps-per-epoch", 3, "--workers", 2, "--logdir", logdir]
    first = script("--data", layouts["binary"], *train, "--epochs", 1)
    assert first.returncode == 0, first.stderr[-2000:]
    # the finished run, trained on for another epoch from the Python version of the same data
    more = script("--data", layouts["python"], *train, "--epochs", 2)
    assert more.returncode == 0, more.stderr[-2000:]
    with open(logdir / "stats.json") as f:
        stats = json.load(f)
    with open(logdir / "config.json") as f:
        config = json.load(f)
    assert [s["epoch_num"] for s in stats] == [1, 2] and config["resumed_at"][0]["step"] == 3
    # 50% and 75% of the 1 epoch the run was started with, kept when it is trained on
    assert config["recipe"]["lr_schedule"] == [[1, 0.001]]
    assert stats[-1]["learning_rate"] == pytest.approx(0.001)
    error = "{:.4f}".format(stats[-1]["test-error"])
    assert "done: test error {} after 2 epochs".format(error) in more.stdout

    evaluated = script("--load", logdir, "--eval", "--data", layouts["python"], "--batch", 32)
    assert evaluated.returncode == 0 and evaluated.stdout.splitlines()[-1] == "test error: " + error, evaluated.stderr

    picture = write_image(tmp_path / "a.png", 3, shape=(48, 40))
    ran = script("--load", logdir, "--run", picture, "--json")
    assert ran.returncode == 0, ran.stderr[-2000:]
    top = json.loads(ran.stdout.splitlines()[0])["top"]
    assert len(top) == 5 and all(CLASS_NAMES[t["class"]] == t["name"] for t in top)

    npz, packed = tmp_path / "m.npz", tmp_path / "m.packed"
    assert script("--load", logdir, "--export", npz).returncode == 0
    assert script("--load", npz, "--export-packed", packed).returncode == 0
    engine = script("--load", packed, "--engine", "packed", "--eval", "--data", layouts["binary"], "--batch", 32)
    assert engine.returncode == 0 and engine.stdout.splitlines()[-1] == "test error: " + error, engine.stderr
    again = script("--load", npz, "--run", picture, "--json")
    assert json.loads(again.stdout.splitlines()[0])["top"] == top


class Planted:
    """What a hostile data_batch_1 would hold: a call the unpickler must refuse."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.system, ("touch " + self.target,)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["planted pickle", "truncated bin"])
def test_bad_files_are_one_line_and_never_run(layouts, tmp_path, damage):
    import shutil

    layout = "python" if damage == "planted pickle" else "binary"
    data = shutil.copytree(layouts[layout], tmp_path / "data")
    pwned = tmp_path / "pwned"
    if damage == "planted pickle":
        batch = cifar_batch_dict(*shapes("train", 4))
        batch[b"labels"] = Planted(str(pwned))
        with open(data / "data_batch_1", "wb") as f:
            pickle.dump(batch, f, protocol=2)
        expected = r"^error: .*data_batch_1: .*posix\.system"
    else:
        size = os.path.getsize(data / "data_batch_3.bin")
        with open(data / "data_batch_3.bin", "r+b") as f:
            f.truncate(size - 100)
        expected = r"^error: .*data_batch_3\.bin: .*3073-byte records"
    out = script("--data", data, "--epochs", 1, "--steps-per-epoch", 1, "--batch", 8, "--logdir", tmp_path / "log")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(expected, lines[0]), out.stderr[-2000:]
    assert not pwned.exists()
