"""Logdirs given as relative or absolute paths, moved or copied, and held by one run at a time."""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, kill_group
from dorefanet.checkpoints import latest_checkpoint, read_weights
from dorefanet.errors import TrainingSetupError
from dorefanet.logdir_lock import LOCK_FILE, lock_logdir


def _save(logdir, relative, value=1.5, step=7):
    """A TensorFlow checkpoint of one variable in ``logdir``, its state file relative or absolute."""
    from dorefanet.tf_setup import tf

    with tf.Graph().as_default():
        var = tf.get_variable("w", initializer=tf.constant([value, 2.0]))
        saver = tf.train.Saver(save_relative_paths=relative)
        with tf.Session() as sess:
            sess.run(var.initializer)
            os.makedirs(logdir, exist_ok=True)
            saver.save(sess, os.path.join(os.path.abspath(logdir), "model"), global_step=step)


def _state(logdir):
    with open(os.path.join(logdir, "checkpoint")) as f:
        return f.readline().split('"')[1]


@pytest.mark.parametrize("relative", [True, False], ids=["relative-state", "absolute-state"])
def test_a_logdir_is_found_from_relative_and_absolute_paths_and_after_a_move(tmp_path, monkeypatch, relative):
    monkeypatch.chdir(tmp_path)
    _save("runs/a", relative)
    assert os.path.isabs(_state("runs/a")) != relative     # the state file is written as asked
    for path in ("runs/a", "./runs/a", "runs/../runs/a", str(tmp_path / "runs" / "a")):
        assert os.path.exists(latest_checkpoint(path) + ".index"), path
        assert read_weights(path)["w"].tolist() == [1.5, 2.0]
    monkeypatch.chdir(tmp_path / "runs")
    assert read_weights("a")["w"].tolist() == [1.5, 2.0]
    # moved, and copied: an absolute state file now names a place that is gone (or another run)
    shutil.move(str(tmp_path / "runs" / "a"), str(tmp_path / "moved"))
    shutil.copytree(str(tmp_path / "moved"), str(tmp_path / "copied"))
    monkeypatch.chdir(tmp_path)
    for path in ("moved", "copied", str(tmp_path / "copied")):
        assert os.path.dirname(os.path.abspath(latest_checkpoint(path))) == os.path.abspath(path)
        assert read_weights(path)["w"].tolist() == [1.5, 2.0]


def test_a_copied_logdir_reads_its_own_checkpoint_not_the_original(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _save("orig", relative=False, value=1.0)
    shutil.copytree("orig", "copy")
    _save("copy", relative=False, value=3.0)     # the copy trains on: its own state file, its own path
    assert read_weights("copy")["w"][0] == 3.0 and read_weights("orig")["w"][0] == 1.0


def test_a_state_file_naming_a_missing_checkpoint_is_one_line(tmp_path):
    from dorefanet.errors import ModelLoadError

    _save(str(tmp_path / "run"), relative=True)
    for name in os.listdir(tmp_path / "run"):
        if name.startswith("model-"):
            os.remove(tmp_path / "run" / name)
    with pytest.raises(ModelLoadError, match="not a readable TensorFlow checkpoint"):
        read_weights(str(tmp_path / "run"))


# ------------------------------------------------------------------ one run per logdir
_HOLD = """
import os, sys, time
from dorefanet.logdir_lock import lock_logdir
lock = lock_logdir({logdir!r})
if {fork}:
    if os.fork() == 0:          # a child that outlives its parent, as orphaned data workers do
        time.sleep(60)
        os._exit(0)
print("held", flush=True)
time.sleep(60)
"""


def _holder(logdir, fork=False):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD.format(logdir=logdir, fork=fork)],
                            stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _snapshot(directory):
    files = {}
    for base, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = (hashlib.sha256(f.read()).hexdigest(),
                                                           os.stat(path).st_mtime_ns)
    return files


@pytest.mark.slow
def test_a_held_logdir_is_refused_naming_the_holder_and_freed_when_it_is_killed(tmp_path):
    logdir = str(tmp_path / "run")
    holder = _holder(logdir)
    try:
        before = _snapshot(logdir)
        with pytest.raises(TrainingSetupError) as err:
            lock_logdir(logdir)
        assert str(err.value) == ("{} is in use by another run (process {}); wait for it to end, or choose another "
                                  "--logdir".format(logdir, holder.pid))
        assert _snapshot(logdir) == before
    finally:
        kill_group(holder)
    with lock_logdir(logdir) as lock:       # SIGKILL leaves no stale lock
        assert lock.held
    assert os.path.exists(os.path.join(logdir, LOCK_FILE))


