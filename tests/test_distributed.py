"""Training on several machines (dorefanet/distributed.py), as worker processes on 127.0.0.1.

Each test starts the workers as separate processes (own process groups, free ports picked here), on the
CPU at --image-size 64 with --fake data, and kills every process group it started in a ``finally``.
``DOREFANET_CHECK_REPLICAS=1`` makes every worker compare a fingerprint of its variables with the others'
after every step (a run whose workers diverge stops with an error) and dump its variables at each epoch end.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, kill_group, load_script, random_weights
from dorefanet import distributed
from dorefanet.checkpoints import save_npz
from dorefanet.cluster import free_local_ports as free_ports
from dorefanet.driver import make_model  # noqa: E402

# tensorpack 0.11 threads call the deprecated Event.isSet()
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:isSet:DeprecationWarning")]

alexnet = load_script("alexnet-dorefa.py")
resnet = load_script("resnet-dorefa.py")
SMALL = ["--fake", "--workers", "0", "--image-size", "64"]


def cluster_flag(ports):
    return ",".join("127.0.0.1:{}".format(p) for p in ports)


class Processes:
    """Processes started in their own process groups; ``kill_all`` ends every group (also on failure)."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.procs = []

    def start(self, script, argv, name):
        env = dict(os.environ, **{distributed.CHECK_ENV: "1"})
        env.pop("TF_CONFIG", None)
        out = open(self.tmp_path / (name + ".out"), "ab")
        err = open(self.tmp_path / (name + ".err"), "ab")
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, script)] + argv, stdout=out, stderr=err,
                                env=env, start_new_session=True)
        out.close()
        err.close()
        proc.name = name
        self.procs.append(proc)
        return proc

    def stderr(self, name):
        return (self.tmp_path / (name + ".err")).read_text(errors="replace")

    def wait(self, proc, timeout):
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail("{} still running after {} s; its stderr ends with:\n{}".format(
                proc.name, timeout, self.stderr(proc.name)[-3000:]))

    def kill(self, proc):
        kill_group(proc)

    def kill_all(self):
        for proc in self.procs:
            self.kill(proc)


@pytest.fixture
def procs(tmp_path):
    p = Processes(tmp_path)
    try:
        yield p
    finally:
        p.kill_all()


def init_weights(model, path, seed=0):
    """``random_weights`` written to ``path``: the same start for two runs."""
    save_npz(random_weights(model, seed), path)
    return path


def read_checkpoint(prefix):
    from dorefanet.tf_setup import tf

    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def one_error_line(text):
    errors = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in text, text[-3000:]
    return errors[0]


