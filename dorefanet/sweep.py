"""``--sweep``: the paper's (W,A,G) table in one command, trained one run after another, with a plot.

A sweep directory holds one ordinary training run per configuration and seed
(``dorefa-W,A,G-seedS/``, trained by the script itself in a child process, so
a configuration that fails cannot take the others down), the children's
output in ``logs/``, and the results: ``results.md`` (the table),
``results.json`` (every run's figures and command) and ``error_vs_bits.png``.
They are rewritten, atomically, after every run.

Killed at any moment, the same command resumes: a run whose
``sweep-result.json`` matches its command is reused, a run with a checkpoint
resumes from it (the training script's own resume), a run whose training
finished but whose result was not yet recorded is only read.  The child gets
SIGKILL when the sweep process dies, so no training outlives its sweep.

Figures per run: the test error is the run's own evaluation of its final
weights on the whole test split (``stats.json``, the same number ``--load RUN
--eval`` prints; the sweep runs that when the record is missing); the
training time is the sum of its epochs' ``epoch_seconds`` (steps only: no
start-up, no evaluation).  Parameters, sizes and bit operations come from
``--summary`` (:mod:`dorefanet.summary`).
"""
import math
import os
import re
import shlex
import signal
import subprocess
import sys

from dorefanet.atomic_file import atomic_open, read_json, write_json_atomic
from dorefanet.logdir_lock import lock_logdir

__all__ = ["RESULT_FILE", "run_name", "Sweep", "aggregate", "format_results", "plot_results"]

RESULT_FILE = "sweep-result.json"


def run_name(bits, seed):
    """The run directory's name of configuration ``bits`` (``'1,2,4'``) and ``seed``."""
    return "dorefa-{}-seed{}".format(bits, seed)


