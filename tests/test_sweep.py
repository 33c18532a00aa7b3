"""--sweep: the (W,A,G) table, its JSON and plot; killed and resumed; a failing configuration; figures by hand."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, load_script
from dorefanet.sweep import RESULT_FILE, aggregate, format_results, run_name
from dorefanet.driver import make_model  # noqa: E402
from test_svhn import learnable_digits, write_mat

SCRIPT = os.path.join(ROOT, "svhn-digit-dorefa.py")


@pytest.fixture(scope="module")
def svhn():
    return load_script("svhn-digit-dorefa.py")


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "svhn"
    d.mkdir()
    write_mat(str(d / "train_32x32.mat"), *learnable_digits(96, 0))
    write_mat(str(d / "test_32x32.mat"), *learnable_digits(37, 1))
    return str(d)


# ---------------------------------------------------------------- the table, by hand
FIGURES = {"params": 2_080_000, "packed_bytes": 302_000, "float_bytes": 8_338_000, "bops": 4.86e9,
           "bops_vs_32": 0.1136, "macs": 4.1e7}


def record(bits, seed, error=None, seconds=2.0, failed=None):
    if failed:
        return {"bits": bits, "seed": seed, "status": "failed", "error": failed}
    return {"bits": bits, "seed": seed, "status": "ok", "test_error": error, "train_seconds": seconds,
            "train_seconds_complete": True}


def test_mean_and_sample_std_over_seeds_and_failures_in_the_table():
    records = [record("1,2,4", 0, 0.10, 3.0), record("1,2,4", 1, 0.20, 5.0), record("1,2,4", 2, 0.30, 4.0),
               record("8,8,8", 0, failed="boom: it broke"),
               record("1,1,4", 0, 0.25), record("1,1,4", 1, failed="out of memory"),
               {"bits": "2,2,4", "seed": 0, "status": "pending"}]
    rows = aggregate(records, ["1,2,4", "8,8,8", "1,1,4", "2,2,4"], lambda bits: FIGURES)
    first = rows[0]
    assert first["seeds"] == [0, 1, 2]
    assert first["test_error"] == pytest.approx(0.2)
    assert first["test_error_std"] == pytest.approx(0.1)   # sample std of 0.1, 0.2, 0.3
    assert first["train_seconds"] == pytest.approx(4.0)
    assert "test_error" not in rows[1] and rows[1]["failed"] == [{"seed": 0, "error": "boom: it broke"}]
    assert rows[2]["test_error_std"] is None and rows[2]["seeds"] == [0]

    table = format_results(rows, "T").splitlines()
    body = [line for line in table if line.startswith("| ") and not line.startswith("| W,A,G")]
    assert body[0].split(" | ")[1] == "20.00 ± 10.00"
    assert "2.08M" in body[0] and "0.302 MB" in body[0] and "4.86G" in body[0] and "4.0 s" in body[0]
    assert "failed: boom: it broke" in body[1]
    assert "25.00 (1 of 2 seeds; 1 failed: out of memory)" in body[2]
    assert "not run yet" in body[3]


def test_summary_figures_are_the_summary_totals(svhn):
    from dorefanet.driver import model_totals

    totals = model_totals(make_model(svhn, (1, 2, 4)))
    # conv0 and fc1 float (32 x 32); conv1..conv6 1-bit weights x 2-bit activations; MACs by hand
    float_macs = 5 * 5 * 3 * 48 * 36 * 36 + 512 * 10
    quantized = (3 * 3 * 48 * 64 * 18 * 18 + 3 * 3 * 64 * 64 * 18 * 18 + 3 * 3 * 64 * 128 * 7 * 7
                 + 3 * 3 * 128 * 128 * 7 * 7 + 3 * 3 * 128 * 128 * 5 * 5 + 5 * 5 * 128 * 512)
    assert totals["macs"] == float_macs + quantized
    assert totals["bops"] == float_macs * 32 * 32 + quantized * 1 * 2


# ---------------------------------------------------------------- flags
@pytest.mark.parametrize("extra, message", [
    (["--dorefa", "1,2,4"], "--sweep cannot be combined with --dorefa"),
    (["--layer-bits", "conv1=2,2,4"], "--sweep cannot be combined with --layer-bits"),
    (["--overwrite"], "--sweep cannot be combined with --overwrite"),
    (["--summary"], "--sweep cannot be combined with --summary"),
    (["--seeds", "0"], "--seeds must be a positive integer, got 0"),
])
def test_sweep_flag_errors(svhn, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        svhn.main(["--sweep", "1,2,4", "32,32,32", "--synthetic"] + extra)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_sweep_refuses_a_configuration_twice_and_seeds_without_sweep(svhn, capsys):
    with pytest.raises(SystemExit):
        svhn.main(["--sweep", "1,2,4", "1,2,4", "--synthetic"])
    assert "--sweep lists 1,2,4 more than once" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        svhn.main(["--seeds", "3", "--synthetic"])
    assert "--seeds only applies to --sweep" in capsys.readouterr().err


# ---------------------------------------------------------------- end to end
def processes_mentioning(text):
    """Live processes whose command line contains ``text`` (Linux /proc)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open("/proc/{}/cmdline".format(pid), "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def wait_gone(text, timeout=20):
    deadline = time.time() + timeout
    while processes_mentioning(text) and time.time() < deadline:
        time.sleep(0.05)
    return processes_mentioning(text)


def checkpoint_state(logdir):
    """Names and modification times of a run's checkpoint files: changes if it trained again."""
    return {name: os.stat(os.path.join(logdir, name)).st_mtime_ns for name in os.listdir(logdir)
            if name.startswith("model-") or name == "checkpoint"}


@pytest.mark.slow
def test_sweep_killed_resumed_failing_configuration_table_json_and_plot(svhn, data_dir, tmp_path, capsys):
    sweep_dir = str(tmp_path / "sweep")
    common = ["--data", data_dir, "--epochs", "3", "--steps-per-epoch", "6", "--batch", "16", "--workers", "0",
              "--logdir", sweep_dir]
    first, second, third = (os.path.join(sweep_dir, run_name(b, 0)) for b in ("32,32,32", "1,2,4", "8,8,8"))
    out_path = str(tmp_path / "sweep.out")
    cmd = [sys.executable, SCRIPT, "--sweep", "32,32,32", "1,2,4"] + common
    try:
        # 1. killed (SIGKILL, the sweep process alone) once the second run has its first checkpoint
        with open(out_path, "w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while not os.path.exists(os.path.join(second, "checkpoint")):
            assert proc.poll() is None, open(out_path).read()[-3000:]
            assert time.time() < deadline, "no checkpoint of the second run in time"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        # its training child dies with it (no run outlives its sweep)
        assert wait_gone(sweep_dir) == []
        assert os.path.exists(os.path.join(first, RESULT_FILE))
        assert not os.path.exists(os.path.join(second, RESULT_FILE))
        with open(os.path.join(second, "checkpoint")) as f:
            killed_at = int(f.read().split('"')[1].split("-")[-1])
        assert killed_at in (6, 12), killed_at   # the second run was really interrupted
        before = checkpoint_state(first)

        # 2. the same command, with one more configuration that cannot run (its run directory is a file)
        os.makedirs(sweep_dir, exist_ok=True)
        with open(third, "w") as f:
            f.write("in the way\n")
        again = subprocess.run(cmd[:5] + ["8,8,8"] + common, capture_output=True, text=True, timeout=400)
        assert again.returncode == 1, again.stderr[-3000:]
        assert "[sweep 1/3] 32,32,32 seed 0: reused: test error" in again.stdout
        assert "[sweep 3/3] 8,8,8 seed 0: FAILED:" in again.stdout
        assert "1 of 3 runs failed (8,8,8 seed 0)" in again.stderr
        assert checkpoint_state(first) == before            # the finished run was not retrained
        with open(os.path.join(second, "config.json")) as f:
            assert json.load(f)["resumed_at"][0]["step"] == killed_at
        with open(os.path.join(second, "checkpoint")) as f:
            assert '"model-18"' in f.read()

        with open(os.path.join(sweep_dir, "results.json")) as f:
            results = json.load(f)
        runs = {r["bits"]: r for r in results["runs"]}
        assert [r["bits"] for r in results["configs"]] == ["32,32,32", "1,2,4", "8,8,8"]
        assert runs["32,32,32"]["status"] == runs["1,2,4"]["status"] == "ok"
        assert runs["8,8,8"]["status"] == "failed" and third in runs["8,8,8"]["error"]
        assert runs["1,2,4"]["resumed"] is True and runs["32,32,32"]["resumed"] is False
        assert runs["1,2,4"]["train_seconds"] > 0 and "--dorefa 1,2,4" in runs["1,2,4"]["command"]
        assert results["command"][:2] == ["./svhn-digit-dorefa.py", "--sweep"]
        with open(os.path.join(second, "stats.json")) as f:
            stats = json.load(f)
        assert runs["1,2,4"]["test_error"] == stats[-1]["test-error"] and stats[-1]["epoch_num"] == 3
        assert runs["1,2,4"]["figures"]["bops"] < runs["32,32,32"]["figures"]["bops"]

        with open(os.path.join(sweep_dir, "results.md")) as f:
            table = f.read()
        assert table in again.stdout
        row = next(line for line in table.splitlines() if line.startswith("| 1,2,4 |"))
        assert row.split(" | ")[1] == "{:.2f}".format(100 * runs["1,2,4"]["test_error"])
        assert "failed: " in next(line for line in table.splitlines() if line.startswith("| 8,8,8 |"))
        with open(os.path.join(sweep_dir, "error_vs_bits.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        from matplotlib import image

        height, width = image.imread(os.path.join(sweep_dir, "error_vs_bits.png")).shape[:2]
        assert width >= 600 and height >= 400

        # 3. the sweep's error is what --eval of the run says
        code = svhn.main(["--load", second, "--eval", "--data", data_dir])
        printed = capsys.readouterr().out
        assert code == 0 and "test error: {:.4f}".format(runs["1,2,4"]["test_error"]) in printed
        # and its figures are --summary's of the run (bits from the run's own config.json)
        assert svhn.main(["--summary", "--json", "--load", second]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["dorefa"] == "1,2,4" and summary["totals"] == runs["1,2,4"]["figures"]

        # 4. trained but not recorded (killed between the two): read by --eval, not trained again
        os.remove(os.path.join(second, RESULT_FILE))
        with open(os.path.join(second, "stats.json"), "w") as f:
            json.dump(stats[:-1], f)
        before = checkpoint_state(second)
        only = subprocess.run([sys.executable, SCRIPT, "--sweep", "1,2,4"] + common, capture_output=True, text=True,
                              timeout=300)
        assert only.returncode == 0, only.stderr[-3000:]
        assert checkpoint_state(second) == before
        with open(os.path.join(second, RESULT_FILE)) as f:
            assert json.load(f)["test_error"] == pytest.approx(runs["1,2,4"]["test_error"], abs=5e-5)

        # 5. fewer --epochs than a run holds: no figure of other weights, a clear failure instead
        fewer = subprocess.run([sys.executable, SCRIPT, "--sweep", "1,2,4"] + common[:2] + ["--epochs", "2"] +
                               common[4:], capture_output=True, text=True, timeout=300)
        assert fewer.returncode == 1
        assert "holds 3 epochs, more than --epochs 2; use another --logdir" in fewer.stdout
        assert checkpoint_state(second) == before
    finally:
        for pid in processes_mentioning(sweep_dir):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_an_imagenet_script_sweeps_too(tmp_path):
    """The issue's command, at a smaller batch: the ImageNet flags reach every run, the table and plot are written."""
    sweep_dir = str(tmp_path / "resnet-sweep")
    cmd = [sys.executable, os.path.join(ROOT, "resnet-dorefa.py"), "--sweep", "1,4,32", "2,4,32", "--fake",
           "--epochs", "1", "--steps-per-epoch", "2", "--image-size", "64", "--batch", "8", "--workers", "0",
           "--logdir", sweep_dir]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        with open(os.path.join(sweep_dir, "results.json")) as f:
            results = json.load(f)
        runs = {r["bits"]: r for r in results["runs"]}
        assert sorted(runs) == ["1,4,32", "2,4,32"] and all(r["status"] == "ok" for r in runs.values())
        for bits, run in runs.items():
            assert "--image-size 64" in run["command"] and "--fake" in run["command"]
            with open(os.path.join(sweep_dir, run_name(bits, 0), "stats.json")) as f:
                assert run["test_error"] == json.load(f)[-1]["val-error-top1"]
        assert runs["2,4,32"]["figures"]["bops"] > runs["1,4,32"]["figures"]["bops"]
        with open(os.path.join(sweep_dir, "results.md")) as f:
            table = f.read()
        assert "ResNet-18 on random images (--fake), 1 epoch of 2 steps" in table and table in done.stdout
        with open(os.path.join(sweep_dir, "error_vs_bits.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    finally:
        for pid in processes_mentioning(sweep_dir):
            os.kill(pid, signal.SIGKILL)