# ---------------------------------------------------------------- two workers = one process with two towers
def test_two_workers_stay_identical_and_equal_one_process_with_two_towers(tmp_path, procs):
    """ResNet-18 1,4,32 (G = 32: no fg noise), total batch 4: 2 workers x 1 tower against 1 process x 2 towers.

    Both start from the same --load weights (the chief loads them; worker 1 starts from other random values,
    its seed differs, and gets the chief's by the broadcast). The workers train 2 steps and must hold
    bit-identical variables after every step (the per-step check) and at the end (their dumps). After step 1
    the chief's checkpoint must equal the one process's within 8 float32 ulps of each variable's largest
    value. Measured: bit-identical (0 ulps, all 151 float variables, 3 runs): every tower takes the same
    batch (distributed.fake_train_flow), so both sides average two equal gradients, and g + g is exact in
    either summation order (the all-reduce of the workers' gradients, the replicated trainer's add_n). The
    8 ulps leave room for a reduction that sums in another order, and are far below what a real fault
    gives: before training.gate_gradients, a variable update racing with the backward pass made the
    one-process run itself differ from run to run by about 1e7 ulps (and this test flaky). Later steps are
    not compared: 1-bit weights flip sign on ulp-sized changes, and this model at lr 0.1 diverges within
    3 steps.
    """
    init = init_weights(make_model(resnet, (1, 4, 32), "channels_last"), str(tmp_path / "init.npz"))
    logdir, ref = str(tmp_path / "log"), str(tmp_path / "ref")
    ports = free_ports(2)
    common = SMALL + ["--batch", "4", "--steps-per-epoch", "1", "--load", init]
    workers = [procs.start("resnet-dorefa.py", common + ["--epochs", "2", "--logdir", logdir, "--cluster",
                                                         cluster_flag(ports), "--task", str(i),
                                                         "--worker-timeout", "120"], "worker{}".format(i))
               for i in range(2)]
    reference = procs.start("resnet-dorefa.py", common + ["--epochs", "1", "--gpu", "0,1", "--logdir", ref],
                            "reference")
    for proc in workers + [reference]:
        assert procs.wait(proc, 240) == 0, procs.stderr(proc.name)[-3000:]

    # only the chief records the run; worker 1 logs beside it
    assert {"model-2.index", "config.json", "stats.json", "log.log"} <= set(os.listdir(logdir))
    follower = logdir + ".worker1"
    assert "log.log" in os.listdir(follower)
    assert not {"checkpoint", "config.json", "stats.json"} & set(os.listdir(follower))
    with open(os.path.join(logdir, "config.json")) as f:
        config = json.load(f)
    assert config["trainer"] == "collective" and config["replicas"] == 2
    with open(os.path.join(logdir, "log.log")) as f:
        assert "broadcast_from_chief" in f.read()

    with np.load(os.path.join(logdir, "replica-variables.npz")) as a, \
            np.load(os.path.join(follower, "replica-variables.npz")) as b:
        assert sorted(a.files) == sorted(b.files) and "conv1/W/Momentum" in a.files
        differ = [name for name in a.files if not name.endswith("/EMA") and not np.array_equal(a[name], b[name])]
        assert differ == []
        assert int(a["global_step"]) == 2

    mine, theirs = read_checkpoint(os.path.join(logdir, "model-1")), read_checkpoint(os.path.join(ref, "model-1"))
    assert sorted(mine) == sorted(theirs)
    start = np.load(init)
    assert not np.array_equal(mine["conv1/W"], start["conv1/W"])  # it did train
    for name, value in theirs.items():
        if value.dtype.kind == "f":
            scale = float(np.max(np.abs(value))) or 1.0
            np.testing.assert_allclose(mine[name], value, rtol=0, atol=8 * np.finfo(np.float32).eps * scale,
                                       err_msg=name)
        else:
            assert np.array_equal(mine[name], value), name



def test_svhn_trains_on_two_local_workers(tmp_path, procs):
    """The SVHN script on a cluster, as the ImageNet ones: the workers stay identical, the chief records the run."""
    from scipy.io import savemat

    rng = np.random.RandomState(0)
    data = tmp_path / "svhn"
    data.mkdir()
    for split, n in (("train", 40), ("test", 9)):
        savemat(str(data / "{}_32x32.mat".format(split)),
                {"X": rng.randint(0, 256, (32, 32, 3, n)).astype(np.uint8), "y": rng.randint(1, 11, (n, 1))})
    logdir, ports = str(tmp_path / "log"), free_ports(2)
    argv = ["--data", str(data), "--workers", "0", "--batch", "8", "--steps-per-epoch", "2", "--epochs", "2",
            "--logdir", logdir, "--cluster", cluster_flag(ports), "--worker-timeout", "120"]
    workers = [procs.start("svhn-digit-dorefa.py", argv + ["--task", str(i)], "worker{}".format(i)) for i in range(2)]
    for proc in workers:
        assert procs.wait(proc, 240) == 0, procs.stderr(proc.name)[-3000:]
    with open(os.path.join(logdir, "config.json")) as f:
        config = json.load(f)
    assert config["trainer"] == "collective" and config["replicas"] == 2 and config["model"] == "svhn-digit"
    with open(os.path.join(logdir, "stats.json")) as f:
        assert [s["epoch_num"] for s in json.load(f) if "test-error" in s] == [1, 2]
    with np.load(os.path.join(logdir, "replica-variables.npz")) as a, \
            np.load(os.path.join(logdir + ".worker1", "replica-variables.npz")) as b:
        assert int(a["global_step"]) == int(b["global_step"]) == 4 and "conv1/W/Adam" in a.files
        assert [n for n in a.files if not n.endswith("/EMA") and not np.array_equal(a[n], b[n])] == []
    done = [line for line in (tmp_path / "worker0.out").read_text().splitlines() if line.startswith("done: ")]
    assert len(done) == 1 and "test error" in done[0] and "--data" in done[0]
    assert "done: " not in (tmp_path / "worker1.out").read_text()


