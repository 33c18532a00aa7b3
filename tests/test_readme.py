"""README.md as written: every command in its code blocks runs, in a scratch copy of the checkout.

Each command runs with the current directory at the copy's root, with its paths exactly as printed;
the only change is flags added at the end that make sizes small (epochs, steps, image size, batch).
The names the README uses for data and models (``SVHN_DIR``, ``ILSVRC``, ``LOGDIR``,
``AlexNet-1,2,6.npz``, ``cat.jpg``...) exist in the copy, generated in the same layout. Every training
command's printed evaluate command runs too, verbatim. A README command that is not run is listed
in ``NOT_RUN`` with the reason; one that is neither run nor listed fails the test.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT, kill_group, load_script, random_weights, write_cifar10, write_image
from dorefanet.cluster import free_local_ports
from dorefanet.model import run_name

pytestmark = pytest.mark.slow

README = os.path.join(ROOT, "README.md")

#: README commands no test runs, and why.
NOT_RUN = {
    "python3 -m venv .venv": "makes a virtual environment: .ci/run does that on every CI run",
    ". .venv/bin/activate": "activates that environment: .ci/run does that on every CI run",
    "pip install -r requirements.txt": "an install: .ci/run installs requirements-dev.txt, which includes it",
    "pip install -r requirements-dev.txt": "an install: .ci/run does exactly this",
    "python -m pytest -q tests": "this test suite itself: .ci/run runs exactly this command",
}

#: First words of a code block that make it shell commands (other blocks are output, layouts, citations).
_SHELL_STARTS = ("python", "python3", "pip", ".", "bash", "sh", "cd", "git", "make", "export", "source")
_IMAGENET = ("alexnet-dorefa.py", "resnet-dorefa.py")
_TIMEOUT = 900


# ------------------------------------------------------------------ reading the README
def code_blocks(text):
    """``[(line number, [lines])]`` of the Markdown code blocks (indented by four spaces, or fenced)."""
    blocks, current, fenced, previous_blank = [], None, False, True
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            if fenced:
                blocks.append(current)
                current, fenced = None, False
            else:
                current, fenced = (number + 1, []), True
            continue
        if fenced:
            current[1].append(line)
        elif line.startswith("    ") and (previous_blank or current is not None) and line.strip():
            if current is None:
                current = (number, [])
            current[1].append(line[4:])
        elif line.strip() and current is not None:
            blocks.append(current)
            current = None
        previous_blank = not line.strip()
    if current is not None and not fenced:
        blocks.append(current)
    return blocks


def _is_shell(word):
    return word.startswith("./") or word in _SHELL_STARTS


def readme_commands(text):
    """``[(line, 'shell', tokens) or (line, 'python', source)]``: every command in the README's code blocks.

    Backslash continuations are joined, ``# comments`` dropped, ``&&`` chains split into their commands and
    ``[optional]`` parts kept (without the brackets).
    """
    commands = []
    for start, lines in code_blocks(text):
        first = lines[0].split()
        if first and first[0] in ("from", "import"):
            commands.append((start, "python", "\n".join(lines)))
            continue
        if not first or not _is_shell(first[0]):
            continue
        logical, number = "", start
        for offset, line in enumerate(lines):
            if not logical:
                number = start + offset
            logical += line.rstrip()
            if logical.endswith("\\"):
                logical = logical[:-1] + " "
                continue
            tokens = [t.strip("[]") for t in shlex.split(logical, comments=True)]
            tokens = [t for t in tokens if t]
            part = []
            for token in tokens + ["&&"]:
                if token == "&&":
                    if part:
                        commands.append((number, "shell", part))
                    part = []
                else:
                    part.append(token)
            logical = ""
    return commands


def classify(command):
    """``'run'`` for a script command, ``'not run'`` for one listed in :data:`NOT_RUN`; else an error."""
    _, kind, payload = command
    if kind == "python":
        return "run"
    text = " ".join(payload)
    if text in NOT_RUN:
        return "not run"
    if payload[0].startswith("./") and os.path.exists(os.path.join(ROOT, payload[0])):
        return "run"
    raise AssertionError("README.md line {}: `{}` is neither run by tests/test_readme.py nor listed in its NOT_RUN "
                         "with a reason".format(command[0], text))


def _all_commands():
    with open(README) as f:
        return readme_commands(f.read())


# ------------------------------------------------------------------ the scratch copy
def _value(tokens, flag):
    return tokens[tokens.index(flag) + 1] if flag in tokens and tokens.index(flag) + 1 < len(tokens) else None


def mode_of(tokens):
    for flag in ("--sweep", "--summary", "--eval", "--run", "--export", "--export-packed", "--export-onnx"):
        if flag in tokens:
            return flag.lstrip("-")
    return "train"


def small_flags(tokens):
    """The flags added to a README command so that it runs in seconds: sizes only, never paths."""
    script, mode = os.path.basename(tokens[0]), mode_of(tokens)
    flags = []
    if script in _IMAGENET:
        flags += ["--image-size", "64"]
    if mode in ("train", "sweep"):
        flags += ["--epochs", "1", "--steps-per-epoch", "2"]
        if script in _IMAGENET and "--batch" not in tokens:
            flags += ["--batch", "8"]
    if mode == "sweep":
        flags += ["--seeds", "1"]       # a sweep's size is its runs: one seed each
    return flags


def copy_checkout(dest):
    """The checkout's files (no git data, runs, environments or caches) at ``dest``."""
    shutil.copytree(ROOT, dest, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "train_log", ".venv", "venv", "__pycache__", ".pytest_cache", "*.egg-info", "*.packed.npz"))
    return dest