def _die_with_parent():
    """In the child, before exec: be killed when the sweep process dies (Linux), whatever killed it."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Sweep:
    """Train and evaluate every ``(bits, seed)`` of a sweep in ``directory``, then write its results.

    * ``script``: path of the training script (called as ``python script``);
    * ``flags``: the flags every run shares (data, epochs, batch...), without
      ``--dorefa``, ``--seed`` and ``--logdir``;
    * ``eval_flags``: what ``--load RUN --eval`` needs besides (the data);
    * ``error_key``: the ``stats.json`` field of the test error, and
      ``eval_pattern`` the regular expression whose group 1 is the error in the
      output of ``--eval``;
    * ``figures(bits)``: ``--summary``'s totals of a configuration;
    * ``title``: what the table and the plot are of; ``command``: the sweep's
      own command line (recorded).
    """

    def __init__(self, directory, configs, seeds, script, flags, eval_flags, epochs, error_key, eval_pattern,
                 figures, title, command):
        self.directory = directory
        self.configs = [str(c) for c in configs]
        self.seeds = list(seeds)
        self.script, self.flags, self.eval_flags = script, list(flags), list(eval_flags)
        self.epochs, self.error_key, self.eval_pattern = int(epochs), error_key, eval_pattern
        self.figures, self.title, self.command = figures, title, list(command)
        self._figures = {}

    # ------------------------------------------------------------ one run
    def logdir(self, bits, seed):
        return os.path.join(self.directory, run_name(bits, seed))

    def run_args(self, bits, seed):
        """The training command of one run, without the interpreter (what its record is matched on)."""
        return [self.script, "--dorefa", bits, "--seed", str(seed), "--logdir", self.logdir(bits, seed)] + self.flags

    def _log_path(self, bits, seed):
        return os.path.join(self.directory, "logs", run_name(bits, seed) + ".log")

    @staticmethod
    def _open_log(log_path, args):
        """``log_path`` for appending (its folder made), with the command about to run written first."""
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        log = open(log_path, "a")
        log.write("$ {}\n".format(" ".join(shlex.quote(a) for a in args)))
        log.flush()
        return log

    def _child(self, args, log_path):
        with self._open_log(log_path, args) as log:
            return subprocess.call([sys.executable] + args, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)

    def _failure(self, log_path, status):
        """The child's own one-line ``error:`` message, else its last line and exit status."""
        try:
            with open(log_path, errors="replace") as f:
                lines = [line.strip() for line in f if line.strip()]
        except OSError:
            lines = []
        errors = [line for line in lines if line.startswith("error:")]
        if errors:
            return errors[-1][len("error:"):].strip()
        return "exit status {}{}".format(status, ": " + lines[-1] if lines else "")

    def _trained_through(self, logdir):
        """The last epoch of ``logdir``'s newest checkpoint (0 without one)."""
        from dorefanet.checkpoints import latest_checkpoint
        from dorefanet.training import checkpoint_step

        config = read_json(os.path.join(logdir, "config.json")) or {}
        steps = config.get("steps_per_epoch")
        try:
            ckpt = latest_checkpoint(logdir) if os.path.isdir(logdir) else None
            return checkpoint_step(ckpt) // int(steps) if ckpt and steps else 0
        except Exception:   # a damaged run: its own training command reports what is wrong with it
            return 0

    def _evaluate(self, bits, seed, log_path):
        """``--load RUN --eval``'s test error, when the run's own record of its last epoch is missing."""
        args = [self.script, "--load", self.logdir(bits, seed), "--eval"] + self.eval_flags
        out = subprocess.run([sys.executable] + args, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             preexec_fn=_die_with_parent)
        with self._open_log(log_path, args) as log:
            log.write(out.stdout + out.stderr)
        found = re.search(self.eval_pattern, out.stdout)
        return float(found.group(1)) if out.returncode == 0 and found else None

    def figures_of(self, bits):
        if bits not in self._figures:
            self._figures[bits] = self.figures(bits)
        return self._figures[bits]

    def run_one(self, bits, seed):
        """Train (or reuse, or resume) one run; return its record (``status`` ``'ok'`` or ``'failed'``)."""
        logdir, args = self.logdir(bits, seed), self.run_args(bits, seed)
        record = {"bits": bits, "seed": seed, "logdir": logdir, "command": " ".join(shlex.quote(a) for a in args)}
        stored = read_json(os.path.join(logdir, RESULT_FILE))
        if isinstance(stored, dict) and stored.get("status") == "ok" and stored.get("command") == record["command"]:
            return dict(stored, reused=True)
        log_path = self._log_path(bits, seed)
        trained = self._trained_through(logdir)
        if trained > self.epochs:
            # its weights are not those of --epochs: no honest figure for this sweep
            return dict(record, status="failed", error="{} holds {} epochs, more than --epochs {}; use another "
                        "--logdir".format(logdir, trained, self.epochs))
        if trained < self.epochs:
            status = self._child(args, log_path)
            if status != 0:
                return dict(record, status="failed", error=self._failure(log_path, status))
        stats = read_json(os.path.join(logdir, "stats.json"))
        stats = stats if isinstance(stats, list) else []
        last = [s for s in stats if s.get("epoch_num") == self.epochs and self.error_key in s]
        error = last[-1][self.error_key] if last else self._evaluate(bits, seed, log_path)
        if error is None:
            return dict(record, status="failed", error="no test error recorded and --eval failed (see {})".format(
                log_path))
        timed = {s["epoch_num"]: s["epoch_seconds"] for s in stats if "epoch_seconds" in s}
        config = read_json(os.path.join(logdir, "config.json")) or {}
        record.update(status="ok", test_error=float(error), epochs=self.epochs,
                      train_seconds=sum(timed.values()),
                      # an epoch whose statistics a kill lost is missing from the time
                      train_seconds_complete=set(timed) >= set(range(1, self.epochs + 1)),
                      resumed=bool(config.get("resumed_at")), figures=self.figures_of(bits))
        write_json_atomic(record, os.path.join(logdir, RESULT_FILE))
        return record

    # ------------------------------------------------------------ the sweep
    def run(self, out=sys.stdout):
        """Run every configuration and seed in order; return the records (results written after each run).

        The sweep holds its directory (:mod:`dorefanet.logdir_lock`) while it runs, as each run holds its own.
        """
        with lock_logdir(self.directory):
            return self._run_all(out)

    def _run_all(self, out):
        plan = [(bits, seed) for bits in self.configs for seed in self.seeds]
        records = [{"bits": b, "seed": s, "status": "pending"} for b, s in plan]
        for i, (bits, seed) in enumerate(plan):
            print("[sweep {}/{}] {} seed {}: ".format(i + 1, len(plan), bits, seed), end="", file=out, flush=True)
            record = self.run_one(bits, seed)
            records[i] = record
            if record["status"] == "ok":
                print("{}test error {:.4f}, {:.1f} s of training".format(
                    "reused: " if record.get("reused") else "", record["test_error"], record["train_seconds"]),
                    file=out, flush=True)
            else:
                print("FAILED: {} (log: {})".format(record["error"], self._log_path(bits, seed)), file=out,
                      flush=True)
            self.write(records)
        return records

    def write(self, records):
        """``results.json``, ``results.md`` and ``error_vs_bits.png`` of ``records`` (each atomically)."""
        rows = aggregate(records, self.configs, self.figures_of)
        clean = [{k: v for k, v in r.items() if k != "reused"} for r in records]
        write_json_atomic({"title": self.title, "command": self.command, "directory": self.directory,
                     "configs": rows, "runs": clean}, os.path.join(self.directory, "results.json"))
        table = format_results(rows, self.title)
        with atomic_open(os.path.join(self.directory, "results.md"), "w") as f:
            f.write(table + "\n")
        plot_results(rows, os.path.join(self.directory, "error_vs_bits.png"), self.title)
        return table


