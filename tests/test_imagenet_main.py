"""alexnet-dorefa.py and resnet-dorefa.py end to end through ``main()``: training (with 2 towers on the CPU),
resume, --eval, --run, --export, strict loading and the one-line errors.

The networks run at --image-size 64 (a hidden developer flag) with batches of 2-4 so that the whole file
takes well under two minutes on two cores; the published checkpoints need 224.
"""
import gc
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, kill_after_first_checkpoint, load_script, random_weights, write_image
from dorefanet.checkpoints import expected_variables, read_weights, save_npz

import imagenet_utils as iu
from dorefanet import cli
from dorefanet.driver import make_model  # noqa: E402

# tensorpack 0.11 threads call the deprecated Event.isSet()
pytestmark = pytest.mark.filterwarnings("ignore:isSet:DeprecationWarning")

alexnet = load_script("alexnet-dorefa.py")
resnet = load_script("resnet-dorefa.py")
CLASSES = iu.load_class_names()
SIZE = ["--image-size", "64"]


@pytest.fixture(autouse=True)
def _restore_cuda_visible_devices(monkeypatch):
    """main() sets CUDA_VISIBLE_DEVICES for --gpu; keep that from leaking into other tests."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    monkeypatch.delenv("TF_CONFIG", raising=False)  # a cluster in the shell would make training distributed


def run_main(script, argv, capsys):
    code = script.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def resnet_npz(tmp_path_factory):
    """A ResNet-18 1,4,32 model (shapes do not depend on the image size) with random values."""
    path = str(tmp_path_factory.mktemp("model") / "resnet.npz")
    save_npz(random_weights(make_model(resnet, (1, 4, 32), "channels_last"), seed=0), path)
    return path


@pytest.fixture(scope="module")
def ilsvrc(tmp_path_factory):
    """DIR/train/<wnid>/ (3 classes, 3 images each) and DIR/val/<wnid>/ (2 per class)."""
    root = tmp_path_factory.mktemp("ilsvrc")
    for label in (0, 7, 999):
        wnid = CLASSES[label][0]
        for i in range(3):
            write_image(root / "train" / wnid / "{}_{}.JPEG".format(wnid, i), seed=label * 10 + i)
        for i in range(2):
            write_image(root / "val" / wnid / "v{}.JPEG".format(i), seed=5000 + label * 10 + i)
    return str(root)


# ---------------------------------------------------------------- training, resume
def read_json(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow
def test_alexnet_trains_on_two_towers_then_refuses_a_finished_run_and_resumes_for_more_epochs(tmp_path, capsys):
    logdir = str(tmp_path / "log")
    argv = ["--fake", "--gpu", "0,1", "--batch", "4", "--epochs", "1", "--steps-per-epoch", "2",
            "--workers", "0", "--logdir", logdir] + SIZE
    assert alexnet.main(argv) == 0
    capsys.readouterr()
    assert os.path.exists(os.path.join(logdir, "model-2.index"))
    config = read_json(os.path.join(logdir, "config.json"))
    assert config["replicas"] == 2 and config["batch"] == 4 and config["data"] == "fake"
    assert config["data_format"] == "channels_last"  # the CPU default
    stats = read_json(os.path.join(logdir, "stats.json"))
    assert [s["epoch_num"] for s in stats] == [1]
    # a label outside the top 5 is outside the top 1: the top-5 error never exceeds the top-1 error
    assert 0 <= stats[0]["val-error-top5"] <= stats[0]["val-error-top1"] + 1e-9 <= 1 + 1e-9
    with open(os.path.join(logdir, "log.log")) as f:
        assert "Building graph for training tower 1 " in f.read()

    code, _, err = run_main(alexnet, argv, capsys)
    assert code == 2 and "finished run" in err and "--overwrite" in err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1

    more = list(argv)
    more[more.index("--epochs") + 1] = "2"
    assert alexnet.main(more) == 0
    capsys.readouterr()
    config = read_json(os.path.join(logdir, "config.json"))
    assert config["resumed_at"] == [dict(config["resumed_at"][0], step=2, epoch=2)]
    assert os.path.exists(os.path.join(logdir, "model-4.index"))
    assert [s["epoch_num"] for s in read_json(os.path.join(logdir, "stats.json"))] == [1, 2]


@pytest.fixture(scope="module")
def resnet_run(ilsvrc, tmp_path_factory):
    """ResNet-18 trained 2 steps on the tiny directory with one data-loading worker process."""
    logdir = str(tmp_path_factory.mktemp("resnet") / "log")
    code = resnet.main(["--data", ilsvrc, "--batch", "4", "--epochs", "1", "--steps-per-epoch", "2",
                        "--workers", "1", "--logdir", logdir] + SIZE)
    assert code == 0
    gc.collect()  # the data-loading worker reports its clean-up now, not in the middle of another test's output
    return logdir


@pytest.mark.slow
def test_resnet_trains_on_an_ilsvrc_directory(resnet_run):
    config = read_json(os.path.join(resnet_run, "config.json"))
    assert config["train_images"] == 9 and config["model"] == "resnet18" and config["dorefa"] == "1,4,32"
    assert config["recipe"]["lr_schedule"] == [[30, 0.01], [60, 0.001], [85, 0.0001]]
    stats = read_json(os.path.join(resnet_run, "stats.json"))
    assert stats[-1]["global_step"] == 2
    assert {"val-error-top1", "val-error-top5", "validation_xentropy-loss", "learning_rate"} <= set(stats[-1])
    assert stats[-1]["learning_rate"] == pytest.approx(0.1)


@pytest.mark.slow
def test_export_drops_training_state_and_reloads(resnet_run, tmp_path, capsys):
    out = str(tmp_path / "exported.npz")
    code, stdout, _ = run_main(resnet, ["--load", resnet_run, "--export", out], capsys)
    assert code == 0 and out in stdout
    with np.load(out, allow_pickle=False) as data:
        names = set(data.files)
    assert names == set(expected_variables(make_model(resnet, (1, 4, 32))))
    image = write_image(tmp_path / "x.png", seed=1)
    results = []
    for source in (resnet_run, out):
        code, stdout, _ = run_main(resnet, ["--load", source, "--run", image, "--json"] + SIZE, capsys)
        assert code == 0
        results.append(json.loads(stdout))
    assert results[0] == results[1]


# ---------------------------------------------------------------- --run and --eval
@pytest.mark.slow
def test_run_json_format_and_eval_agree(resnet_npz, tmp_path, capsys):
    """--run --json has the documented format; --eval's errors equal those counted from --run's top-5 lists."""
    val = tmp_path / "data" / "val"
    paths = [write_image(val / "ILSVRC2012_val_{:08d}.JPEG".format(i), seed=100 + i, shape=(64 + 7 * i, 90))
             for i in range(7)]
    colon = str(tmp_path / "colon.npz")  # the same model with TensorFlow's ':0' suffixes
    with np.load(resnet_npz) as data:
        np.savez(colon, **{name + ":0": data[name] for name in data.files})
    code, out, err = run_main(resnet, ["--load", colon, "--run"] + paths + ["--json"] + SIZE, capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == len(paths)
    results = [json.loads(line) for line in lines]
    for path, result in zip(paths, results):
        assert list(result) == ["image", "top"] and result["image"] == path
        assert len(result["top"]) == 5
        for entry in result["top"]:
            assert list(entry) == ["class", "wnid", "name", "prob"]
            assert isinstance(entry["class"], int) and isinstance(entry["prob"], float)
            assert (entry["wnid"], entry["name"]) == CLASSES[entry["class"]]
        probs = [entry["prob"] for entry in result["top"]]
        assert probs == sorted(probs, reverse=True) and 0 < probs[0] <= 1
        assert len({entry["class"] for entry in result["top"]}) == 5
    assert len({tuple(e["class"] for e in r["top"]) for r in results}) > 1  # not a constant network

    # Labels chosen from --run's answers: image i is right (i % 3 == 0), right only in the top 5
    # (i % 3 == 1, the 3rd guess) or wrong in both (i % 3 == 2, a class outside the top 5).
    lines = []
    for i, (path, result) in enumerate(zip(paths, results)):
        top = [entry["class"] for entry in result["top"]]
        label = top[0] if i % 3 == 0 else top[2] if i % 3 == 1 else min(set(range(1000)) - set(top))
        lines.append("{} {}".format(os.path.basename(path), label))
    (tmp_path / "data" / "val.txt").write_text("\n".join(lines) + "\n")
    expected_top1 = sum(i % 3 != 0 for i in range(7)) / 7
    expected_top5 = sum(i % 3 == 2 for i in range(7)) / 7
    # batch 3: batches of 3, 3 and 1, so the partial last batch counts
    code, out, err = run_main(resnet, ["--load", resnet_npz, "--eval", "--data", str(tmp_path / "data"),
                                       "--batch", "3", "--workers", "2"] + SIZE, capsys)
    assert code == 0, err
    assert out == "top-1 error: {:.4f}\ntop-5 error: {:.4f}\n".format(expected_top1, expected_top5)
    assert "evaluated 7 images" in err


@pytest.mark.slow
def test_run_reports_bad_images_and_still_processes_the_rest(resnet_npz, tmp_path, capsys):
    good = write_image(tmp_path / "good.png", seed=3)
    bad = str(tmp_path / "bad.jpg")
    with open(bad, "w") as f:
        f.write("not an image")
    missing = str(tmp_path / "missing.png")
    code, out, err = run_main(resnet, ["--load", resnet_npz, "--run", bad, good, missing] + SIZE, capsys)
    assert code == 1
    lines = out.splitlines()
    assert lines[0].startswith(good + ": ") and len(lines) == 5  # the best class, then 4 more
    name = CLASSES[int(lines[0].split(": ")[1].split()[0])][1]
    assert name in lines[0]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and bad in errors[0] and missing in errors[1]
    assert "Traceback" not in err


@pytest.mark.slow
def test_eval_with_fake_data_is_quick(resnet_npz, capsys):
    code, out, _ = run_main(resnet, ["--load", resnet_npz, "--eval", "--fake", "--batch", "2"] + SIZE, capsys)
    assert code == 0
    assert [line.split(":")[0] for line in out.splitlines()] == ["top-1 error", "top-5 error"]


# ---------------------------------------------------------------- strict loading
@pytest.fixture(scope="module")
def alexnet_ttq_npz(tmp_path_factory):
    """A t,32,32 AlexNet for 64x64 inputs (fc0 256x4096): zeros are enough, loading fails first."""
    shapes = expected_variables(make_model(alexnet, ("t", 32, 32), "channels_last", 64))
    path = str(tmp_path_factory.mktemp("ttq") / "AlexNet-t,32,32.npz")
    save_npz({name: np.zeros(shape, np.float32) for name, shape in shapes.items()}, path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("mode", [["--run", "x.png"], ["--eval", "--fake"], ["--export", "out.npz"]])
def test_ttq_weights_with_other_bits_list_wp_and_wn(alexnet_ttq_npz, capsys, mode):
    code, _, err = run_main(alexnet, ["--dorefa", "1,2,6", "--load", alexnet_ttq_npz] + mode + SIZE, capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: " + alexnet_ttq_npz)
    assert "unexpected conv1/Wn, conv1/Wp" in err and "fc1/Wp" in err and "missing" not in err


def test_weights_for_another_image_size_are_refused(alexnet_ttq_npz, capsys):
    code, _, err = run_main(alexnet, ["--dorefa", "t,32,32", "--load", alexnet_ttq_npz, "--run", "x.png"], capsys)
    assert code == 2 and "wrong shape fc0/W (file (256, 4096), graph (9216, 4096))" in err


def test_missing_and_pickled_weights(tmp_path, capsys):
    code, _, err = run_main(resnet, ["--load", str(tmp_path / "nope.npz"), "--run", "x.png"], capsys)
    assert code == 2 and "nope.npz: file not found" in err
    pickled = str(tmp_path / "pickled.npz")
    np.savez(pickled, **{"conv1/W": np.array([object()], dtype=object)})
    code, _, err = run_main(resnet, ["--load", pickled, "--run", "x.png"], capsys)
    assert code == 2 and "pickle" in err


# ---------------------------------------------------------------- bad directories, flags
@pytest.mark.slow
def test_bad_data_directories(tmp_path, resnet_npz, capsys):
    code, _, err = run_main(resnet, ["--load", resnet_npz, "--eval", "--data", str(tmp_path / "nope")], capsys)
    assert code == 2 and err.startswith("error: ImageNet directory") and "nope" in err
    (tmp_path / "only_val" / "val").mkdir(parents=True)
    logdir = tmp_path / "log"
    code, _, err = run_main(resnet, ["--data", str(tmp_path / "only_val"), "--logdir", str(logdir)], capsys)
    assert code == 2 and str(tmp_path / "only_val" / "train") in err and err.count("\n") == 1
    assert not logdir.exists()  # nothing is created for a run that cannot start


@pytest.mark.parametrize("argv, message", [
    (["--fake", "--data", "x"], "--fake and --data cannot be combined"),
    ([], "give --data ILSVRC_DIR"),
    (["--load", "m.npz", "--eval"], "give --data ILSVRC_DIR (with train/<wnid>/ and val/) or --fake"),
    (["--load", "m.npz", "--run", "a.png", "--fake"], "--data and --fake do not apply"),
    (["--fake", "--gpu", "0,1", "--batch", "5"], "--batch 5 cannot be split evenly over 2 towers"),
    (["--fake", "--gpu", "0,x"], "--gpu takes distinct comma-separated GPU ids"),
    (["--fake", "--epochs", "0"], "--epochs must be a positive integer"),
    (["--fake", "--workers", "-1"], "--workers must be >= 0"),
    (["--fake", "--image-size", "32"], "--image-size must be at least 64"),
    (["--eval"], "needs --load"),
])
def test_flag_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        alexnet.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err, err


@pytest.mark.parametrize("script, default_bits", [(alexnet, "1,2,6"), (resnet, "1,4,32")])
def test_help(script, default_bits, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0
    for flag in ("--fake", "--trainer {replicated,collective}", "--cluster", "--task",
                 "--worker-timeout", "--data-format", "--steps-per-epoch", "--workers",
                 "--overwrite", "--export", "--json", default_bits):
        assert flag in out
    assert "--image-size" not in out  # a hidden developer flag


def test_cpu_defaults():
    parser, args = cli.parse_args(alexnet, ["--fake"])
    cli.resolve_devices(parser, alexnet.RECIPE, args)
    assert (args.towers, args.data_format, args.batch, args.epochs) == (1, "channels_last", 256, 90)
    assert args.steps_per_epoch is None and args.trainer == "replicated"


# ---------------------------------------------------------------- kill and resume
@pytest.mark.slow
def test_sigkill_then_same_command_resumes(tmp_path):
    logdir = str(tmp_path / "log")
    cmd = [sys.executable, os.path.join(ROOT, "resnet-dorefa.py"), "--fake", "--batch", "2", "--epochs", "4",
           "--steps-per-epoch", "3", "--workers", "0", "--logdir", logdir] + SIZE
    killed_at = kill_after_first_checkpoint(cmd, logdir, timeout=120)
    assert killed_at in (3, 6, 9), killed_at
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    config = read_json(os.path.join(logdir, "config.json"))
    assert config["resumed_at"][0]["step"] == killed_at
    assert config["resumed_at"][0]["epoch"] == killed_at // 3 + 1
    assert read_json(os.path.join(logdir, "stats.json"))[-1]["global_step"] == 12
    assert read_weights(logdir)["fct/W"].shape == (512, 1000)
