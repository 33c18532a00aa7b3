#!/usr/bin/env python
"""Packed models against the TensorFlow graph: file sizes and end-to-end inference speed.

    python bench/packed_speed.py                                   # SVHN, AlexNet, ResNet-18, ResNet-20; batch 1, 128
    python bench/packed_speed.py --models svhn --batches 1 128 --repeats 7
    python bench/packed_speed.py --models svhn --bits 1,2,4 '1,2,4;conv0=8,32,32;conv[12]=2,2,8;fc1=4,32,32'

For each (model, bits): random weights with calibrated batch norms
(``synthetic_weights``), the float ``.npz`` of ``--export`` and the packed
file of ``--export-packed`` (sizes and ratio), then images/s of the
TensorFlow graph (``OfflinePredictor``, as ``--run`` / ``--eval`` use it) and
of the packed engine on the same random batch, with the same number of
threads.  Each timing runs in its own process (TensorFlow's spinning thread
pool would slow an engine sharing its process), the two alternate for
``--rounds`` rounds, and each figure is the median over rounds of the median
of ``--repeats`` timed repeats after two warm-up calls; a repeat is as many calls as the second says fill
0.2 s (one call of a large batch, hundreds at batch 1).  The "same top-1" column is the
fraction of the batch where both give the same class (a fast but wrong engine
cannot hide here).  Per-layer kernel speed: ``bench/packed_layers.py``.

``--profile`` times only the engine, op by op (``dorefanet.packed.profiling``), and prints per
model and batch where the time goes: every op (fused ones as one row) with the stages inside it
(``pack``: codes to padded bit planes and window sums; ``popcount``: the bit-plane GEMM;
``epilogue``: accumulators to floats or codes; ``popcount+epilogue``: both in the kernel's tasks), and for conv / fc layers the achieved MACs per
cycle per core (bit-MACs = MACs x W bits x A bits for the popcount path) against this machine's
bound: 512 one-bit MACs a cycle (one 512-bit popcount port) for popcount layers, 32 fp32 MACs a
cycle (two 512-bit FMA ports) for float layers, the clock from /proc/cpuinfo.
"""
import argparse
import contextlib
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from machine_info import cpu_mhz, cpu_model, load_average  # noqa: E402  (bench/ is the script's directory)

MODELS = {
    # name: (script, default bits, image size)
    "svhn": ("svhn-digit-dorefa.py", ["1,2,4", "1,1,32"], 40),
    "alexnet": ("alexnet-dorefa.py", ["1,2,6", "1,1,32"], 224),
    "resnet": ("resnet-dorefa.py", ["1,4,32"], 224),
    "cifar": ("cifar10-resnet-dorefa.py", ["2,2,32", "1,1,32"], 32),
}
#: the models whose --eval the eval-speed path can feed, with the data it writes for them
EVAL_DATA = {"alexnet": "ImageNet-like JPEGs", "resnet": "ImageNet-like JPEGs",
             "cifar": "CIFAR-10 binary test records"}


def _model(name, setting):
    """The model of a bit setting: ``W,A,G``, optionally followed by ``;PATTERN=W,A,G`` per-layer entries."""
    from dorefanet.bits import parse_bits, parse_layer_bits
    from dorefanet.driver import make_model
    from dorefanet.scripts import load_script

    script, _, size = MODELS[name]
    dorefa, *entries = setting.split(";")
    return make_model(load_script(script), parse_bits(dorefa), "channels_last", size,
                      [parse_layer_bits(e) for e in entries])


#: Shortest timed repeat: a batch-1 call of a few hundred microseconds, timed alone, measured the machine's noise
REPEAT_SECONDS = 0.2