# ---------------------------------------------------------------- results
def _mean_std(values):
    """Mean and sample standard deviation (n - 1); no deviation of one value."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return mean, std


def aggregate(records, configs, figures_of):
    """One row per configuration of ``configs``: its runs' error (mean, std over seeds), time and figures."""
    rows = []
    for bits in configs:
        runs = [r for r in records if r["bits"] == bits]
        ok = [r for r in runs if r["status"] == "ok"]
        row = {"bits": bits, "seeds": [r["seed"] for r in ok], "runs": len(runs),
               "failed": [{"seed": r["seed"], "error": r["error"]} for r in runs if r["status"] == "failed"],
               "pending": sum(r["status"] == "pending" for r in runs), "figures": figures_of(bits)}
        if ok:
            row["test_error"], row["test_error_std"] = _mean_std([r["test_error"] for r in ok])
            row["train_seconds"] = _mean_std([r["train_seconds"] for r in ok])[0]
            row["train_seconds_complete"] = all(r["train_seconds_complete"] for r in ok)
        rows.append(row)
    return rows


def _count(n):
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return "{:.3g}{}".format(n / size, unit)
    return str(int(n))


def _megabytes(n):
    return "{:.3f} MB".format(n / 1e6)


def _error_cell(row):
    if "test_error" not in row:
        if row["failed"]:
            return "failed: " + row["failed"][0]["error"]
        return "not run yet"
    text = "{:.2f}".format(100 * row["test_error"])
    if row["test_error_std"] is not None:
        text += " ± {:.2f}".format(100 * row["test_error_std"])
    notes = []
    if len(row["seeds"]) < row["runs"]:
        notes.append("{} of {} seeds".format(len(row["seeds"]), row["runs"]))
    if row["failed"]:
        notes.append("{} failed: {}".format(len(row["failed"]), row["failed"][0]["error"]))
    return text + (" ({})".format("; ".join(notes)) if notes else "")


