#!/usr/bin/env python
"""Training and inference speed, input-pipeline speed and peak memory, per model and bit widths.

    python bench/train_speed.py                              # SVHN, AlexNet, ResNet-18; default bits
    python bench/train_speed.py --models svhn --steps 20 --repeats 7
    python bench/train_speed.py --models alexnet --bits 32,32,32 1,2,6 --batch 32
    python bench/train_speed.py --models svhn --rounds 3     # shared machine: interleaved repeats
    python bench/train_speed.py --models svhn --no-xla       # quantizers from plain TF ops, to compare
    python bench/train_speed.py --models svhn --paired --rounds 40 --steps 4   # step ratios only, paired

Each (model, bits) runs in its own process (so peak memory is its own): a
training step on in-graph random data (no feeding), inference at batch 1 and
at the training batch, medians of ``--repeats`` timings of ``--steps`` steps
after warm-up steps; start-up and graph building are excluded.  The ratio
column is each training step's time against 32,32,32 of the same model
measured in the same command; with ``--rounds R`` every (model, bits) process
runs R times, interleaved (A B C A B C ...), each figure is the median over
the rounds and the ratio the median of the per-round ratios, which is what
to use on a machine shared with other work.

``--paired`` measures only the training step, with every bit setting of a
model built in one process and their steps interleaved round by round
(:func:`measure_paired`): the ratio with the least noise on a shared machine.

"page faults/step" is the process's minor page faults per timed training step (the mean, after the
warm-up steps): memory that a step hands back to the kernel and the next step takes again.

"% of bound" is the training rate against the machine's arithmetic bound:
the floating-point operations of one training image (the convolutions and
matrix products of the forward pass, of the weight gradients and of the
input gradients, counted from the graph's ops and shapes) at
``--peak-gflops`` (default 200, about a 2-core AVX2/AVX-512 CPU).

The dataflow rows time the real input pipelines alone (SVHN built-in digits
with their training augmentation and workers; ImageNet validation decoding
of generated JPEGs).  Prints a markdown table, the machine and its load.
"""
import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from machine_info import cpu_model, load_average  # noqa: E402  (bench/ is the script's directory)

MODELS = {
    # name: (script, default bits, training batch, image size)
    "svhn": ("svhn-digit-dorefa.py", ["32,32,32", "1,2,4", "1,1,32", "8,8,8", "t,32,32"], 128, 40),
    "alexnet": ("alexnet-dorefa.py", ["32,32,32", "1,2,6", "1,1,32", "8,8,8", "t,32,32"], 32, 224),
    "resnet": ("resnet-dorefa.py", ["32,32,32", "1,4,32", "1,1,32", "8,8,8", "t,32,32"], 32, 224),
}


# ------------------------------------------------------------------ one measurement (child process)
_CONV_OPS = ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter")


def graph_flops(fetch):
    """``(forward, training)`` floating-point operations of one ``session.run(fetch)``.

    Every Conv2D, Conv2DBackpropInput, Conv2DBackpropFilter and MatMul op that
    the run executes (``fetch``'s ancestors: tf.gradients also builds input
    gradients nobody uses, such as that of the first layer, fed by the image)
    counts ``2 * multiply-adds``: a convolution 2 * N*Ho*Wo*Cout * kh*kw*Cin
    (its input and filter gradients the same, from their out_backprop and filter
    shapes), a matmul 2 * M*K*N.  Forward is the ops outside ``gradients/``.
    Needs static shapes.
    """
    forward = total = 0
    for op in _ancestors(fetch):
        if op.type in _CONV_OPS:
            filter_shape = (op.inputs[1] if op.type != "Conv2DBackpropFilter" else op.outputs[0]).shape.as_list()
            out = (op.outputs[0] if op.type == "Conv2D" else op.inputs[2]).shape.as_list()
            kh, kw, cin = filter_shape[:3]
            flops = 2 * _prod(out) * kh * kw * cin
        elif op.type == "MatMul":
            a = op.inputs[0].shape.as_list()
            k = a[0] if op.get_attr("transpose_a") else a[1]
            flops = 2 * _prod(op.outputs[0].shape.as_list()) * k
        else:
            continue
        total += flops
        if not op.name.startswith("gradients"):
            forward += flops
    return forward, total


