"""The same command with the same --seed ends with the same variables, bit for bit; another seed does not."""
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, write_cifar10
from dorefanet.cifar_data import synthetic_cifar
from dorefanet.tf_setup import tf


def final_variables(logdir):
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(logdir)))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def train(script, tmp_path, name, seed, workers, *data):
    logdir = tmp_path / name
    cmd = [sys.executable, os.path.join(ROOT, script), *data, "--seed", str(seed), "--workers", str(workers),
           "--epochs", "1", "--steps-per-epoch", "4", "--batch", "16", "--logdir", str(logdir)]
    # each run its own hash seed: nothing may depend on the order of a set or a dict of strings
    env = dict(os.environ, PYTHONHASHSEED=str(100 + seed + 7 * workers))
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return final_variables(logdir), out.stdout.splitlines()[-1].split(";")[0]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["svhn-digit-dorefa.py", "cifar10-resnet-dorefa.py"])
def test_same_seed_same_weights_whatever_the_workers(script, tmp_path):
    if script.startswith("svhn"):
        data = ["--synthetic", "--dorefa", "1,2,4"]   # fg's noise, dropout and the augmentation all drawn
    else:
        train_set, test_set = synthetic_cifar("train", size=200, workers=1), synthetic_cifar("test", size=40)
        data = ["--data", write_cifar10(tmp_path / "cifar", "binary", train_set, test_set), "--dorefa", "2,2,4"]
    first, first_line = train(script, tmp_path, "a", 3, 2, *data)
    again, again_line = train(script, tmp_path, "b", 3, 0, *data)
    assert first_line.startswith("done: test error ") and first_line == again_line
    assert sorted(first) == sorted(again)
    differ = [name for name in first if not np.array_equal(first[name], again[name])]
    assert differ == []
    if script.startswith("cifar"):   # another seed, another run (one script is enough: the suite's time)
        other, _ = train(script, tmp_path, "c", 4, 2, *data)
        weights = [name for name in first if name.endswith("/W")]
        assert all(not np.array_equal(first[name], other[name]) for name in weights) and len(weights) == 22
