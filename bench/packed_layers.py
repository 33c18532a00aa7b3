#!/usr/bin/env python
"""Popcount kernels of the packed engine against TensorFlow float32, layer by layer.

    python bench/packed_layers.py                          # AlexNet and SVHN layers, batch 1 and 128
    python bench/packed_layers.py --batches 1 --repeats 21
    python bench/packed_layers.py --nets svhn resnet --threads 2

For each quantized layer of the project's networks (taken from the scripts' own network descriptions:
AlexNet at 224 x 224, SVHN at 40 x 40, ResNet-18 at 224 x 224, one row per distinct shape; AlexNet's
grouped convolutions are one call per group) and bit widths (W1A2 = 1-bit weights, 2-bit activations;
BNN = W1A1; ResNet W1A4):

* TF float32: ``tf.matmul`` / ``tf.nn.conv2d`` (NHWC) on float32 variables holding the same codes, in a
  ``tf.compat.v1`` session with ``intra_op_parallelism_threads = --threads``, inter-op 1;
* packed: ``gemm_popcount_codes`` / ``conv_popcount_codes`` of the uint8 activation codes on
  ``--threads`` numba threads, as the engine calls them: packing the codes into bit planes is included
  in the time (the engine packs every layer's input; the kernels do it in the pass that pads the map
  and sums the codes); the weights are laid out once (``prepare_weights``, as at load time) outside
  the timing.

Both run in this process, interleaved (TF twice, packed twice, ..., the first of each pair untimed:
TensorFlow's pool threads spin for a while after a run and would otherwise share the cores with the
packed run that follows), after warm-up; the table
has the medians of ``--repeats`` and their ratio, and the ratio of the fastest runs (on a shared
machine the medians move with whatever else runs).  Every packed result (acc and rowsum) is checked against the
numpy integer reference on the same random codes before its row is printed, so a fast but wrong
kernel cannot report a speedup (and TF's float32 result against it too, to be sure both compute the
same layer).  Prints a markdown table and the machine (load average included:
the timings are only as quiet as the machine).
"""
import argparse
import os
import platform
import statistics
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from machine_info import cpu_model  # noqa: E402  (bench/ is the script's directory)

W1A2, BNN, W1A4 = (1, 2), (1, 1), (1, 4)
#: net -> the bit widths (W, A) its quantized layers are timed at
NET_BITS = {"alexnet": (W1A2, BNN), "svhn": (W1A2, BNN), "resnet": (W1A4,)}