def _ancestors(fetch):
    seen, stack = set(), [fetch]
    while stack:
        op = stack.pop()
        if op in seen:
            continue
        seen.add(op)
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    return seen


def _prod(dims):
    out = 1
    for d in dims:
        out *= int(d)
    return out


def _timed(run, steps, repeats, warmup, faults=None):
    """Median seconds per ``run()`` over ``repeats`` timings of ``steps`` runs; with a list ``faults``, each
    timing's minor page faults per run are appended to it."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        for _ in range(steps):
            run()
        times.append((time.perf_counter() - start) / steps)
        if faults is not None:
            faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / steps)
    return statistics.median(times)


def _build_model(name, bits, data_format):
    from dorefanet.scripts import load_script

    from dorefanet.driver import make_model

    script = load_script(MODELS[name][0])
    return make_model(script, bits, data_format, None if name == "svhn" else MODELS[name][3])


def _random_inputs(model, n):
    from dorefanet.tf_setup import tf

    image_spec, label_spec = model.inputs()
    shape = [n] + image_spec.shape.as_list()[1:]
    image = tf.cast(tf.random.uniform(shape, 0, 255), image_spec.dtype)
    label = tf.random.uniform([n], 0, 10, dtype=tf.int32)
    # held in variables, so that the timed steps measure the network, not the random generator
    image = tf.get_variable("bench_image", initializer=image, trainable=False,
                            collections=[tf.GraphKeys.LOCAL_VARIABLES])
    label = tf.get_variable("bench_label", initializer=label, trainable=False,
                            collections=[tf.GraphKeys.LOCAL_VARIABLES])
    return image, label


def _training_session(name, bits_text, batch, data_format):
    """``(session, step op, (forward, training) FLOPs)`` of one training step on in-graph random data, in a graph
    of its own."""
    from dorefanet.cli import dorefa_bits
    from tensorpack.tfutils.tower import TowerContext
    from dorefanet.tf_setup import tf
    from dorefanet.training import session_config

    graph = tf.Graph()
    with graph.as_default():
        model = _build_model(name, tuple(dorefa_bits(bits_text)), data_format)
        image, label = _random_inputs(model, batch)
        with TowerContext("", is_training=True):
            cost = model.build_graph(image, label)
        # as tensorpack's trainers compute gradients (no gating: unused input gradients are not run)
        opt = model.optimizer()
        grads = opt.compute_gradients(cost, gate_gradients=False, colocate_gradients_with_ops=True)
        step = opt.apply_gradients([(g, v) for g, v in grads if g is not None],
                                   global_step=tf.train.get_or_create_global_step())
        step = tf.group(step, *tf.get_collection(tf.GraphKeys.UPDATE_OPS))
        flops = graph_flops(step)
        sess = tf.Session(config=session_config())
        sess.run([tf.global_variables_initializer(), tf.local_variables_initializer()])
    return sess, step, flops


def measure(name, bits_text, batch, steps, repeats, data_format):
    import numpy as np

    from dorefanet import tf_setup  # noqa: F401
    from dorefanet.cli import dorefa_bits
    from tensorpack.tfutils.tower import TowerContext
    from dorefanet.tf_setup import tf
    from dorefanet.training import session_config

    bits = tuple(dorefa_bits(bits_text))
    result = {"model": name, "bits": bits_text, "batch": batch}
    sess, step, (forward, training) = _training_session(name, bits_text, batch, data_format)
    result["fwd_gflop_per_img"] = forward / batch / 1e9
    result["train_gflop_per_img"] = training / batch / 1e9
    with sess:
        faults = []
        # 8 warm-up steps: the allocator's pools grow over the first steps (SVHN 8,8,8's page faults per step,
        # counted per 5 steps after 3 warm-up steps: 975 then none in one count, 698, 298 then about none in
        # another), and the count should show steady state, not growth
        result["train_step_s"] = _timed(lambda: sess.run(step), steps, repeats, warmup=8, faults=faults)
        # minor page faults per step, the mean over all timed steps: memory that the C library gave back to
        # the kernel after one step and the next step touched again (tf_setup keeps glibc from doing so).  Not
        # the median: glibc trims every few seconds, not every step.
        result["faults_per_step"] = statistics.mean(faults)
    result["train_img_s"] = batch / result["train_step_s"]

    for infer_batch in (1, batch):
        with tf.Graph().as_default():
            model = _build_model(name, bits, data_format)
            image, label = _random_inputs(model, infer_batch)
            with TowerContext("", is_training=False):
                model.build_graph(image, label)
            output = tf.get_default_graph().get_tensor_by_name("output:0")
            with tf.Session(config=session_config()) as sess:
                sess.run([tf.global_variables_initializer(), tf.local_variables_initializer()])
                # batch 1 steps are short: time more of them
                n = steps * (8 if infer_batch == 1 else 1)
                seconds = _timed(lambda: sess.run(output.op), n, repeats, warmup=3)
        result["infer_img_s_b{}".format("1" if infer_batch == 1 else "N")] = infer_batch / seconds
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    np.random.seed(0)
    return result


def measure_paired(name, bits_list, batch, steps, rounds, data_format):
    """Training steps of every bit setting of one model in this one process, interleaved.

    Each round times ``steps`` steps of each setting in turn (after one untimed step, so that no setting
    pays for the switch from the one before); the ratio of a round is its step time against the first
    setting's in the same round.  Pairing the settings within a round cancels the machine's drift, which
    separate processes, minutes apart, do not.
    """
    sessions = [_training_session(name, bits, batch, data_format)[:2] for bits in bits_list]
    for sess, step in sessions:
        for _ in range(3):
            sess.run(step)
    times = [[] for _ in sessions]
    for _ in range(rounds):
        for (sess, step), out in zip(sessions, times):
            out.append(_timed(lambda: sess.run(step), steps, repeats=1, warmup=1))
    for sess, _ in sessions:
        sess.close()
    return [{"model": name, "bits": bits, "batch": batch, "step_s": ts,
             "ratios": [t / b for t, b in zip(ts, times[0])]} for bits, ts in zip(bits_list, times)]


def _quartiles(values):
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def measure_svhn_dataflow(batch, workers, batches, repeats):
    from dorefanet import tf_setup  # noqa: F401
    from dorefanet.scripts import load_script

    svhn = load_script("svhn-digit-dorefa.py")
    source = argparse.Namespace(synthetic=True, data=None, seed=0, workers=workers, batch=batch)
    df = svhn.DATA.training_data(source, batch)[0]
    df.reset_state()
    it = iter(df)
    rate = batch / _timed(lambda: next(it), batches, repeats, warmup=3)
    return {"what": "svhn dataflow ({} workers)".format(workers), "img_s": rate,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


def measure_imagenet_decoding(batch, batches, repeats):
    import cv2
    import numpy as np

    from dorefanet import tf_setup  # noqa: F401
    import imagenet_utils

    names = imagenet_utils.load_class_names()
    rng = np.random.RandomState(0)
    with tempfile.TemporaryDirectory() as root:
        # a realistic size and JPEG quality: ImageNet validation images are ~500x375
        for wnid, _ in names[:4]:
            os.makedirs(os.path.join(root, "val", wnid))
            for i in range(batch // 4 + 1):
                image = cv2.GaussianBlur(rng.randint(0, 256, (375, 500, 3)).astype(np.uint8), (7, 7), 2)
                cv2.imwrite(os.path.join(root, "val", wnid, "{}.JPEG".format(i)), image,
                            [cv2.IMWRITE_JPEG_QUALITY, 90])
        df = imagenet_utils.get_imagenet_dataflow(root, "val", batch)
        df.reset_state()

        def one_pass():
            for _ in df:
                pass

        seconds = _timed(one_pass, 1, repeats, warmup=1)
        count = sum(len(b[1]) for b in df)
    return {"what": "imagenet val decoding ({} threads)".format(imagenet_utils.default_parallelism()),
            "img_s": count / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}


# ------------------------------------------------------------------ the driver
def _child(args_list, env=None):
    cmd = [sys.executable, os.path.abspath(__file__), "--child"] + args_list
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError("benchmark child {} failed:\n{}".format(" ".join(args_list), proc.stderr[-3000:]))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine():
    from dorefanet import tf_setup  # noqa: F401  (quiet TensorFlow import)
    import tensorflow

    return "{}; {} cores; TensorFlow {}; Python {}".format(cpu_model(), os.cpu_count(), tensorflow.__version__,
                                                          platform.python_version())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models", default="svhn,alexnet,resnet", help="comma-separated: svhn, alexnet, resnet (default: %(default)s)")
    parser.add_argument("--bits", nargs="+", help="bit settings (default: per model, see MODELS)")
    parser.add_argument("--batch", type=int, help="training batch (default: svhn 128, others 32)")
    parser.add_argument("--steps", type=int, default=5, help="steps per timing (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timings per figure, the median is reported (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="interleaved runs of every (model, bits) process; medians over the rounds "
                             "(default: %(default)s)")
    parser.add_argument("--peak-gflops", type=float, default=200.0,
                        help="the machine's arithmetic peak for the '%% of bound' column, GFLOP/s (default: %(default)s)")
    parser.add_argument("--data-format", default="channels_last", choices=["channels_last", "channels_first"],
                        help="layout of the training graphs (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="SVHN dataflow worker processes (default: %(default)s)")
    parser.add_argument("--paired", action="store_true",
                        help="training steps only: every bit setting of a model in one process, interleaved, for "
                             "--rounds rounds of --steps steps; the ratio is the median of the per-round ratios "
                             "(default: off, one process per setting)")
    parser.add_argument("--no-xla", action="store_true",
                        help="build the quantizers from plain TensorFlow ops (DOREFA_XLA=0), for comparison (default: off)")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        from dorefanet.memory import keep_freed_memory

        keep_freed_memory()     # what the scripts set for training
        kind = args.child[0]
        if kind == "paired":
            _, name, batch, steps, rounds, fmt = args.child[:6]
            out = measure_paired(name, args.child[6:], int(batch), int(steps), int(rounds), fmt)
        elif kind == "model":
            _, name, bits, batch, steps, repeats, fmt = args.child
            out = measure(name, bits, int(batch), int(steps), int(repeats), fmt)
        elif kind == "svhn-dataflow":
            out = measure_svhn_dataflow(int(args.child[1]), int(args.child[2]), int(args.child[3]),
                                        int(args.child[4]))
        else:
            out = measure_imagenet_decoding(int(args.child[1]), 1, int(args.child[2]))
        print(json.dumps(out))
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error("--models: unknown {}; choose from {}".format(", ".join(unknown), ", ".join(MODELS)))
    if args.rounds < 1 or args.steps < 1 or args.repeats < 1:
        parser.error("--rounds, --steps and --repeats must be at least 1")
    env = dict(os.environ, DOREFA_XLA="0") if args.no_xla else None
    xla = "off" if args.no_xla or os.environ.get("DOREFA_XLA", "1").strip().lower() in ("0", "false", "no", "off") \
        else "on"
    print("machine: {}".format(machine()))
    print("load average (1, 5, 15 min) at start: {}; quantizers' XLA kernels: {}; XLA_FLAGS: {}\n".format(
        load_average(), xla, os.environ.get("XLA_FLAGS", "")), flush=True)

    if args.paired:
        if args.bits and "32,32,32" not in args.bits:
            parser.error("--paired: --bits must include 32,32,32, the baseline of the ratios")
        return _paired_table(args, models, env)

    runs = [(name, bits, args.batch or MODELS[name][2]) for name in models for bits in (args.bits or MODELS[name][1])]
    results = {run: [] for run in runs}
    for _ in range(args.rounds):
        for run in runs:
            name, bits, batch = run
            results[run].append(_child(["model", name, bits, str(batch), str(args.steps), str(args.repeats),
                                        args.data_format], env))

    print("| model | bits | batch | train img/s | vs 32,32,32 | % of bound | infer img/s (b=1) "
          "| infer img/s (b=batch) | peak RSS MB | page faults/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    train_rates, bounds = {}, {}
    for run in runs:
        name, bits, batch = run
        rs = results[run]
        rate = statistics.median(r["train_img_s"] for r in rs)
        train_rates[name, bits] = rate
        base = results.get((name, "32,32,32", batch))
        # the step-time ratio, per round (paired), then the median
        ratio = "{:.2f}x".format(statistics.median(b["train_img_s"] / r["train_img_s"] for b, r in zip(base, rs))) \
            if base else "-"
        gflop = rs[0]["train_gflop_per_img"]
        bounds[name] = (rs[0]["fwd_gflop_per_img"], gflop)
        print("| {} | {} | {} | {:.1f} | {} | {:.0f}% | {:.1f} | {:.1f} | {:.0f} | {:.0f} |".format(
            name, bits, batch, rate, ratio, 100.0 * rate * gflop / args.peak_gflops,
            statistics.median(r["infer_img_s_b1"] for r in rs), statistics.median(r["infer_img_s_bN"] for r in rs),
            max(r["peak_rss_mb"] for r in rs), statistics.median(r["faults_per_step"] for r in rs)), flush=True)
    print("\n'vs 32,32,32' is the time of a training step relative to the same model at 32,32,32{}.".format(
        " (median of {} interleaved rounds)".format(args.rounds) if args.rounds > 1 else ""))
    for name, (fwd, train) in bounds.items():
        print("{}: {:.4f} GFLOP per image forward, {:.4f} per training image (forward, weight and input gradients "
              "of the convolutions and matmuls); at {:.0f} GFLOP/s the bound is {:.0f} training images/s.".format(
                  name, fwd, train, args.peak_gflops, args.peak_gflops / train))
    print()
    print("| input pipeline | img/s | consumer img/s | ratio | peak RSS MB |")
    print("|---|---|---|---|---|")
    if "svhn" in models:
        batch = args.batch or MODELS["svhn"][2]
        d = _child(["svhn-dataflow", str(batch), str(args.workers), str(10), str(args.repeats)])
        fastest = max(v for (m, _), v in train_rates.items() if m == "svhn")
        print("| {} | {:.0f} | {:.0f} (fastest SVHN training) | {:.2f}x | {:.0f} |".format(
            d["what"], d["img_s"], fastest, d["img_s"] / fastest, d["peak_rss_mb"]))
    if "alexnet" in models or "resnet" in models:
        d = _child(["imagenet-decoding", "128", str(max(1, args.repeats // 2))])
        print("| {} | {:.0f} | - | - | {:.0f} |".format(d["what"], d["img_s"], d["peak_rss_mb"]))
    print("\nload average (1, 5, 15 min) at end: {}".format(load_average()))
    return 0


def _paired_table(args, models, env):
    print("| model | bits | batch | train img/s | vs 32,32,32 | ratio q1-q3 |")
    print("|---|---|---|---|---|---|")
    for name in models:
        bits = ["32,32,32"] + [b for b in (args.bits or MODELS[name][1]) if b != "32,32,32"]
        batch = args.batch or MODELS[name][2]
        rows = _child(["paired", name, str(batch), str(args.steps), str(args.rounds), args.data_format] + bits, env)
        for row in rows:
            q1, median, q3 = _quartiles(row["ratios"])
            print("| {} | {} | {} | {:.1f} | {:.2f}x | {:.2f}-{:.2f} |".format(
                name, row["bits"], batch, batch / statistics.median(row["step_s"]), median, q1, q3), flush=True)
    print("\nEvery bit setting of a model trained in one process, interleaved: {} rounds x {} timed steps per "
          "setting (after one untimed step); 'vs 32,32,32' is the median over the rounds of the step time against "
          "32,32,32's in the same round, with its quartiles.".format(args.rounds, args.steps))
    print("\nload average (1, 5, 15 min) at end: {}".format(load_average()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
