#!/usr/bin/env python
"""The machine's practical compute peaks, the yardsticks for the packed engine's profile.

    python bench/machine_peaks.py                 # fp32 GEMM, popcount tile, int8 VNNI; default sizes
    python bench/machine_peaks.py --seconds 0.5   # shorter timings

* **fp32**: numpy's ``float32`` matrix product (its BLAS, all threads) of two ``--gemm-size`` square
  matrices: the rate a well-tuned float kernel reaches here.
* **popcount**: the engine's own register tile (``kernels._tile4``: 4 rows x 32 channels, ``vpandq`` +
  ``vpopcntq`` + ``vpaddq`` per 64-bit word) on one thread over a window of words in L1 cache, in
  one-bit multiply-adds.
* **int8 VNNI**: ``vpdpbusd`` (AVX512-VNNI, 64 8-bit multiply-adds an instruction) with 8 independent
  accumulators in registers, one thread: the ceiling of an 8-bit kernel, reported only where the CPU
  has ``avx512_vnni``.

Each is the best of ``--rounds`` timings (a peak, not a typical rate), per core and per cycle at the
clock ``/proc/cpuinfo`` reports (CPUs that boost run above it, so a figure per nominal cycle can exceed
the instruction count per cycle).
"""
import argparse
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from machine_info import cpu_mhz, cpu_model, load_average  # noqa: E402  (bench/ is the script's directory)


def _best(run, rounds):
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def fp32_gemm(size, rounds):
    """(multiply-adds a second, threads) of numpy's float32 ``a @ b``."""
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.random((size, size), np.float32), rng.random((size, size), np.float32)
    a @ b
    return size ** 3 / _best(lambda: a @ b, rounds), os.cpu_count()


def _popcount_loop():
    from numba import njit

    from dorefanet.packed import kernels

    @njit(nogil=True)
    def loop(words, panels, out, span, repeats):
        for _ in range(repeats):
            kernels._tile4(words, 0, 8 * span, 16 * span, 24 * span, 1, span, 0, panels, 0, out, 0, 32, 64, 96,
                           0, 0, 0, 0)
        return out[0]

    return loop


def popcount_tile(seconds, rounds):
    """One-bit multiply-adds a second of the engine's popcount tile on one thread (data in L1)."""
    import numpy as np

    span = 64                                   # words of a window: 4 rows x 64 words, 64 x 32 weight words
    rng = np.random.default_rng(1)
    words = rng.integers(0, 2 ** 63, 4 * span, dtype=np.uint64)
    panels = rng.integers(0, 2 ** 63, span * 32, dtype=np.uint64)
    out = np.zeros(4 * 32, np.int32)
    loop = _popcount_loop()
    loop(words, panels, out, span, 1)
    per_call = 4 * 32 * 64 * span
    repeats = max(1, int(seconds * 5e11 / per_call))
    return per_call * repeats / _best(lambda: loop(words, panels, out, span, repeats), rounds)


def _vnni_intrinsic():
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    v16 = ir.VectorType(ir.IntType(32), 16)
    i64 = ir.IntType(64)

    @intrinsic
    def dpbusd_chains(typingctx, data, iterations):
        """8 accumulators, each ``vpdpbusd``-ed ``iterations`` times with two vectors of ``data``."""
        def codegen(context, builder, signature, args):
            base = builder.bitcast(context.make_array(signature.args[0])(context, builder, args[0]).data,
                                   v16.as_pointer())
            vector = [builder.load(builder.gep(base, [ir.Constant(i64, i)]), align=4) for i in range(10)]
            dpbusd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16, [v16, v16, v16]),
                                                    "llvm.x86.avx512.vpdpbusd.512")
            entry = builder.block
            body, done = builder.append_basic_block("chains"), builder.append_basic_block("done")
            builder.branch(body)
            builder.position_at_end(body)
            count = builder.phi(i64)
            count.add_incoming(ir.Constant(i64, 0), entry)
            accs = []
            for k in range(8):
                acc = builder.phi(v16)
                acc.add_incoming(vector[2 + k], entry)
                accs.append(acc)
            new = [builder.call(dpbusd, [acc, vector[k % 2], vector[1 - k % 2]]) for k, acc in enumerate(accs)]
            step = builder.add(count, ir.Constant(i64, 1))
            count.add_incoming(step, body)
            for acc, value in zip(accs, new):
                acc.add_incoming(value, body)
            builder.cbranch(builder.icmp_signed("<", step, args[1]), body, done)
            builder.position_at_end(done)
            total = new[0]
            for value in new[1:]:
                total = builder.add(total, value)
            return builder.extract_element(total, ir.Constant(ir.IntType(32), 0))

        return types.int32(data, types.int64), codegen

    return dpbusd_chains


def has_vnni():
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512_vnni" in line for line in f)
    except OSError:
        return False


def int8_vnni(seconds, rounds):
    """8-bit multiply-adds a second of ``vpdpbusd`` on one thread."""
    import numpy as np
    from numba import njit

    chains = _vnni_intrinsic()

    @njit(nogil=True)
    def loop(data, iterations):
        return chains(data, iterations)

    data = np.ones(16 * 10, np.int32)
    loop(data, 1)
    iterations = max(1, int(seconds * 4e8))
    return 8 * 64 * iterations / _best(lambda: loop(data, iterations), rounds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--gemm-size", type=int, default=2048, help="rows = columns of the fp32 matrices")
    parser.add_argument("--seconds", type=float, default=1.0, help="about how long one timing of a loop takes")
    parser.add_argument("--rounds", type=int, default=5, help="timings of each; the best is reported")
    args = parser.parse_args(argv)
    if args.gemm_size < 1 or args.seconds <= 0 or args.rounds < 1:
        parser.error("--gemm-size, --seconds and --rounds must be positive")
    mhz = cpu_mhz()
    rows = []
    rate, threads = fp32_gemm(args.gemm_size, args.rounds)
    rows.append(("fp32 GEMM (numpy BLAS, %d x %d)" % (args.gemm_size, args.gemm_size), threads, rate / threads))
    rows.append(("popcount tile (engine's _tile4, 1-bit)", 1, popcount_tile(args.seconds, args.rounds)))
    if has_vnni():
        rows.append(("int8 VNNI (vpdpbusd)", 1, int8_vnni(args.seconds, args.rounds)))
    print("| kernel | threads | G MACs/s per core | MACs per cycle per core |")
    print("|---|---:|---:|---:|")
    for name, threads, per_core in rows:
        per_cycle = "%.1f" % (per_core / (mhz * 1e6)) if mhz else "n/a"
        print("| %s | %d | %.1f | %s |" % (name, threads, per_core / 1e9, per_cycle))
    print()
    print("machine: %s, %d cores, %s MHz (/proc/cpuinfo); load average %s"
          % (cpu_model(), os.cpu_count(), "%.0f" % mhz if mhz else "unknown", load_average()))


if __name__ == "__main__":
    main()
