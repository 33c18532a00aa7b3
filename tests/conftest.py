"""Shared test helpers: import the project from the repository root and load its hyphenated scripts."""
import os
import signal
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from dorefanet import tf_setup  # noqa: E402,F401  (prepares TensorFlow before any test imports it)

from dorefanet.scripts import load_script  # noqa: E402,F401  (the one loader of hyphenated scripts)


@pytest.fixture
def session():
    """A fresh graph and a session bound to it; yields ``tf.compat.v1`` and the session."""
    from dorefanet.tf_setup import tf

    graph = tf.Graph()
    with graph.as_default():
        tf.set_random_seed(1234)
        with tf.Session(graph=graph) as sess:
            yield sess


def kill_after_first_checkpoint(cmd, logdir, timeout=240):
    """Start training ``cmd`` and SIGKILL it as soon as ``logdir`` has a checkpoint; return its step."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while not os.path.exists(os.path.join(logdir, "checkpoint")):
            assert proc.poll() is None, "training ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within the time limit"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    with open(os.path.join(logdir, "checkpoint")) as f:
        return int(f.read().split('"')[1].split("-")[-1])


def kill_group(proc):
    """SIGKILL the process group of ``proc`` (started with ``start_new_session=True``) and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


# runs a script as ``python SCRIPT ARGS`` would and reports at exit whether TensorFlow / tensorpack were imported
_IMPORT_PROBE = ("import atexit, runpy, sys\n"
                 "atexit.register(lambda: sys.stderr.write('\\nimported: tensorflow=%s tensorpack=%s\\n' % "
                 "('tensorflow' in sys.modules, 'tensorpack' in sys.modules)))\n"
                 "sys.argv = sys.argv[1:]\n"
                 "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def run_probed(name, *args):
    """Run the script ``name`` with ``args``; return its result and ``imported: tensorflow=X tensorpack=Y``."""
    import sys

    out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, os.path.join(ROOT, name)] + [str(a) for a in args],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    imported = [line for line in out.stderr.splitlines() if line.startswith("imported: ")]
    assert len(imported) == 1, out.stderr
    return out, imported[0]


def write_image(path, seed, shape=(70, 90)):
    """A PNG (or any extension cv2 writes) of random blobs at ``path``: distinct seeds, distinct predictions."""
    import cv2
    import numpy as np

    rng = np.random.RandomState(seed)
    image = cv2.resize(rng.randint(0, 256, size=(6, 8, 3)).astype(np.uint8), shape[::-1],
                       interpolation=cv2.INTER_LINEAR)
    os.makedirs(os.path.dirname(str(path)) or ".", exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return str(path)


def cifar_planes(rgb):
    """N x 32 x 32 x 3 RGB -> N x 3072 rows: the R plane, the G plane, the B plane (CIFAR-10's layout)."""
    import numpy as np

    return np.ascontiguousarray(rgb.transpose(0, 3, 1, 2)).reshape(len(rgb), 3072)


def write_cifar_bin(path, rgb, labels):
    """A file of CIFAR-10's binary version: 3073-byte records of a label byte and the RGB planes."""
    import numpy as np

    np.concatenate([np.asarray(labels, np.uint8)[:, None], cifar_planes(rgb)], axis=1).tofile(str(path))


def cifar_batch_dict(rgb, labels, name="training batch 1 of 5"):
    """The dict a batch of CIFAR-10's Python version pickles."""
    return {b"batch_label": name.encode(), b"labels": [int(x) for x in labels], b"data": cifar_planes(rgb),
            b"filenames": [b"image_%05d.png" % i for i in range(len(labels))]}


def write_cifar_py(path, rgb, labels, protocol=2):
    """A file of CIFAR-10's Python version (a pickle, as the official files are)."""
    import pickle

    with open(str(path), "wb") as f:
        pickle.dump(cifar_batch_dict(rgb, labels), f, protocol=protocol)


def write_cifar10(directory, layout, train, test):
    """All of CIFAR-10's files in ``layout`` (``binary``/``python``) from ``(rgb, labels)`` pairs; 5 train batches."""
    import numpy as np

    os.makedirs(str(directory), exist_ok=True)
    suffix, write = (".bin", write_cifar_bin) if layout == "binary" else ("", write_cifar_py)
    for i, part in enumerate(np.array_split(np.arange(len(train[1])), 5)):
        write(os.path.join(str(directory), "data_batch_{}{}".format(i + 1, suffix)), train[0][part], train[1][part])
    write(os.path.join(str(directory), "test_batch" + suffix), *test)
    return str(directory)


def random_weights(model, seed):
    """Values for every variable of ``model``: He-scaled weights, batch norm that keeps activations alive."""
    import numpy as np

    from dorefanet.checkpoints import expected_variables

    rng = np.random.RandomState(seed)
    values = {}
    for name, shape in expected_variables(model).items():
        leaf = name.split("/")[-1]
        if leaf == "W":
            values[name] = rng.randn(*shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
        elif leaf in ("Wp", "Wn", "gamma") or name.endswith("variance/EMA"):
            values[name] = rng.uniform(0.5, 1.5, shape)
        else:  # biases, beta, mean/EMA
            values[name] = rng.randn(*shape) * 0.1
    return {name: np.asarray(v, np.float32) for name, v in values.items()}