def run(argv, cwd, timeout=_TIMEOUT, env=None):
    """Run ``argv`` in its own process group; the group is killed if it outlives ``timeout``."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env or script_env(cwd), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError("`{}` did not finish within {} s:\n{}".format(" ".join(argv), timeout, err[-3000:]))
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def script_env(root):
    """The user's environment, with ``python`` (the scripts' ``#!``) this interpreter and no cluster in it."""
    bindir = os.path.join(os.path.dirname(root.rstrip("/")), "bin")
    if not os.path.isdir(bindir):
        os.makedirs(bindir)
        for name in ("python", "python3"):   # a wrapper, not a link: a venv is found from the path it runs as
            with open(os.path.join(bindir, name), "w") as f:
                f.write("#!/bin/sh\nexec {} \"$@\"\n".format(shlex.quote(sys.executable)))
            os.chmod(os.path.join(bindir, name), 0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CONFIG", "PYTHONPATH", "CUDA_VISIBLE_DEVICES")}
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    return env


def write_svhn_dir(path):
    from scipy.io import savemat

    rng = np.random.RandomState(0)
    os.makedirs(path)
    for name, n in (("train_32x32.mat", 160), ("test_32x32.mat", 37)):   # train: more than a batch
        labels = rng.randint(1, 11, size=(n, 1)).astype(np.uint8)      # SVHN writes the digit 0 as 10
        images = rng.randint(0, 256, size=(32, 32, 3, n)).astype(np.uint8)
        savemat(os.path.join(path, name), {"X": images, "y": labels})


def write_ilsvrc_dir(path):
    import imagenet_utils as iu

    classes = iu.load_class_names()
    for label in (0, 7, 999):
        wnid = classes[label][0]
        for i in range(4):
            write_image(os.path.join(path, "train", wnid, "{}_{}.JPEG".format(wnid, i)), seed=label * 10 + i)
        for i in range(2):
            write_image(os.path.join(path, "val", wnid, "v{}.JPEG".format(i)), seed=5000 + label * 10 + i)


@pytest.fixture(scope="session")
def stock(tmp_path_factory):
    """The data and models the README names, generated once: ``{name: path}``.

    ``LOGDIR`` is a run of the quick start (at small size), copied away from where it was trained.
    """
    from dorefanet.checkpoints import save_npz

    base = str(tmp_path_factory.mktemp("readme-stock"))
    names = {}
    names["SVHN_DIR"] = os.path.join(base, "SVHN_DIR")
    write_svhn_dir(names["SVHN_DIR"])
    names["ILSVRC"] = os.path.join(base, "ILSVRC")
    write_ilsvrc_dir(names["ILSVRC"])
    rng = np.random.RandomState(2)
    train, test = [(rng.randint(0, 256, size=(n, 32, 32, 3)).astype(np.uint8), rng.randint(0, 10, size=n))
                   for n in (200, 30)]
    names["CIFAR_DIR"] = write_cifar10(os.path.join(base, "CIFAR_DIR"), "binary", train, test)
    for i, name in enumerate(("a.png", "b.png", "cat.jpg", "dog.png")):
        names[name] = os.path.join(base, name)
        write_image(names[name], seed=100 + i)
    from dorefanet.driver import make_model

    alexnet, resnet = load_script("alexnet-dorefa.py"), load_script("resnet-dorefa.py")
    names["AlexNet-1,2,6.npz"] = os.path.join(base, "AlexNet-1,2,6.npz")
    save_npz(random_weights(make_model(alexnet, (1, 2, 6), "channels_last", 64), seed=0), names["AlexNet-1,2,6.npz"])
    names["ResNet-18-14f.npz"] = os.path.join(base, "ResNet-18-14f.npz")
    save_npz(random_weights(make_model(resnet, (1, 4, 32), "channels_last"), seed=1), names["ResNet-18-14f.npz"])

    trained = copy_checkout(os.path.join(base, "quickstart", "checkout"))
    tokens = quick_start_command()
    result = run(tokens + small_flags(tokens), trained)
    assert result.returncode == 0, result.stderr[-3000:]
    names["LOGDIR"] = os.path.join(base, "LOGDIR")
    shutil.copytree(os.path.join(trained, "train_log", "svhn-dorefa-1,2,4"), names["LOGDIR"])
    names["LOGDIR_OR_NPZ"] = names["MODEL"] = names["LOGDIR"]
    names["quick start"] = (trained, result)
    return names


def workspace(tmp_path, stock):
    """A fresh scratch copy of the checkout with the README's names in it (links to :func:`stock`)."""
    root = copy_checkout(str(tmp_path / "checkout"))
    for name, path in stock.items():
        if isinstance(path, str):
            os.symlink(path, os.path.join(root, name))
    return root


def quick_start_command():
    """The training command of the README's quick start (the script part of its ``&&`` chain)."""
    with open(README) as f:
        text = f.read()
    section = text[text.index("## Quick start"):]
    commands = readme_commands(section)
    return next(tokens for _, kind, tokens in commands if kind == "shell" and tokens[0].startswith("./"))


# ------------------------------------------------------------------ running and checking one command
def _lines(text):
    return [line.rstrip() for line in text.splitlines()]


def check_output(tokens, result, root):
    """Exit status 0 and the key output line of ``tokens``' mode; returns the summary line when it trains."""
    where = "`{}`".format(" ".join(tokens))
    assert result.returncode == 0, "{} exited with {}:\n{}".format(where, result.returncode, result.stderr[-3000:])
    out, mode = _lines(result.stdout), mode_of(tokens)
    imagenet = os.path.basename(tokens[0]) in _IMAGENET
    if mode == "train":
        pattern = r"done: {} [0-9.]+ after \d+ epochs?; model in ".format(
            "top-1 validation error" if imagenet else "test error")
        done = [line for line in out if re.match(pattern, line)]
        assert done, "{} printed no summary line:\n{}".format(where, result.stdout[-2000:])
        return done[-1]
    if mode == "eval":
        pattern = r"^top-1 error: [0-9.]+$" if imagenet else r"^test error: [0-9.]+$"
        assert any(re.match(pattern, line) for line in out), "{}: no `{}` line in\n{}".format(
            where, pattern, result.stdout)
    elif mode == "run":
        images = tokens[tokens.index("--run") + 1:]
        images = images[:next((i for i, t in enumerate(images) if t.startswith("--")), len(images))]
        for image in images:
            assert any(line.startswith(image + ": ") or '"image": "{}"'.format(image) in line for line in out), \
                "{}: no result for {}:\n{}".format(where, image, result.stdout)
    elif mode in ("export", "export-packed", "export-onnx"):
        path = _value(tokens, "--" + mode)
        first = "exported" if mode == "export" else "wrote"
        assert any(line.startswith(first) and path in line for line in out), result.stdout
        assert os.path.isfile(os.path.join(root, path))
    elif mode == "summary":
        if "--json" in tokens:
            assert json.loads(result.stdout)["totals"]["bops"] > 0, result.stdout
        else:
            assert any(line.startswith("BOPs ") for line in out), result.stdout
    elif mode == "sweep":
        recipe = load_script(os.path.basename(tokens[0])).RECIPE
        directory = _value(tokens, "--logdir") or os.path.join("train_log", run_name(recipe) + "-sweep")
        assert any(line.startswith("| W,A,G |") for line in out), result.stdout
        for name in ("results.md", "results.json", "error_vs_bits.png"):
            assert os.path.isfile(os.path.join(root, directory, name)), name
    return None


def evaluate_command(summary):
    """The command a training run's summary line prints, as its tokens."""
    found = re.search(r"\(evaluate: (.*)\)$", summary)
    assert found, summary
    return shlex.split(found.group(1))


def run_readme_command(tokens, root):
    """Run one README script command in ``root`` (small), check it, and run the evaluate command it prints."""
    if "--cluster" in tokens:
        return _run_cluster_command(tokens, root)
    result = run(list(tokens) + small_flags(tokens), root)
    summary = check_output(tokens, result, root)
    if summary is not None:
        printed = evaluate_command(summary)
        check_output(printed, run(printed, root), root)


def _run_cluster_command(tokens, root):
    """The README's two local workers: ``P0``/``P1`` become free ports, then ``--task 0`` and ``--task 1`` run."""
    ports = free_local_ports(2)
    spec = _value(tokens, "--cluster").replace("P0", str(ports[0])).replace("P1", str(ports[1]))
    argv = list(tokens) + small_flags(tokens)
    argv[argv.index("--cluster") + 1] = spec
    second = list(argv)
    second[second.index("--task") + 1] = "1"
    other = subprocess.Popen(second, cwd=root, env=script_env(root), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        chief = run(argv, root)
        out, err = other.communicate(timeout=_TIMEOUT)
    finally:
        kill_group(other)
    assert other.returncode == 0, err[-3000:]
    summary = check_output(tokens, chief, root)
    printed = evaluate_command(summary)
    check_output(printed, run(printed, root), root)


def _producers(commands):
    """``{file: tokens}``: the README commands that write a file (``--export``, ``--export-packed``)."""
    made = {}
    for _, kind, tokens in commands:
        if kind == "shell":
            for flag in ("--export", "--export-packed"):
                if _value(tokens, flag):
                    made[_value(tokens, flag)] = tokens
    return made


def _needs(command, made):
    """The files of ``made`` that ``command`` reads."""
    _, kind, payload = command
    if kind == "python":
        return [name for name in made if '"{}"'.format(name) in payload or "'{}'".format(name) in payload]
    return [name for name in made if name in payload and _value(payload, "--load") == name]


def run_python_block(source, root):
    """A README Python block, in ``root``, with ``images`` a batch of the packed model's input shape."""
    from dorefanet.packed.format import read_packed

    files = re.findall(r"load_packed\(\"([^\"]+)\"\)", source)
    header, _ = read_packed(os.path.join(root, files[0]))
    shape = header["input"]
    prelude = "import numpy as np\nimages = np.random.RandomState(0).uniform(0, 255, (2, {}, {}, {})).astype({!r})\n".format(
        shape["height"], shape["width"], shape["channels"], shape["dtype"])
    check = "\nassert probs.shape == (2, {}), probs.shape\nprint('predicted', probs.shape)\n".format(header["classes"])
    result = run([sys.executable, "-c", prelude + textwrap.dedent(source) + check], root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "predicted" in result.stdout


COMMANDS = _all_commands()
RUN = [c for c in COMMANDS if classify(c) == "run"]


def _id(command):
    line, kind, payload = command
    text = payload if kind == "python" else " ".join(payload)
    return "L{}:{}".format(line, re.sub(r"\s+", " ", text)[:60])


@pytest.mark.parametrize("command", RUN, ids=[_id(c) for c in RUN])
def test_readme_command(command, tmp_path, stock):
    root = workspace(tmp_path, stock)
    made = _producers(COMMANDS)
    for name in _needs(command, made):
        run_readme_command(made[name], root)
    _, kind, payload = command
    if kind == "python":
        run_python_block(payload, root)
    else:
        run_readme_command(payload, root)


def test_every_readme_command_is_run_or_listed_with_a_reason():
    kinds = [classify(c) for c in COMMANDS]
    assert kinds.count("run") >= 20, "the README's commands were not found: {}".format(COMMANDS)
    listed = {" ".join(p) for _, kind, p in COMMANDS if kind == "shell" and classify((0, kind, p)) == "not run"}
    assert listed == set(NOT_RUN), "NOT_RUN lists commands the README no longer has: {}".format(
        set(NOT_RUN) - listed)
    with pytest.raises(AssertionError, match="neither run"):
        classify((1, "shell", ["make", "install"]))


def test_the_quick_start_and_its_printed_commands_work_on_the_relative_logdir(stock, tmp_path):
    """The quick start verbatim (small), then what its summary line prints, then every mode on that logdir."""
    root, result = stock["quick start"]
    summary = check_output(quick_start_command(), result, root)
    assert "model in train_log/svhn-dorefa-1,2,4 " in summary
    printed = evaluate_command(summary)
    assert printed[:3] == ["./svhn-digit-dorefa.py", "--load", "train_log/svhn-dorefa-1,2,4"]
    evaluated = run(printed, root)
    check_output(printed, evaluated, root)
    assert re.search(r"test error ([0-9.]+)", summary).group(1) == \
        re.search(r"^test error: ([0-9.]+)$", evaluated.stdout, re.M).group(1)

    image = "digit.png"
    write_image(os.path.join(root, image), seed=7)
    packed = str(tmp_path / "quick.packed.npz")
    steps = [["./svhn-digit-dorefa.py", "--load", "train_log/svhn-dorefa-1,2,4", "--run", image],
             ["./svhn-digit-dorefa.py", "--load", "train_log/svhn-dorefa-1,2,4", "--export",
              str(tmp_path / "quick.npz")],
             ["./svhn-digit-dorefa.py", "--load", "train_log/svhn-dorefa-1,2,4", "--export-packed", packed],
             ["./svhn-digit-dorefa.py", "--load", packed, "--engine", "packed", "--eval", "--synthetic"],
             ["./svhn-digit-dorefa.py", "--load", packed, "--engine", "packed", "--run", image]]
    for tokens in steps:
        check_output(tokens, run(tokens, root), root)
    # from inside train_log, the run's name alone
    inside = ["../svhn-digit-dorefa.py", "--load", "svhn-dorefa-1,2,4", "--eval", "--synthetic"]
    result = run(inside, os.path.join(root, "train_log"), env=script_env(root))
    assert result.returncode == 0 and re.search(r"^test error: ", result.stdout, re.M), result.stderr[-2000:]


def test_a_broken_readme_command_fails(stock, tmp_path):
    """The harness can fail: the quick start with a misspelt flag does."""
    root = workspace(tmp_path, stock)
    broken = [t.replace("--synthetic", "--synthetc") for t in quick_start_command()]
    with pytest.raises(AssertionError, match="exited with 2"):
        run_readme_command(broken, root)
    # and a README whose block holds an unknown command is caught by the listing
    with pytest.raises(AssertionError, match="neither run"):
        for command in readme_commands("text\n\n    ./svhn-digit-dorefa.py --synthetic\n    make all\n"):
            classify(command)