def _time_calls(predict, images, repeats):
    """Median seconds a call over ``repeats`` timed repeats; a repeat is as many calls as fill ``REPEAT_SECONDS``."""
    predict(images)             # the first call loads compiled code and lays out caches
    start = time.perf_counter()
    predict(images)
    calls = max(1, int(REPEAT_SECONDS / max(time.perf_counter() - start, 1e-6)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            predict(images)
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def child(kind, name, bits, path, batch, repeats):
    """One timing in this process: ``kind`` is ``graph`` (TensorFlow on the .npz) or ``engine`` (packed file)."""
    import numpy as np

    from dorefanet.memory import keep_freed_memory

    keep_freed_memory()     # what the scripts set, for both
    rng = np.random.RandomState(1)
    if kind == "engine":
        from dorefanet.packed import load_packed

        engine = load_packed(path, huge_pages=True)
        shape = [engine.input["height"], engine.input["width"], engine.input["channels"]]
        images = rng.uniform(0, 255, [batch] + shape).astype(engine.input["dtype"])
        seconds = _time_calls(engine.predict, images, repeats)
    else:
        from dorefanet.inference import make_predictor
        from dorefanet.checkpoints import read_weights
        from dorefanet.tf_setup import tf

        model = _model(name, bits)
        spec = model.inputs()[0]
        images = rng.uniform(0, 255, [batch] + spec.shape.as_list()[1:]).astype(spec.dtype.as_numpy_dtype)
        with tf.Graph().as_default():
            seconds = _time_calls(make_predictor(model, read_weights(path), path), images, repeats)
    print("RESULT {}".format(batch / seconds))


#: MACs a cycle a core of the machine's bound, by kernel path (module docstring)
BOUNDS = {"popcount": 512, "float": 32, "int-gemm": 16}
CATEGORIES = [("quantized conv / fc", lambda r: r["path"] in ("popcount", "int-gemm")),
              ("float conv / fc", lambda r: r["path"] == "float"),
              ("activation quantize", lambda r: r["kind"] == "activate"),
              ("batch norm (affine)", lambda r: r["kind"] == "affine"),
              ("batch norm + quantize (affine_activate)", lambda r: r["kind"] == "affine_activate"),
              ("pooling", lambda r: r["kind"].split("+")[0] in ("maxpool", "avgpool", "gap")),
              ("shortcut adds", lambda r: r["kind"] == "add"),
              ("input normalize", lambda r: r["kind"] == "normalize"),
              ("other (pad, relu, clip, scale, softmax)", lambda r: True)]


def _by_op(records):
    """One record per program op: the engine runs a large batch in chunks, each op once per chunk."""
    merged = {}
    for r in records:
        if r.index not in merged:
            merged[r.index] = r
            continue
        m = merged[r.index]
        m.seconds += r.seconds
        m.macs += r.macs
        for k, v in r.stages.items():
            m.add(k, v)
    return [merged[i] for i in sorted(merged)]


def profile_child(path, batch, repeats):
    """The engine's per-op profile of ``repeats`` calls (after a warm-up), as one JSON line."""
    import json

    import numpy as np

    from dorefanet.memory import keep_freed_memory
    from dorefanet.packed import load_packed, profiling

    keep_freed_memory()
    engine = load_packed(path, huge_pages=True)
    shape = [engine.input["height"], engine.input["width"], engine.input["channels"]]
    images = np.random.RandomState(1).uniform(0, 255, [batch] + shape).astype(engine.input["dtype"])
    engine.predict(images)
    runs, totals = [], []
    for _ in range(repeats):
        with profiling.recording() as prof:
            start = time.perf_counter()
            engine.predict(images)
            totals.append(time.perf_counter() - start)
        runs.append(_by_op(prof.ops))
    rows = []
    for records in zip(*runs):
        r = records[0]
        stages = {k: statistics.median(rec.stages.get(k, 0.0) for rec in records) for k in r.stages}
        rows.append({"index": r.index, "kind": r.kind, "layer": r.layer, "path": r.path, "macs": r.macs,
                     "w_bits": r.w_bits, "a_bits": r.a_bits, "stages": stages,
                     "seconds": statistics.median(rec.seconds for rec in records)})
    import numba
    print("PROFILE " + json.dumps({"total": statistics.median(totals), "rows": rows,
                                   "threads": numba.get_num_threads()}))


def print_profile(name, bits, batch, data, mhz):
    total, threads = data["total"], data["threads"]
    hz = (mhz or 0) * 1e6
    print("#### {} {}, batch {}: {:.2f} ms a batch ({:.1f} img/s), ops sum to {:.2f} ms".format(
        name, bits, batch, total * 1e3, batch / total, sum(r["seconds"] for r in data["rows"]) * 1e3))
    print()
    print("| # | op | layer | path | W x A | ms | share | stages ms | MACs/cycle/core | of bound |")
    print("|---|---|---|---|---|---:|---:|---|---:|---:|")
    for r in data["rows"]:
        stages = ", ".join("{} {:.2f}".format(k, v * 1e3) for k, v in sorted(r["stages"].items()))
        rate = bound = ""
        if r["macs"] and hz and r["seconds"] > 0:
            per = r["macs"] / (r["seconds"] * hz * threads)
            if r["path"] == "popcount":
                per *= r["w_bits"] * r["a_bits"]
            rate = "{:.1f}".format(per)
            bound = "{:.0%}".format(per / BOUNDS[r["path"]])
        wa = "{}x{}".format(r["w_bits"] or 32, r["a_bits"] or 32) if r["path"] else ""
        print("| {} | {} | {} | {} | {} | {:.3f} | {:.1%} | {} | {} | {} |".format(
            r["index"], r["kind"], r["layer"] or "", r["path"] or "", wa, r["seconds"] * 1e3,
            r["seconds"] / total, stages, rate, bound))
    print()
    print("| stage | ms | share |")
    print("|---|---:|---:|")
    left = list(data["rows"])
    for label, test in CATEGORIES:
        chosen = [r for r in left if test(r)]
        left = [r for r in left if not test(r)]
        seconds = sum(r["seconds"] for r in chosen)
        if chosen:
            print("| {} | {:.2f} | {:.1%} |".format(label, seconds * 1e3, seconds / total))
        if label == "quantized conv / fc" and chosen:
            for stage in ("pack", "popcount", "epilogue", "popcount+epilogue"):
                s = sum(r["stages"].get(stage, 0.0) for r in chosen)
                if any(stage in r["stages"] for r in chosen):   # stages no op had: no row
                    print("| - of which {} | {:.2f} | {:.1%} |".format(stage, s * 1e3, s / total))
    print()


def profile(names, settings, batches, repeats, workdir):
    import json

    mhz = cpu_mhz()
    for name in names:
        for bits in settings or MODELS[name][1]:
            packed_path = _export(name, bits, workdir)[1]
            for batch in batches:
                out = subprocess.run([sys.executable, os.path.abspath(__file__), "--profile-child", packed_path,
                                      str(batch), str(repeats)], capture_output=True, text=True)
                lines = [line for line in out.stdout.splitlines() if line.startswith("PROFILE ")]
                if out.returncode != 0 or not lines:
                    raise RuntimeError("profile child failed:\n{}".format(out.stderr[-3000:]))
                print_profile(name, bits, batch, json.loads(lines[-1][len("PROFILE "):]), mhz)
    print("clock {} MHz (/proc/cpuinfo); bounds per core: popcount {} bit-MACs/cycle, float {} fp32 MACs/cycle, "
          "int-gemm {} fp64 MACs/cycle".format(mhz, BOUNDS["popcount"], BOUNDS["float"], BOUNDS["int-gemm"]))
    print()
    print("machine: " + machine())


def _write_jpegs(root, count):
    """``count`` ImageNet-like validation JPEGs (500 x 375, quality 90, as bench/train_speed.py) under root/val."""
    import cv2
    import numpy as np

    from dorefanet import tf_setup  # noqa: F401  (imagenet_utils imports tensorpack)
    import imagenet_utils

    rng = np.random.RandomState(0)
    names = imagenet_utils.load_class_names()
    for i in range(count):
        folder = os.path.join(root, "val", names[i % 4][0])
        os.makedirs(folder, exist_ok=True)
        image = cv2.GaussianBlur(rng.randint(0, 256, (375, 500, 3)).astype(np.uint8), (7, 7), 2)
        cv2.imwrite(os.path.join(folder, "{}.JPEG".format(i)), image, [cv2.IMWRITE_JPEG_QUALITY, 90])


def _write_cifar(root, count):
    """``count`` CIFAR-10 test images (blurred noise, random labels) as the binary version's ``test_batch.bin``
    under root: all that ``--eval`` reads."""
    import cv2
    import numpy as np

    rng = np.random.RandomState(0)
    os.makedirs(root, exist_ok=True)
    records = np.empty((count, 1 + 3 * 32 * 32), np.uint8)
    records[:, 0] = rng.randint(0, 10, count)
    for i in range(count):
        image = cv2.GaussianBlur(rng.randint(0, 256, (32, 32, 3)).astype(np.uint8), (3, 3), 1)
        records[i, 1:] = image[..., ::-1].transpose(2, 0, 1).ravel()      # BGR -> the R, G and B planes
    records.tofile(os.path.join(root, "test_batch.bin"))


def eval_speed(name, bits, images, batch, rounds, workdir):
    """Wall time of the whole ``--eval`` command, TensorFlow on the .npz against ``--engine packed``."""
    npz, packed_path = _export(name, bits, workdir)[:2]
    data = os.path.join(workdir, "data")
    (_write_cifar if name == "cifar" else _write_jpegs)(data, images)
    script = os.path.join(ROOT, MODELS[name][0])
    dorefa, *entries = bits.split(";")
    layer_bits = ["--layer-bits"] + entries if entries else []
    commands = {"tensorflow": [sys.executable, script, "--load", npz, "--dorefa", dorefa, *layer_bits, "--eval",
                               "--data", data, "--batch", str(batch)],
                "packed": [sys.executable, script, "--load", packed_path, "--engine", "packed", "--eval",
                           "--data", data, "--batch", str(batch)]}
    times = {k: [] for k in commands}
    errors = {}
    for _ in range(rounds):
        for kind, cmd in commands.items():
            start = time.perf_counter()
            out = subprocess.run(cmd, capture_output=True, text=True)
            times[kind].append(time.perf_counter() - start)
            if out.returncode != 0:
                raise RuntimeError("{} failed:\n{}".format(" ".join(cmd), out.stderr[-3000:]))
            # ImageNet's "top-1 error: ..." and "top-5 error: ...", CIFAR-10's "test error: ..."
            errors[kind] = [line for line in out.stdout.splitlines() if "error: " in line]
            print("  {} --eval: {:.1f} s".format(kind, times[kind][-1]), file=sys.stderr, flush=True)
    tf_s, packed_s = statistics.median(times["tensorflow"]), statistics.median(times["packed"])
    print("| model | bits | images | batch | TensorFlow --eval s | packed --eval s | speedup | same errors |")
    print("|---|---|---|---|---|---|---|---|")
    print("| {} | {} | {} | {} | {:.1f} | {:.1f} | {:.2f}x | {} |".format(
        name, bits, images, batch, tf_s, packed_s, tf_s / packed_s,
        "yes" if errors["tensorflow"] == errors["packed"] and errors["packed"] else "no: {} / {}".format(
            errors["tensorflow"], errors["packed"])))
    print()
    print("{}; whole commands (process start, loading, decoding, network), median of {} alternating rounds".format(
        EVAL_DATA[name], rounds))
    print("machine: " + machine())


def _run_child(*args):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child"] + [str(a) for a in args],
                         capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError("child {} failed:\n{}".format(args, out.stderr[-3000:]))
    return float(lines[-1].split()[1])


def _export(name, bits, workdir):
    """Random calibrated weights of the model: (float .npz, packed file, model, weights, rng)."""
    import numpy as np

    from dorefanet.checkpoints import save_npz
    from dorefanet.packed.export import export_packed
    from dorefanet.synthetic_weights import calibrated_weights

    logging.getLogger("tensorpack").setLevel(logging.WARNING)     # its graph-building lines go to stdout
    model = _model(name, bits)
    spec = model.inputs()[0]
    shape = spec.shape.as_list()[1:]
    rng = np.random.RandomState(0)
    weights = calibrated_weights(model, rng.uniform(0, 255, [16] + shape).astype(spec.dtype.as_numpy_dtype))
    stem = os.path.join(workdir, "{}-{}".format(name, len(os.listdir(workdir))))   # settings may hold regex characters
    npz, packed_path = stem + ".npz", stem + ".packed.npz"
    save_npz(weights, npz)
    with contextlib.redirect_stdout(sys.stderr):       # stdout carries only the tables
        export_packed(model, npz, packed_path)
    return npz, packed_path, model, weights, rng


def measure(name, bits, batches, repeats, rounds, workdir):
    import numpy as np

    from dorefanet.inference import make_predictor
    from dorefanet.packed import load_packed
    from dorefanet.tf_setup import tf

    npz, packed_path, model, weights, rng = _export(name, bits, workdir)
    spec = model.inputs()[0]
    shape = spec.shape.as_list()[1:]
    sizes = {"model": name, "bits": bits, "npz": os.path.getsize(npz), "packed": os.path.getsize(packed_path)}
    check = rng.uniform(0, 255, [32] + shape).astype(spec.dtype.as_numpy_dtype)
    with tf.Graph().as_default():
        graph_top1 = make_predictor(model, weights, npz)(check).argmax(1)
    agree = float(np.mean(graph_top1 == load_packed(packed_path).predict(check).argmax(1)))
    rows = []
    for batch in batches:
        graph, engine = [], []
        for _ in range(rounds):
            graph.append(_run_child("graph", name, bits, npz, batch, repeats))
            engine.append(_run_child("engine", name, bits, packed_path, batch, repeats))
        rows.append({"model": name, "bits": bits, "batch": batch, "graph": statistics.median(graph),
                     "engine": statistics.median(engine), "agree": agree})
        print("  {} {} batch {}: graph {:.1f} img/s, engine {:.1f} img/s".format(
            name, bits, batch, rows[-1]["graph"], rows[-1]["engine"]), file=sys.stderr, flush=True)
    return sizes, rows


def machine():
    import numba
    import numpy as np

    from dorefanet.tf_setup import tf

    return ("{}, {} cores; TensorFlow {} (intra-op threads {}), numba {} ({} threads), numpy {}; "
            "load average {}".format(cpu_model(), os.cpu_count(), tf.__version__, os.cpu_count(), numba.__version__,
                                     numba.get_num_threads(), np.__version__, load_average()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS),
                        help="models to compare (default: %(default)s)")
    parser.add_argument("--bits", nargs="+",
                        help="bit settings: W,A,G, optionally with per-layer entries as in --layer-bits after "
                             "semicolons ('1,2,4;conv0=8,32,32;conv[12]=2,2,8') (default: each model's own list)")
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 128], help="batch sizes (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repeats per process, each as many calls as fill 0.2 s; with --profile, profiled "
                             "calls (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating graph / engine processes per batch (default: %(default)s)")
    parser.add_argument("--child", nargs=6, metavar=("KIND", "MODEL", "BITS", "PATH", "BATCH", "REPEATS"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true",
                        help="time the engine op by op instead (no TensorFlow timing): where the time goes")
    parser.add_argument("--profile-child", nargs=3, metavar=("PATH", "BATCH", "REPEATS"), help=argparse.SUPPRESS)
    parser.add_argument("--eval-jpegs", "--eval-images", type=int, metavar="N", dest="eval_images",
                        help="instead: time the whole --eval command of the first of --models ({}) on N generated "
                             "images (ImageNet-like JPEGs; for cifar, CIFAR-10 binary records), TensorFlow engine "
                             "on the .npz against --engine packed".format(", ".join(sorted(EVAL_DATA))))
    parser.add_argument("--eval-batch", type=int, default=128, help="--batch of the --eval commands (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.eval_images:
        name = args.models[0]
        if name not in EVAL_DATA:
            parser.error("--eval-jpegs needs one of {} first in --models, not {}".format(
                ", ".join(sorted(EVAL_DATA)), name))
        with tempfile.TemporaryDirectory() as workdir:
            eval_speed(name, (args.bits or MODELS[name][1])[0], args.eval_images, args.eval_batch, args.rounds,
                       workdir)
        return 0
    if args.profile_child:
        profile_child(args.profile_child[0], int(args.profile_child[1]), int(args.profile_child[2]))
        return 0
    if args.profile:
        with tempfile.TemporaryDirectory() as workdir:
            profile(args.models, args.bits, args.batches, args.repeats, workdir)
        return 0
    if args.child:
        kind, name, bits, path, batch, repeats = args.child
        child(kind, name, bits, path, int(batch), int(repeats))
        return 0
    sizes, rows = [], []
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models:
            for bits in args.bits or MODELS[name][1]:
                s, r = measure(name, bits, args.batches, args.repeats, args.rounds, workdir)
                sizes.append(s)
                rows += r
    print("| model | bits | float .npz MB | packed MB | smaller |")
    print("|---|---|---|---|---|")
    for s in sizes:
        print("| {} | {} | {:.2f} | {:.3f} | {:.1f}x |".format(s["model"], s["bits"], s["npz"] / 1e6, s["packed"] / 1e6,
                                                             s["npz"] / s["packed"]))
    print()
    print("| model | bits | batch | TensorFlow img/s | packed engine img/s | speedup | same top-1 (32 images) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print("| {} | {} | {} | {:.1f} | {:.1f} | {:.2f}x | {:.0%} |".format(
            r["model"], r["bits"], r["batch"], r["graph"], r["engine"], r["engine"] / r["graph"], r["agree"]))
    print()
    print("machine: " + machine())
    return 0


if __name__ == "__main__":
    sys.exit(main())
