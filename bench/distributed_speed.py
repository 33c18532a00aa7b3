#!/usr/bin/env python
"""Training throughput of two worker processes on this machine (``--cluster`` on 127.0.0.1) against one process.

    python bench/distributed_speed.py                                  # ResNet-18, 112 px, batch 16, 3 rounds
    python bench/distributed_speed.py --model alexnet --image-size 224 --batch 32 --steps 6 --rounds 5

Both run the real script with ``--fake`` data and the same total ``--batch``:
one process with one tower, and two workers with half the batch each whose
gradients are all-reduced over gRPC.  Each run trains two epochs of
``--steps`` steps; the figure is the chief's second epoch (tensorpack's epoch
time: the first epoch holds the warm-up, validation runs outside the timing),
as images per second.  The rounds are interleaved (one process, two workers,
one process, ...); the table gives the median of each and the median of the
per-round ratios, which is the figure to use on a machine shared with other
work.  On one machine the two workers share its cores, so the ratio measures
the engine's cost (all-reduce, a second graph), not the speed-up of a second
machine.  Prints a markdown table, the machine and its load.
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from machine_info import cpu_model, load_average  # noqa: E402  (bench/ is the script's directory)

from dorefanet.cluster import free_local_ports  # noqa: E402

SCRIPTS = {"resnet": "resnet-dorefa.py", "alexnet": "alexnet-dorefa.py"}
_EPOCH = re.compile(r"Epoch 2 \(global_step \d+\) finished, time:(.*)\.$")
_UNITS = {"day": 86400.0, "hour": 3600.0, "minute": 60.0, "second": 1.0}


def parse_duration(text):
    """tensorpack's humanized epoch time ("1 minute 3 seconds", "5.23 seconds") in seconds."""
    total = 0.0
    for number, unit in re.findall(r"([\d.]+) (day|hour|minute|second)s?", text):
        total += float(number) * _UNITS[unit]
    if total <= 0:
        raise ValueError("cannot read the epoch time {!r}".format(text))
    return total


def epoch_seconds(logdir):
    with open(os.path.join(logdir, "log.log")) as f:
        for line in f:
            match = _EPOCH.search(line.strip())
            if match:
                return parse_duration(match.group(1))
    raise RuntimeError("no second epoch in {}/log.log".format(logdir))


def run(args, workdir, workers):
    """One training run; returns the chief's images per second in its second epoch."""
    logdir = tempfile.mkdtemp(prefix="run-", dir=workdir)
    shutil.rmtree(logdir)
    base = [sys.executable, os.path.join(ROOT, SCRIPTS[args.model]), "--fake", "--workers", "0",
            "--batch", str(args.batch), "--steps-per-epoch", str(args.steps), "--epochs", "2",
            "--image-size", str(args.image_size), "--logdir", logdir]
    env = dict(os.environ)
    env.pop("TF_CONFIG", None)
    if workers == 1:
        commands = [base]
    else:
        cluster = ",".join("127.0.0.1:{}".format(p) for p in free_local_ports(workers))
        commands = [base + ["--cluster", cluster, "--task", str(i), "--worker-timeout", str(args.timeout)]
                    for i in range(workers)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                              start_new_session=True) for cmd in commands]
    try:
        errors = [proc.communicate(timeout=args.run_timeout)[1] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    for proc, err in zip(procs, errors):
        if proc.returncode != 0:
            raise RuntimeError("a training run failed:\n{}".format(err.decode(errors="replace")[-3000:]))
    return args.batch * args.steps / epoch_seconds(logdir)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--model", choices=sorted(SCRIPTS), default="resnet", help="(default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=112, help="(default: %(default)s)")
    parser.add_argument("--batch", type=int, default=16, help="total batch of both setups (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=8, help="steps per epoch (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=300, help="the workers' --worker-timeout")
    parser.add_argument("--run-timeout", type=float, default=1800, help="seconds a run may take")
    args = parser.parse_args(argv)
    if args.batch % 2:
        parser.error("--batch must be even (two workers take half each)")

    from dorefanet import tf_setup  # noqa: F401  (quiet TensorFlow import)
    import tensorflow

    print("machine: {}; {} cores; TensorFlow {}".format(cpu_model(), os.cpu_count(), tensorflow.__version__))
    print("load average before: {}".format(load_average()))
    single, double = [], []
    workdir = tempfile.mkdtemp(prefix="distributed-speed-")
    started = time.time()
    try:
        for _ in range(args.rounds):
            single.append(run(args, workdir, 1))
            double.append(run(args, workdir, 2))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ratios = [d / s for s, d in zip(single, double)]
    print("load average after: {} ({:.0f} s)".format(load_average(), time.time() - started))
    print()
    print("{} at {} px, total batch {}, {} steps per timed epoch, {} rounds".format(
        args.model, args.image_size, args.batch, args.steps, args.rounds))
    print()
    print("| setup | images/s (median) | per round |")
    print("|---|---|---|")
    print("| 1 process, 1 tower | {:.2f} | {} |".format(statistics.median(single),
                                                          ", ".join("{:.2f}".format(v) for v in single)))
    print("| 2 workers on 127.0.0.1, 1 tower each | {:.2f} | {} |".format(
        statistics.median(double), ", ".join("{:.2f}".format(v) for v in double)))
    print()
    print("ratio 2 workers / 1 process (median of per-round ratios): {:.3f} (rounds: {})".format(
        statistics.median(ratios), ", ".join("{:.3f}".format(r) for r in ratios)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
