#!/usr/bin/env python
"""Does the SVHN input pipeline keep up with training?  Measures both in one command.

    python bench/svhn_dataflow.py [--synthetic | --data DIR] [--dorefa 1,2,4] [--workers N]

Prints the training dataflow's images/s on its own (parallel workers, as in
training), the training step's images/s on in-memory batches, and their ratio.
Medians of repeated timings; start-up and warm-up excluded.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tf_setup  # noqa: E402,F401
from tf_setup import tf  # noqa: E402

import numpy as np  # noqa: E402

from cli import dorefa_bits  # noqa: E402
from script_loader import load_script  # noqa: E402


def time_dataflow(df, batches, repeats):
    df.reset_state()
    it = iter(df)
    for _ in range(3):
        next(it)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        images = sum(len(next(it)[1]) for _ in range(batches))
        rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates)


def time_training(svhn, bits, batch, steps, repeats):
    from tensorpack.tfutils.tower import TowerContext
    from training import session_config

    with tf.Graph().as_default():
        model = svhn.SVHNModel(bits)
        x = tf.placeholder(tf.float32, [batch, 40, 40, 3])
        y = tf.placeholder(tf.int32, [batch])
        with TowerContext("", is_training=True):
            cost = model.build_graph(x, y)
        step = model.optimizer().minimize(cost, global_step=tf.train.get_or_create_global_step())
        step = tf.group(step, *tf.get_collection(tf.GraphKeys.UPDATE_OPS))
        rng = np.random.RandomState(0)
        feed = {x: rng.uniform(0, 255, x.shape.as_list()).astype(np.float32),
                y: rng.randint(0, 10, batch).astype(np.int32)}
        with tf.Session(config=session_config()) as sess:
            sess.run(tf.global_variables_initializer())
            for _ in range(3):
                sess.run(step, feed)
            rates = []
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(steps):
                    sess.run(step, feed)
                rates.append(steps * batch / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", help="SVHN directory (default: the built-in synthetic digits)")
    parser.add_argument("--dorefa", type=dorefa_bits, default=dorefa_bits("1,2,4"), help="bits of the trained net")
    parser.add_argument("--batch", type=int, default=128, help="batch size")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data processes")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (the median is printed)")
    args = parser.parse_args(argv)

    svhn = load_script("svhn-digit-dorefa.py")
    source = argparse.Namespace(synthetic=not args.data, data=args.data, seed=0)
    df = svhn.make_dataflow(svhn.source_flow(source, "train"), True, args.batch, args.workers)
    data_rate = time_dataflow(df, batches=10, repeats=args.repeats)
    train_rate = time_training(svhn, args.dorefa, args.batch, steps=5, repeats=args.repeats)
    print("| what | images/s |")
    print("|---|---|")
    print("| dataflow alone ({}, {} workers) | {:.0f} |".format(
        "synthetic" if not args.data else "SVHN .mat", args.workers, data_rate))
    print("| training {} at batch {} | {:.0f} |".format(args.dorefa, args.batch, train_rate))
    print("| ratio dataflow / training | {:.2f}x |".format(data_rate / train_rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