@pytest.mark.slow
def test_a_forked_child_does_not_keep_the_lock_after_its_parent_is_killed(tmp_path):
    logdir = str(tmp_path / "run")
    holder = _holder(logdir, fork=True)
    os.kill(holder.pid, signal.SIGKILL)      # the parent only: its child sleeps on
    holder.wait()
    try:
        with lock_logdir(logdir):
            pass
    finally:
        kill_group(holder)


def test_a_released_lock_can_be_taken_again_in_the_same_process(tmp_path):
    logdir = str(tmp_path / "run")
    lock = lock_logdir(logdir)
    lock.release()
    assert not lock.held
    lock_logdir(logdir).release()


@pytest.mark.slow
@pytest.mark.slow
def test_a_second_training_on_a_logdir_in_use_changes_nothing_and_a_killed_one_resumes(tmp_path):
    """Two runs, one logdir: the second is one line and touches nothing; eval reads the first's checkpoint."""
    logdir = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(ROOT, "svhn-digit-dorefa.py"), "--dorefa", "1,2,4", "--synthetic",
           "--epochs", "3", "--steps-per-epoch", "3", "--workers", "0", "--logdir", logdir]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not os.path.exists(os.path.join(logdir, "checkpoint")):
            assert first.poll() is None, "training ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint within the time limit"
            time.sleep(0.02)
        os.killpg(first.pid, signal.SIGSTOP)     # frozen: nothing it writes can blur the comparison
        before = _snapshot(logdir)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert lines == ["error: {} is in use by another run (process {}); wait for it to end, or choose another "
                         "--logdir".format(logdir, first.pid)], second.stderr
        assert _snapshot(logdir) == before
        evaluated = subprocess.run([sys.executable, os.path.join(ROOT, "svhn-digit-dorefa.py"), "--load", logdir,
                                    "--eval", "--synthetic"], capture_output=True, text=True, timeout=300)
        assert evaluated.returncode == 0 and evaluated.stdout.startswith("test error: "), evaluated.stderr[-2000:]
    finally:
        kill_group(first)
    resumed = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["epoch"] for r in json.load(open(os.path.join(logdir, "config.json")))["resumed_at"]] == [2]
    assert "done: test error " in resumed.stdout


def test_fewer_training_images_than_a_batch_is_one_line(tmp_path, capsys):
    from conftest import load_script
    from scipy.io import savemat

    rng = np.random.RandomState(0)
    for name, n in (("train_32x32.mat", 20), ("test_32x32.mat", 5)):
        savemat(str(tmp_path / name), {"X": rng.randint(0, 256, (32, 32, 3, n)).astype(np.uint8),
                                       "y": rng.randint(1, 11, (n, 1)).astype(np.uint8)})
    svhn = load_script("svhn-digit-dorefa.py")
    code = svhn.main(["--data", str(tmp_path), "--logdir", str(tmp_path / "run"), "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: {}: 20 training images, fewer than one batch of 128; use a smaller --batch".format(
        tmp_path) in err


def test_a_chief_that_planned_frees_its_logdir_when_the_handshake_fails():
    """A cluster's chief plans (and holds its logdir) before the handshake; a failed handshake lets go of it."""
    from argparse import Namespace

    from dorefanet import driver
    from dorefanet.cluster import DistributedError

    released = []

    class Plan:
        step = 0

        def release(self):
            released.append(True)

    class Worker:   # worker 1 reports other bit widths than the chief's
        def handshake(self, record):
            return [dict(record), dict(record, dorefa="1,2,6")]

    args = Namespace(towers=1, epochs=1, cluster=Namespace(workers=["a:1", "b:2"], is_chief=True, index=0))
    config = {"resume_key": {"model": "svhn", "dorefa": "1,2,4", "batch": 8, "steps_per_epoch": 2},
              "data_kind": "svhn", "logdir": "unused"}
    with pytest.raises(DistributedError, match="--dorefa"):
        driver._handshake(Worker(), args, config, Plan)
    assert released == [True]