@pytest.mark.parametrize("towers", [1, 2])
def test_variable_updates_wait_for_the_whole_backward_pass(towers):
    """Every update op of the trainers depends on every gradient of every tower (training.gate_gradients).

    The variables are reference variables updated in place: without the gate, the update of the top layer's
    weights could run before the backward pass read them to reach the layer below, which made the
    two-tower run of the test above differ between runs (by about 1e7 ulps). Without the gate this fails:
    the update of w2 does not wait for the gradient of w1.
    """
    from tensorpack import ModelDesc, QueueInput
    from tensorpack.dataflow import DataFromList

    from dorefanet.tf_setup import tf
    from dorefanet.training import select_trainer

    class Model(ModelDesc):
        def inputs(self):
            return [tf.TensorSpec([None, 3], tf.float32, "x")]

        def build_graph(self, x):
            w1 = tf.get_variable("w1", [3, 4])
            w2 = tf.get_variable("w2", [4, 1])
            return tf.reduce_sum(tf.matmul(tf.nn.relu(tf.matmul(x, w1)), w2), name="cost")

        def optimizer(self):
            return tf.train.MomentumOptimizer(0.1, 0.9)

    with tf.Graph().as_default():
        model = Model()
        source = QueueInput(DataFromList([[np.ones((2, 3), np.float32)]], shuffle=False))
        trainer = select_trainer(towers)
        trainer.setup_graph(model.get_input_signature(), source, model.build_graph, model.get_optimizer)
        graph = tf.get_default_graph()
        # the backward pass: dW2, dW1, and the gradient through w2 to the layer below (which reads w2);
        # not the gradient for x, which nothing uses
        backward = [op for op in graph.get_operations()
                    if op.type == "MatMul" and "gradients" in op.name and op.outputs[0].consumers()]
        assert len(backward) == 3 * towers

        def ancestors(op):
            seen, todo = set(), [op]
            while todo:
                current = todo.pop()
                for parent in [t.op for t in current.inputs] + list(current.control_inputs):
                    if parent not in seen:
                        seen.add(parent)
                        todo.append(parent)
            return seen

        updates = [op for op in graph.get_operations() if op.type == "ApplyMomentum"]
        assert len(updates) == 2 * towers
        for update in updates:
            assert set(backward) <= ancestors(update), update.name


# ---------------------------------------------------------------- failures
def worker_argv(logdir, ports, index, steps=2, epochs=1, timeout=60, extra=()):
    return SMALL + ["--batch", "2", "--steps-per-epoch", str(steps), "--epochs", str(epochs), "--logdir", logdir,
                    "--cluster", cluster_flag(ports), "--task", str(index), "--worker-timeout", str(timeout)] + \
        list(extra)


#: ResNet-18 with 8-bit gradients: fg's noise differs per worker (each draws its own), so workers that did
#: not all-reduce their gradients would diverge at the first step and the per-step check would stop them
#: (checked by removing the all-reduce: the resume test then fails). AlexNet at this size and batch is no
#: use for that: its quantized activations saturate and no gradient reaches an fg.
NOISY_RESNET = ["--dorefa", "1,4,8"]


def wait_for(predicate, timeout, what, procs_to_watch=()):
    deadline = time.time() + timeout
    while not predicate():
        for proc in procs_to_watch:
            assert proc.poll() is None, "{} ended before {}".format(proc.name, what)
        assert time.time() < deadline, "no {} within {} s".format(what, timeout)
        time.sleep(0.05)


def test_a_killed_worker_stops_the_other_within_the_timeout(tmp_path, procs):
    logdir, ports, timeout = str(tmp_path / "log"), free_ports(2), 10
    workers = [procs.start("alexnet-dorefa.py", worker_argv(logdir, ports, i, steps=1000, timeout=timeout),
                           "worker{}".format(i)) for i in range(2)]
    progress = os.path.join(logdir + ".worker1", "replica-steps")

    def a_few_steps_in():
        try:
            with open(progress) as f:
                return int(f.read() or 0) >= 3
        except (OSError, ValueError):
            return False

    wait_for(a_few_steps_in, 180, "three steps", workers)
    procs.kill(workers[1])
    killed = time.time()
    code = procs.wait(workers[0], timeout + 60)
    elapsed = time.time() - killed
    assert code == 2
    line = one_error_line(procs.stderr("worker0"))
    assert "worker 0:" in line and "--worker-timeout 10" in line and "restart every worker" in line, line
    # the collective op's timeout, plus the time to report and exit
    assert elapsed < timeout + 30, elapsed