def format_results(rows, title):
    """The paper-style Markdown table of :func:`aggregate`'s rows."""
    header = ["W,A,G", "test error (%)", "seeds", "parameters", "packed size", "float size", "BOPs",
              "BOPs vs 32,32,32", "training time"]
    lines = ["# " + title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    incomplete = False
    for row in rows:
        f = row["figures"]
        time_text = "-"
        if "train_seconds" in row:
            time_text = "{:.1f} s".format(row["train_seconds"])
            if not row["train_seconds_complete"]:
                time_text += "*"
                incomplete = True
        cells = [row["bits"], _error_cell(row), str(len(row["seeds"])), _count(f["params"]),
                 _megabytes(f["packed_bytes"]), _megabytes(f["float_bytes"]), _count(f["bops"]),
                 "{:.4f}".format(f["bops_vs_32"]), time_text]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines += ["", "Test error: the final weights on the whole test split, mean ± sample standard deviation over "
              "seeds. BOPs: bit operations of one image, MACs x W bits x A bits (32 for an unquantized side). "
              "Training time: the epochs' steps, mean over seeds (no start-up or evaluation)."]
    if incomplete:
        lines.append("* an epoch's time was lost to an interruption; the figure is short of it.")
    return "\n".join(lines)


def _label_offsets(points):
    """``(x, y, label, vertical offset in points)``: labels of points that nearly coincide fan out vertically."""
    if not points:
        return []
    ys = [y for _, y, _ in points]
    near_y = 0.05 * max(max(ys) - min(ys), 1.0)
    clusters = []
    for x, y, row in sorted(points, key=lambda p: (p[1], p[0])):
        home = next((c for c in clusters if any(max(x, cx) / min(x, cx) < 1.25 and abs(y - cy) < near_y
                                                for cx, cy, _ in c)), None)
        if home is None:
            home = []
            clusters.append(home)
        home.append((x, y, row["bits"]))
    return [(x, y, label, 12 * (k - (len(c) - 1) / 2)) for c in clusters for k, (x, y, label) in enumerate(c)]


def plot_results(rows, path, title):
    """``error_vs_bits.png``: test error (%) against BOPs (log axis), a labelled point per configuration."""
    import matplotlib

    matplotlib.use("Agg")   # headless: no display on training machines and CI
    from matplotlib import pyplot as plt

    from matplotlib.ticker import FuncFormatter, LogLocator

    done = [r for r in rows if "test_error" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    points = [(r["figures"]["bops"], 100 * r["test_error"], r) for r in done]
    for x, y, row in points:
        std = 100 * row["test_error_std"] if row["test_error_std"] is not None else None
        ax.errorbar([x], [y], yerr=[std] if std is not None else None, fmt="o", capsize=4, color="tab:blue")
    for x, y, label, dy in _label_offsets(points):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(7, dy), fontsize=9, va="center")
    ax.set_xscale("log")
    # ticks at 1, 2 and 5 of each decade, labelled 5G, 10G, 20G: a sweep often spans less than a decade
    ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _count(v)))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: _count(v)))
    if done:   # room for the labels of the outermost points
        xs = [r["figures"]["bops"] for r in done]
        ax.set_xlim(min(xs) / 1.5, max(xs) * 2.0)
    ax.set_xlabel("bit operations per image (MACs x W bits x A bits; log scale, G = 1e9)")
    ax.set_ylabel("test error (%)")
    seeds = sorted({len(r["seeds"]) for r in done})
    ax.set_title(title + ("" if seeds in ([], [1]) else "\n(error bars: standard deviation over seeds)"),
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if done:
        spread = [100 * (r["test_error_std"] or 0.0) for r in done]
        low = min(100 * r["test_error"] - d for r, d in zip(done, spread))
        high = max(100 * r["test_error"] + d for r, d in zip(done, spread))
        pad = max(1.0, 0.15 * (high - low))
        bottom = max(0.0, low - pad)
        ax.set_ylim(bottom - 0.04 * (high + pad - bottom), high + pad)   # a point at 0 % stays visible
    missing = [r["bits"] for r in rows if "test_error" not in r]
    if missing:
        fig.text(0.01, 0.01, "not plotted (failed or not run): " + ", ".join(missing), fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    plt.close(fig)