def network_layers(net, bits):
    """``[(net, layer, kind, input [H, W, Cin] or [K], output channels, kernel, stride, padding, (k, m))]``.

    The quantized layers of the script's own network description (its packed program), one row per
    distinct shape; a grouped convolution is timed as one of its groups, as the engine calls it.
    """
    from dorefanet.driver import make_model
    from dorefanet.packed.program import layer_inputs
    from dorefanet.scripts import load_script

    script = {"svhn": "svhn-digit-dorefa.py", "alexnet": "alexnet-dorefa.py", "resnet": "resnet-dorefa.py"}[net]
    model = make_model(load_script(script), bits + (32,), tensorflow=False)
    size = model.image_size
    rows, seen = [], set()
    for op, shape in layer_inputs(model.packed_program(), (size, size, 3)):
        if not op["quantized"]:
            continue
        if op["op"] == "fc":
            row = ("fc", (int(np.prod(shape)),), op["out"], None, None, None)
            name = op["layer"]
        else:
            groups = op["groups"]
            row = ("conv", shape[:2] + (shape[2] // groups,), op["out"] // groups, tuple(op["kernel"]), op["stride"],
                   op["padding"])
            name = op["layer"] + (" (1 of {} groups)".format(groups) if groups > 1 else "")
        if row not in seen:
            seen.add(row)
            rows.append((net, name) + row + (bits,))
    return rows


def tf_pads(size, kernel, stride, padding):
    """(before, after) zero padding of one spatial axis, as TensorFlow's SAME / VALID."""
    if padding == "VALID":
        return 0, 0
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def bits_name(bits):
    return {W1A2: "W1A2", BNN: "W1A1 (BNN)", W1A4: "W1A4"}.get(bits, "W%dA%d" % bits)


def measure(layer, batch, repeats, threads, tf, kernels, np):
    """Median ms of TF float32 and of the packed layer, and the ratio of the fastest runs, after checking it."""
    _, name, kind, shape, cout, kernel, stride, padding, (k_bits, m_bits) = layer
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2 ** m_bits, (batch,) + shape, dtype=np.uint8)
    if kind == "fc":
        q = rng.integers(0, 2 ** k_bits, (cout,) + shape, dtype=np.uint8)          # [C, K]
        w_float = q.T.astype(np.float32)
    else:
        q = rng.integers(0, 2 ** k_bits, (cout,) + kernel + shape[-1:], dtype=np.uint8)  # [Cout, kh, kw, Cin]
        w_float = q.transpose(1, 2, 3, 0).astype(np.float32)
        pads = tf_pads(shape[0], kernel[0], stride, padding) + tf_pads(shape[1], kernel[1], stride, padding)
    w_planes = kernels.pack_planes(q, k_bits)
    prepared = kernels.prepare_weights(w_planes)

    def packed():
        if kind == "fc":
            return kernels.gemm_popcount_codes(codes, m_bits, prepared)
        return kernels.conv_popcount_codes(codes, m_bits, prepared, kernel, stride, pads)

    graph = tf.Graph()
    with graph.as_default():
        x_in = tf.placeholder(tf.float32, codes.shape)
        w_in = tf.placeholder(tf.float32, w_float.shape)
        x = tf.Variable(x_in)
        w = tf.Variable(w_in)
        y = tf.matmul(x, w) if kind == "fc" else tf.nn.conv2d(x, w, [1, stride, stride, 1], padding)
        config = tf.ConfigProto(intra_op_parallelism_threads=threads, inter_op_parallelism_threads=1)
        with tf.Session(graph=graph, config=config) as sess:
            sess.run(tf.global_variables_initializer(), {x_in: codes.astype(np.float32), w_in: w_float})
            tf_run = lambda: sess.run(y.op)  # noqa: E731
            for _ in range(2):
                tf_run()
                result = packed()
            tf_ms, packed_ms = [], []
            for _ in range(repeats):
                for fn, times in ((tf_run, tf_ms), (packed, packed_ms)):
                    # an untimed run first: TensorFlow's pool threads keep spinning for a while after a
                    # run, and a packed run started at once would share the cores with them (pausing
                    # instead lets this VM's idle cores slow down, which hurts both sides)
                    fn()
                    start = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - start) * 1e3)
            tf_result = sess.run(y)
    a = kernels.pack_planes(codes, m_bits)
    if kind == "fc":
        expected = kernels.reference_gemm(a, w_planes)
    else:
        expected = kernels.reference_conv(a, w_planes, kernel, stride, pads)
    for got, want, what in zip(result, expected, ("acc", "rowsum")):
        if got.shape != want.shape or not np.array_equal(got, want):
            raise SystemExit("packed %s of %s %s batch %d differs from the integer reference"
                             % (what, name, bits_name((k_bits, m_bits)), batch))
    # TF computes the same sums (exactly, in float32, while they stay below 2^24)
    if np.abs(expected[0]).max() < 2 ** 24 and not np.array_equal(tf_result, expected[0]):
        raise SystemExit("TF float32 and the packed kernel compute different things for %s" % name)
    if kind == "fc":
        desc = "%d -> %d" % (shape[0], cout)
    else:
        desc = "%dx%d/%d %s, %dx%dx%d -> %d" % (kernel + (stride, padding) + shape + (cout,))
    return desc, statistics.median(tf_ms), statistics.median(packed_ms), min(tf_ms) / min(packed_ms)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 128], help="batch sizes (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each, the median is reported (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="TF intra-op threads = numba threads (default: %(default)s)")
    parser.add_argument("--nets", nargs="+", choices=["alexnet", "svhn", "resnet"], default=["alexnet", "svhn"],
                        help="networks whose layers are timed (default: %(default)s)")
    args = parser.parse_args(argv)

    import numba

    from dorefanet.packed import kernels
    from dorefanet.tf_setup import tf

    numba.set_num_threads(args.threads)
    load_before = os.getloadavg()
    start = time.perf_counter()
    kernels.conv_popcount_codes(np.zeros((1, 3, 3, 3), np.uint8), 2,
                                kernels.pack_planes(np.zeros((1, 3, 3, 3), np.uint8), 1), (3, 3), 1, (1, 1, 1, 1))
    first_call = time.perf_counter() - start

    print("| layer | bits | shape | batch | TF float32 ms | packed ms | speedup | speedup of the fastest runs |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    layers = [row for net in args.nets for bits in NET_BITS[net] for row in network_layers(net, bits)]
    for layer in layers:
        for batch in args.batches:
            desc, tf_ms, packed_ms, best = measure(layer, batch, args.repeats, args.threads, tf, kernels, np)
            print("| %s %s | %s | %s | %d | %.3f | %.3f | %.1fx | %.1fx |"
                  % (layer[0], layer[1], bits_name(layer[8]), desc, batch, tf_ms, packed_ms, tf_ms / packed_ms,
                     best), flush=True)
    load_after = os.getloadavg()
    print()
    print("packed ms = packing the activation codes + popcount kernel (weights laid out once, untimed); "
          "its acc and rowsum checked equal to the integer reference, and TF's float32 output to that acc.  "
          "Times are medians of %d runs, TF and packed interleaved; the last column is the ratio of the "
          "fastest runs (less sensitive to other processes)." % args.repeats)
    print("Machine: %s, %d cores; TensorFlow %s, numba %s, numpy %s, Python %s; %d threads (TF intra-op "
          "and numba); load average %.2f before, %.2f after; first kernel call %.2f s (JIT or cache load)."
          % (cpu_model(), os.cpu_count(), tf.__version__ if hasattr(tf, "__version__") else _tf_version(),
             numba.__version__, np.__version__, platform.python_version(), args.threads, load_before[0],
             load_after[0], first_call))


def _tf_version():
    import tensorflow

    return tensorflow.__version__


if __name__ == "__main__":
    main()