def test_a_worker_that_never_starts_is_named(tmp_path, procs):
    logdir, ports = str(tmp_path / "log"), free_ports(2)
    chief = procs.start("alexnet-dorefa.py", worker_argv(logdir, ports, 0, timeout=3), "worker0")
    started = time.time()
    assert procs.wait(chief, 90) == 2
    line = one_error_line(procs.stderr("worker0"))
    assert "nothing listens at worker 1 (127.0.0.1:{})".format(ports[1]) in line and "--worker-timeout 3" in line
    assert time.time() - started < 60


def test_mismatched_workers_are_refused_at_start_naming_the_flag(tmp_path, procs):
    logdir, ports = str(tmp_path / "log"), free_ports(2)
    workers = [procs.start("alexnet-dorefa.py", worker_argv(logdir, ports, i, extra=["--dorefa", bits]),
                           "worker{}".format(i)) for i, bits in enumerate(["1,2,6", "1,2,32"])]
    for proc in workers:
        assert procs.wait(proc, 120) == 2
    for name in ("worker0", "worker1"):
        line = one_error_line(procs.stderr(name))
        assert "worker 1 has --dorefa 1,2,32 but the chief (worker 0) has 1,2,6" in line, line
    assert not os.path.exists(os.path.join(logdir, "checkpoint"))


def test_the_chiefs_refusal_reaches_every_worker(tmp_path, procs):
    logdir, ports = tmp_path / "log", free_ports(2)
    logdir.mkdir()
    (logdir / "checkpoint").write_text('model_checkpoint_path: "model-5"\n')  # names files that do not exist
    workers = [procs.start("alexnet-dorefa.py", worker_argv(str(logdir), ports, i), "worker{}".format(i))
               for i in range(2)]
    for proc in workers:
        assert procs.wait(proc, 120) == 2
    chief, follower = one_error_line(procs.stderr("worker0")), one_error_line(procs.stderr("worker1"))
    assert chief.startswith("error: {}: its last checkpoint cannot be read".format(logdir)), chief
    assert follower == "error: the chief (worker 0) cannot start: " + chief[len("error: "):]


