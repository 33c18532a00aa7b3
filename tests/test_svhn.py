"""svhn-digit-dorefa.py end to end on tiny generated SVHN-format data (no network)."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from scipy.io import savemat

from conftest import ROOT, kill_after_first_checkpoint, load_script
from dorefanet.tf_setup import tf
from dorefanet.driver import make_model  # noqa: E402

SCRIPT = os.path.join(ROOT, "svhn-digit-dorefa.py")


def learnable_digits(n, seed):
    """RGB 32x32 images whose class is a bright bar at a class-specific row: learnable in a few steps."""
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, 10, size=n)
    images = rng.randint(0, 60, size=(n, 32, 32, 3)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 + 3 * c: 4 + 3 * c, 4:28, :] = 230
    return images, labels


def write_mat(path, images, labels):
    # SVHN layout: X is 32x32x3xN RGB, y is Nx1 with 10 for digit 0
    y = np.where(labels == 0, 10, labels).reshape(-1, 1).astype(np.uint8)
    savemat(path, {"X": np.ascontiguousarray(images.transpose(1, 2, 3, 0)), "y": y})


@pytest.fixture(scope="module")
def svhn_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("svhn")
    write_mat(str(d / "train_32x32.mat"), *learnable_digits(96, 0))
    write_mat(str(d / "test_32x32.mat"), *learnable_digits(37, 1))   # 37: a partial last batch
    return str(d)


@pytest.fixture(scope="module")
def svhn():
    return load_script("svhn-digit-dorefa.py")


def run_main(svhn, argv, capsys):
    code = svhn.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------ data
def test_mat_loading_flips_to_bgr_and_maps_label_10_to_0(svhn_dir):
    from dorefanet.svhn_data import load_svhn_mat

    images, labels = load_svhn_mat(os.path.join(svhn_dir, "test_32x32.mat"))
    rgb, expected = learnable_digits(37, 1)
    np.testing.assert_array_equal(images, rgb[..., ::-1])
    np.testing.assert_array_equal(labels, expected)
    assert images.dtype == np.uint8 and labels.dtype == np.int32


def test_extra_is_mixed_into_training(tmp_path):
    from dorefanet.svhn_data import load_svhn

    write_mat(str(tmp_path / "train_32x32.mat"), *learnable_digits(10, 0))
    write_mat(str(tmp_path / "extra_32x32.mat"), *learnable_digits(7, 2))
    assert len(load_svhn(str(tmp_path), "train")[1]) == 17


@pytest.mark.parametrize("case, message", [
    ("missing", "file not found"),
    ("truncated", "truncated or corrupt"),
    ("no_y", "needs 'X' and 'y'"),
    ("wrong_shape", "'X' is uint8 of shape (28, 28, 3, 5)"),
    ("bad_labels", "labels must be 1-10"),
])
def test_bad_mat_files_get_one_clear_error(tmp_path, case, message):
    from dorefanet.svhn_data import SVHNDataError, load_svhn_mat

    path = str(tmp_path / "test_32x32.mat")
    images, labels = learnable_digits(5, 0)
    if case == "truncated":
        write_mat(path, images, labels)
        with open(path, "r+b") as f:
            f.truncate(300)
    elif case == "no_y":
        savemat(path, {"X": images.transpose(1, 2, 3, 0)})
    elif case == "wrong_shape":
        savemat(path, {"X": np.zeros((28, 28, 3, 5), np.uint8), "y": np.ones((5, 1))})
    elif case == "bad_labels":
        savemat(path, {"X": images.transpose(1, 2, 3, 0), "y": np.zeros((5, 1))})
    with pytest.raises(SVHNDataError) as err:
        load_svhn_mat(path)
    text = str(err.value)
    assert message in text and path in text and "ufldl.stanford.edu/housenumbers" in text
    assert "\n" not in text


def test_synthetic_digits_are_deterministic_and_train_test_disjoint():
    from dorefanet.svhn_data import synthetic_digits

    a_images, a_labels = synthetic_digits("train", seed=3, size=600, workers=2)   # two render processes
    b_images, b_labels = synthetic_digits("train", seed=3, size=40, workers=1)
    t_images, _ = synthetic_digits("test", seed=3, size=40, workers=1)
    np.testing.assert_array_equal(a_images[:40], b_images)
    np.testing.assert_array_equal(a_labels[:40], b_labels)
    assert a_images.shape == (600, 32, 32, 3) and a_images.dtype == np.uint8
    assert not any((t == a).all() for t in t_images for a in a_images)
    assert set(a_labels) == set(range(10))
    assert a_images.std() > 20  # not blank


# ------------------------------------------------------------------ the network
def test_graph_layers_and_quantized_weights():
    svhn = load_script("svhn-digit-dorefa.py")
    from dorefanet.checkpoints import expected_variables

    shapes = expected_variables(make_model(svhn, ("t", 32, 32)))
    assert shapes["conv0/W"] == (5, 5, 3, 48) and shapes["conv6/W"] == (5, 5, 128, 512)
    assert shapes["fc1/W"] == (512, 10) and shapes["bn6/mean/EMA"] == (512,)
    ttq = {n for n in shapes if n.endswith(("/Wp", "/Wn"))}
    assert ttq == {"conv{}/{}".format(i, s) for i in range(1, 7) for s in ("Wp", "Wn")}


@pytest.mark.slow
@pytest.mark.parametrize("bits", [(32, 32, 32), (1, 2, 4), (1, 1, 4), ("t", 32, 32)])
def test_a_few_training_steps_decrease_the_loss(bits):
    from tensorpack.tfutils.tower import TowerContext

    svhn = load_script("svhn-digit-dorefa.py")
    rgb, labels = learnable_digits(64, 5)
    images = np.stack([svhn.DATA.preprocess(None)(im) for im in rgb[..., ::-1]])
    with tf.Graph().as_default():
        tf.set_random_seed(0)
        model = make_model(svhn, bits, steps_per_epoch=10)
        x = tf.placeholder(tf.float32, [None, 40, 40, 3])
        y = tf.placeholder(tf.int32, [None])
        with TowerContext("", is_training=True):
            cost = model.build_graph(x, y)
        step = model.optimizer().minimize(cost, global_step=tf.train.get_or_create_global_step())
        step = tf.group(step, *tf.get_collection(tf.GraphKeys.UPDATE_OPS))
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            losses = [sess.run([cost, step], {x: images, y: labels})[0] for _ in range(25)]
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses


# ------------------------------------------------------------------ train, eval, run, export
@pytest.fixture(scope="module")
def trained(svhn, svhn_dir, tmp_path_factory):
    logdir = str(tmp_path_factory.mktemp("run") / "log")
    code = svhn.main(["--dorefa", "1,2,4", "--data", svhn_dir, "--epochs", "2", "--steps-per-epoch", "3",
                      "--batch", "16", "--workers", "0", "--logdir", logdir])
    assert code == 0
    return logdir


@pytest.mark.slow
def test_training_writes_checkpoints_stats_events_and_config(trained):
    files = os.listdir(trained)
    assert "checkpoint" in files and "model-6.index" in files
    assert any(f.startswith("events.out.tfevents") for f in files)
    with open(os.path.join(trained, "stats.json")) as f:
        stats = json.load(f)
    assert [s["epoch_num"] for s in stats] == [1, 2]
    assert all(0 <= s["test-error"] <= 1 for s in stats)
    with open(os.path.join(trained, "config.json")) as f:
        config = json.load(f)
    assert config["dorefa"] == "1,2,4" and config["seed"] == 0 and config["steps_per_epoch"] == 3
    assert "tensorflow" in config["versions"] and "tensorpack" in config["versions"]


@pytest.mark.slow
def test_finished_run_is_not_overwritten_silently(svhn, svhn_dir, trained, capsys):
    argv = ["--dorefa", "1,2,4", "--data", svhn_dir, "--epochs", "2", "--steps-per-epoch", "3",
            "--batch", "16", "--workers", "0", "--logdir", trained]
    code, _, err = run_main(svhn, argv, capsys)
    assert code == 2 and "finished run" in err and "--overwrite" in err
    assert os.path.exists(os.path.join(trained, "model-6.index"))


@pytest.mark.slow
def test_eval_agrees_with_errors_counted_from_run_json(svhn, svhn_dir, trained, tmp_path, capsys):
    code, out, _ = run_main(svhn, ["--dorefa", "1,2,4", "--load", trained, "--eval", "--data", svhn_dir], capsys)
    assert code == 0
    reported = float(out.strip().splitlines()[-1].split("test error:")[1])

    from dorefanet.svhn_data import load_svhn_mat
    images, labels = load_svhn_mat(os.path.join(svhn_dir, "test_32x32.mat"))
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / "{}.png".format(i)))
        cv2.imwrite(paths[-1], image)
    code, out, _ = run_main(svhn, ["--dorefa", "1,2,4", "--load", trained, "--run"] + paths + ["--json"], capsys)
    assert code == 0
    results = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["image"] for r in results] == paths
    for r in results:
        probs = [t["prob"] for t in r["top"]]
        assert probs == sorted(probs, reverse=True) and len(r["top"]) == 5
    wrong = sum(r["top"][0]["class"] != label for r, label in zip(results, labels))
    assert reported == pytest.approx(wrong / len(labels), abs=5e-5)
    assert "{:.4f}".format(wrong / len(labels)) in "{:.4f}".format(reported)


@pytest.mark.slow
def test_export_then_reload_gives_bit_identical_predictions(svhn, trained, tmp_path, capsys):
    image = str(tmp_path / "digit.png")
    cv2.imwrite(image, cv2.resize(learnable_digits(1, 9)[0][0], (50, 70)))  # any size is accepted
    npz = str(tmp_path / "model.npz")
    code, out, _ = run_main(svhn, ["--dorefa", "1,2,4", "--load", trained, "--export", npz], capsys)
    assert code == 0 and os.path.exists(npz)
    with np.load(npz, allow_pickle=False) as data:
        names = set(data.files)
    assert "conv1/W" in names and not any("Adam" in n or "global_step" in n for n in names)
    outs = []
    for source in (trained, npz):
        code, out, _ = run_main(svhn, ["--dorefa", "1,2,4", "--load", source, "--run", image, "--json"], capsys)
        assert code == 0
        outs.append(json.loads(out))
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_run_reports_bad_images_and_still_processes_the_rest(svhn, trained, tmp_path, capsys):
    good = str(tmp_path / "good.png")
    cv2.imwrite(good, learnable_digits(1, 3)[0][0])
    bad = str(tmp_path / "bad.jpg")
    with open(bad, "w") as f:
        f.write("not an image")
    missing = str(tmp_path / "missing.png")
    code, out, err = run_main(svhn, ["--dorefa", "1,2,4", "--load", trained, "--run", bad, good, missing], capsys)
    assert code == 1
    assert out.startswith(good + ": ")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and bad in errors[0] and missing in errors[1]


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    ("drop", "missing conv3/W"), ("add", "unexpected extra/W"), ("reshape", "wrong shape fc1/W")])
def test_strict_loading_names_the_mismatch(svhn, svhn_dir, trained, tmp_path, capsys, change, message):
    from dorefanet.checkpoints import read_weights, save_npz

    weights = read_weights(trained)
    if change == "drop":
        del weights["conv3/W"]
    elif change == "add":
        weights["extra/W"] = np.zeros(3, np.float32)
    else:
        weights["fc1/W"] = np.zeros((10, 512), np.float32)
    npz = str(tmp_path / "bad.npz")
    save_npz(weights, npz)
    for mode in (["--eval", "--data", svhn_dir], ["--run", npz], ["--export", npz + ".out"]):
        code, _, err = run_main(svhn, ["--dorefa", "1,2,4", "--load", npz] + mode, capsys)
        assert code == 2 and message in err and npz in err, (mode, err)


@pytest.mark.slow
def test_wrong_bits_and_pickled_npz_are_refused(svhn, trained, tmp_path, capsys):
    # a logdir knows its bits: flags that contradict them are refused before any weight is read
    code, _, err = run_main(svhn, ["--dorefa", "t,32,32", "--load", trained, "--run", "x.png"], capsys)
    assert code == 2 and "was trained with conv1 at 1,2,4, not t,32,32" in err
    # an .npz does not: strict loading names what the graph lacks
    npz = str(tmp_path / "exported.npz")
    assert run_main(svhn, ["--load", trained, "--export", npz], capsys)[0] == 0
    code, _, err = run_main(svhn, ["--dorefa", "t,32,32", "--load", npz, "--run", "x.png"], capsys)
    assert code == 2 and "missing conv1/Wn" in err
    pickled = str(tmp_path / "pickled.npz")
    np.savez(pickled, **{"conv1/W": np.array([object()], dtype=object)})
    code, _, err = run_main(svhn, ["--load", pickled, "--run", "x.png"], capsys)
    assert code == 2 and "pickle" in err


@pytest.mark.parametrize("argv, message", [
    (["--synthetic", "--data", "x"], "cannot be combined"),
    (["--epochs", "3"], "--data SVHN_DIR"),
    (["--synthetic", "--batch", "0"], "--batch must be a positive integer"),
])
def test_flag_errors(svhn, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        svhn.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_missing_data_dir_is_one_clear_error(svhn, tmp_path, capsys):
    code, _, err = run_main(svhn, ["--data", str(tmp_path / "nope"), "--logdir", str(tmp_path / "l")], capsys)
    assert code == 2 and "not a directory" in err and "train_32x32.mat" in err


@pytest.mark.slow
@pytest.mark.parametrize("damage, message", [
    ("truncate", "last checkpoint cannot be read"),
    ("index", "last checkpoint cannot be read"),
    ("config", "no readable config.json"),
])
def test_damaged_logdir_is_one_clear_error(svhn, svhn_dir, trained, tmp_path, capsys, damage, message):
    import shutil

    logdir = str(tmp_path / "copy")
    shutil.copytree(trained, logdir)
    if damage == "truncate":
        for name in os.listdir(logdir):
            if name.startswith("model-6.data"):
                with open(os.path.join(logdir, name), "r+b") as f:
                    f.truncate(10)
    elif damage == "index":
        with open(os.path.join(logdir, "checkpoint"), "w") as f:
            f.write('model_checkpoint_path: "model-99"\n')
    else:
        os.remove(os.path.join(logdir, "config.json"))
    argv = ["--dorefa", "1,2,4", "--data", svhn_dir, "--epochs", "3", "--steps-per-epoch", "3",
            "--batch", "16", "--workers", "0", "--logdir", logdir]
    code, _, err = run_main(svhn, argv, capsys)
    assert code == 2 and message in err and "--overwrite" in err, err
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ kill and resume
@pytest.mark.slow
def test_sigkill_then_same_command_resumes(svhn_dir, tmp_path):
    logdir = str(tmp_path / "log")
    cmd = [sys.executable, SCRIPT, "--dorefa", "1,1,4", "--data", svhn_dir, "--epochs", "5",
           "--steps-per-epoch", "6", "--batch", "16", "--workers", "0", "--logdir", logdir]
    killed_at = kill_after_first_checkpoint(cmd, logdir, timeout=240)
    assert killed_at in (6, 12, 18), killed_at   # a whole epoch; the run was killed before finishing
    assert killed_at < 30

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(os.path.join(logdir, "config.json")) as f:
        config = json.load(f)
    assert config["resumed_at"][0]["step"] == killed_at
    assert config["resumed_at"][0]["epoch"] == killed_at // 6 + 1
    with open(os.path.join(logdir, "checkpoint")) as f:
        assert '"model-30"' in f.read()
    with open(os.path.join(logdir, "stats.json")) as f:
        stats = json.load(f)
    epochs = [s["epoch_num"] for s in stats]
    # the killed epoch's statistics may be missing (the kill can land between its
    # checkpoint and its stats), but none is duplicated and every resumed epoch is there
    assert epochs == sorted(set(epochs))
    assert set(range(killed_at // 6 + 1, 6)) <= set(epochs) <= {1, 2, 3, 4, 5}
    assert stats[-1]["global_step"] == 30
