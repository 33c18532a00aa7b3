#!/usr/bin/env python
"""What reproducible runs cost per training step: the ordered data hand-off, and TensorFlow's op determinism.

    python bench/determinism_cost.py                          # SVHN net and ResNet-20, 3 rounds
    python bench/determinism_cost.py --models cifar --steps 40 --rounds 5

Each variant is one real training run of the script on its built-in data
(``--synthetic --epochs 2 --steps-per-epoch STEPS``), in its own process; the
figure is the second epoch's ``epoch_seconds`` (its training steps only: no
start-up, graph building, first-step warm-up or evaluation) over its steps.  The variants, interleaved round
by round (A B C A B C ...), medians over the rounds:

* ``arrival``: the data workers' batches handed on in the order they arrive,
  the hand-off the scripts had before runs became a function of ``--seed``
  (each batch still made from its own stream, so only the hand-off differs);
* ``seeded`` (what every run does): handed on in their order in the stream;
* ``seeded + --deterministic-ops``: the same with TensorFlow's op determinism.

Ratios are each variant's step time over ``arrival``'s in the same round, then
the median over rounds.  Prints a markdown table, the machine and its load.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from machine_info import cpu_model, load_average  # noqa: E402  (bench/ is the script's directory)

MODELS = {"svhn": ("svhn-digit-dorefa.py", "1,2,4"), "cifar": ("cifar10-resnet-dorefa.py", "2,2,32")}
VARIANTS = ("arrival", "seeded", "seeded + --deterministic-ops")


def _arrival_order():
    """Make SeededBatches hand on whichever worker's batch is ready first (this child process only)."""
    from multiprocessing.connection import wait

    from dorefanet import seeded_batches

    def receive_any(self):
        busy = {self._conns[worker] for worker, _, _ in self._sent}
        conn = wait(list(busy))[0]
        worker = self._conns.index(conn)
        entry = next(e for e in self._sent if e[0] == worker)
        self._sent.remove(entry)
        kind, value = conn.recv()
        if kind == "error":
            raise value
        return value

    seeded_batches.SeededBatches._receive = receive_any


def child(model, variant, steps, batch, workers):
    from dorefanet.scripts import load_script

    if variant == "arrival":
        _arrival_order()
    script, bits = MODELS[model]
    module = load_script(script)
    with tempfile.TemporaryDirectory() as logdir:
        argv = ["--synthetic", "--dorefa", bits, "--epochs", "2", "--steps-per-epoch", str(steps),
                "--batch", str(batch), "--workers", str(workers), "--logdir", os.path.join(logdir, "run")]
        argv += ["--deterministic-ops"] if variant.endswith("--deterministic-ops") else []
        code = module.main(argv)
        if code:
            raise SystemExit("training failed with status {}".format(code))
        with open(os.path.join(logdir, "run", "stats.json")) as f:
            seconds = json.load(f)[-1]["epoch_seconds"]
    return {"step_s": seconds / steps}


def _run_child(model, variant, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", model, variant, str(args.steps), str(args.batch),
           str(args.workers)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError("benchmark child {} {} failed:\n{}".format(model, variant, proc.stderr[-3000:]))
    return json.loads(proc.stdout.strip().splitlines()[-1])["step_s"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models", default="svhn,cifar", help="comma-separated: svhn, cifar (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=128, help="training batch (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="data worker processes (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        model, variant, steps, batch, workers = args.child
        print(json.dumps(child(model, variant, int(steps), int(batch), int(workers))))
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        parser.error("--models: unknown {}; choose from {}".format(", ".join(unknown), ", ".join(sorted(MODELS))))
    times = {(m, v): [] for m in models for v in VARIANTS}
    for r in range(args.rounds):
        for model in models:
            for variant in VARIANTS:
                times[model, variant].append(_run_child(model, variant, args))
                print("round {}/{}: {} {}: {:.4f} s/step".format(r + 1, args.rounds, model, variant,
                                                                  times[model, variant][-1]), file=sys.stderr)
    print("{}; {} cores; load average {}; batch {}, {} data workers, {} steps per run, medians of {} rounds\n".format(
        cpu_model(), os.cpu_count(), load_average(), args.batch, args.workers, args.steps, args.rounds))
    print("| model | variant | s/step | vs arrival |")
    print("|---|---|---|---|")
    for model in models:
        base = times[model, "arrival"]
        for variant in VARIANTS:
            ratios = [t / b for t, b in zip(times[model, variant], base)]
            print("| {} {} | {} | {:.4f} | {:.3f} |".format(MODELS[model][0], MODELS[model][1], variant,
                                                          statistics.median(times[model, variant]),
                                                          statistics.median(ratios)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