# ---------------------------------------------------------------- kill both, same commands: resume
def test_killed_cluster_resumes_from_the_chiefs_checkpoint(tmp_path, procs):
    logdir, ports = str(tmp_path / "log"), free_ports(2)
    argv = [worker_argv(logdir, ports, i, steps=2, epochs=3, extra=NOISY_RESNET) for i in range(2)]
    workers = [procs.start("resnet-dorefa.py", argv[i], "worker{}".format(i)) for i in range(2)]
    wait_for(lambda: os.path.exists(os.path.join(logdir, "checkpoint")), 240, "checkpoint", workers)
    for proc in workers:
        procs.kill(proc)
    with open(os.path.join(logdir, "checkpoint")) as f:
        killed_at = int(f.read().split('"')[1].split("-")[-1])
    assert killed_at in (2, 4), killed_at

    # the same commands (the same ports)
    workers = [procs.start("resnet-dorefa.py", argv[i], "worker{}".format(i)) for i in range(2)]
    for proc in workers:
        assert procs.wait(proc, 240) == 0, procs.stderr(proc.name)[-3000:]
    with open(os.path.join(logdir, "config.json")) as f:
        config = json.load(f)
    assert [r["step"] for r in config["resumed_at"]] == [killed_at]
    with open(os.path.join(logdir, "stats.json")) as f:
        stats = json.load(f)
    # (a kill between the checkpoint and the stats.json write of an epoch loses that epoch's entry)
    assert stats[-1]["global_step"] == 6
    assert [s["epoch_num"] for s in stats if s["epoch_num"] > killed_at // 2] == list(range(killed_at // 2 + 1, 4))
    with open(os.path.join(logdir + ".worker1", "log.log")) as f:
        follower_log = f.read()
    # worker 1 started again at the chief's epoch, not at epoch 1 (tensorpack logs Argv at each start)
    second_run = follower_log.split("Argv:")[-1]
    assert "Start Epoch 1 ..." not in second_run and "Start Epoch {} ...".format(killed_at // 2 + 1) in second_run
    with np.load(os.path.join(logdir, "replica-variables.npz")) as a, \
            np.load(os.path.join(logdir + ".worker1", "replica-variables.npz")) as b:
        assert int(a["global_step"]) == int(b["global_step"]) == 6
        assert all(np.array_equal(a[n], b[n]) for n in a.files if not n.endswith("/EMA"))


# ---------------------------------------------------------------- the command line
def run_main(script, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        script.main(argv)
    return exc.value.code, capsys.readouterr().err


TF_CONFIG = json.dumps({"cluster": {"worker": ["127.0.0.1:7001", "127.0.0.1:7002"]},
                        "task": {"type": "worker", "index": 1}})


@pytest.mark.parametrize("argv, tf_config, message", [
    (["--cluster", "127.0.0.1:7001,127.0.0.1:7002"], None, "--cluster needs --task I"),
    (["--task", "1"], None, "--task needs --cluster"),
    (["--cluster", "127.0.0.1:7001,127.0.0.1:7002", "--task", "2"], None, "--task 2 is not an index"),
    (["--cluster", "127.0.0.1,127.0.0.1:7002", "--task", "0"], None, "--cluster: '127.0.0.1' is not host:port"),
    (["--cluster", "127.0.0.1:7001,127.0.0.1:7002", "--task", "0"], TF_CONFIG,
     "--cluster/--task (127.0.0.1:7001,127.0.0.1:7002 task 0) and TF_CONFIG (127.0.0.1:7001,127.0.0.1:7002 task 1) "
     "disagree"),
    ([], "{not json", "TF_CONFIG is not valid JSON"),
    ([], json.dumps({"cluster": {"worker": ["a:1", "b:2"], "ps": ["c:3"]}, "task": {"type": "worker", "index": 0}}),
     "only a 'worker' job is supported"),
    (["--trainer", "collective"], None, "--trainer collective needs the workers"),
    (["--trainer", "replicated"], TF_CONFIG, "--trainer replicated trains in one process"),
    (["--batch", "6", "--gpu", "0,1"], TF_CONFIG, "--batch 6 cannot be split evenly over 4 towers (2 workers x 2)"),
    (["--worker-timeout", "0"], TF_CONFIG, "--worker-timeout must be a positive number"),
])
def test_cluster_flag_errors(monkeypatch, capsys, argv, tf_config, message):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", tf_config)
    code, err = run_main(alexnet, ["--fake"] + argv, capsys)
    assert code == 2 and message in err, err


def test_cluster_is_for_training_only(monkeypatch, capsys):
    monkeypatch.setenv("TF_CONFIG", TF_CONFIG)
    code, err = run_main(alexnet, ["--load", "m.npz", "--eval", "--fake"], capsys)
    assert code == 2 and "--cluster/TF_CONFIG is for training" in err


def test_tf_config_and_flags_that_agree_are_one_cluster():
    class Args:
        cluster, task = "127.0.0.1:7001,127.0.0.1:7002", 1

    cluster = distributed.resolve_cluster(Args, {"TF_CONFIG": TF_CONFIG})
    assert cluster == distributed.Cluster(["127.0.0.1:7001", "127.0.0.1:7002"], 1) and not cluster.is_chief
    Args.cluster, Args.task = None, None
    assert distributed.resolve_cluster(Args, {"TF_CONFIG": TF_CONFIG}) == cluster
    assert distributed.resolve_cluster(Args, {}) is None


@pytest.mark.parametrize("field, chief, other, message", [
    ("towers", 1, 2, "worker 1 has towers (--gpu) 2 but the chief (worker 0) has 1"),
    ("image_size", 64, 96, "worker 1 has --image-size 96 but the chief (worker 0) has 64"),
    ("model", "alexnet", "resnet18", "worker 1 has model (script) resnet18 but the chief (worker 0) has alexnet"),
])
def test_handshake_mismatch_names_the_field(field, chief, other, message):
    records = [{"batch": 4, field: chief}, {"batch": 4, field: chief}, {"batch": 4, field: other}]
    distributed.check_agreement(records[:2], ("batch", field))
    with pytest.raises(distributed.DistributedError, match=r"^" + message.replace("(", r"\(").replace(")", r"\)")
                       .replace("1 has", "2 has")):
        distributed.check_agreement(records, ("batch", field))
