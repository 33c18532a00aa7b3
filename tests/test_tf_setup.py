"""tf_setup's process settings that are not about TensorFlow's API."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from dorefanet import tf_setup


# ------------------------------------------------------------------ TensorFlow's start-up lines and TF_CPP_MIN_LOG_LEVEL
def _env(**overrides):
    """The user's environment with each ``name=value`` override (``None`` removes the variable)."""
    env = dict(os.environ)
    for name, value in overrides.items():
        env.pop(name, None)
        if value is not None:
            env[name] = value
    return env


def _is_tensorflow_log_line(line):
    """A line TensorFlow's C++ logging prints: ``I0000 00:00:...``, absl's banner, cpu_feature_guard's 2nd line."""
    return (line[:1] in "IWEF" and line[1:5].isdigit() and line[5:6] == " "
            or line.startswith("WARNING: All log messages before absl::InitializeLog() is called")
            or line.startswith("To enable the following instructions:"))


@pytest.mark.slow
@pytest.mark.parametrize("level", [None, "0", "1", "2", "3"])
def test_a_bad_input_is_one_error_line_at_every_tf_log_level(tmp_path, level):
    """Whatever TF_CPP_MIN_LOG_LEVEL the shell sets, a bad --load ends in exactly one ``error:`` line.

    The script lists the devices before loading, which is where TensorFlow prints its ERROR line
    "failed call to cuInit: ... CUDA error: ..." on a machine without a CUDA driver; level 2 shows ERROR
    lines.  Unset, 1, 2 and 3: stderr is that one line and nothing else.  0 shows everything: TensorFlow's
    own log lines are there too (a GPU-less machine has at least its INFO notices), but nothing else.
    """
    missing = str(tmp_path / "missing.npz")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "svhn-digit-dorefa.py"), "--dorefa", "1,2,4",
                           "--load", missing, "--run", str(tmp_path / "x.png")],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                          env=_env(TF_CPP_MIN_LOG_LEVEL=level))
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr
    errors = [line for line in lines if "error:" in line.lower() and not _is_tensorflow_log_line(line)]
    assert errors == ["error: {}: file not found".format(missing)], done.stderr
    if level == "0":
        others = [line for line in lines if line not in errors]
        assert others and all(_is_tensorflow_log_line(line) for line in others), done.stderr
    else:
        assert lines == errors, done.stderr
    assert os.listdir(str(tmp_path)) == []


# What TensorFlow 2.21 prints on fd 2 while it loads and lists its devices on a machine without a CUDA driver
_START_UP = (
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    b"I0000 00:00:1796282450.232304    3363 port.cc:153] oneDNN custom operations are on. You may see ...\n"
    b"I0000 00:00:1796282450.232657    3363 cudart_stub.cc:31] Could not find cuda drivers on your machine, "
    b"GPU will not be used.\n"
    b"I0000 00:00:1796282450.291844    3363 cpu_feature_guard.cc:227] This TensorFlow binary is optimized ...\n"
    b"To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow ...\n"
    b"E0000 00:00:1796282455.550713    3363 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: "
    b"Failed call to cuInit: UNKNOWN ERROR (303)\n")
_OTHERS = (
    b"W0000 00:00:1796282455.550714    3363 some.cc:1] a warning\n"
    b"E0000 00:00:1796282455.550715    3363 some.cc:2] a real error\n"
    b"F0000 00:00:1796282455.550716    3363 some.cc:3] a fatal error\n"
    b"/somewhere/module.py:12: UserWarning: printed by Python\n"
    b"To enable the following instructions: (not after a dropped notice: kept)\n"
    b"a last line without a newline")


@pytest.mark.parametrize("level, no_cuda_driver, kept", [
    (1, True, ["a warning", "a real error", "a fatal error", "UserWarning", "(not after", "a last line"]),
    (2, True, ["a real error", "a fatal error", "UserWarning", "(not after", "a last line"]),
    (2, False, ["failed call to cuInit", "a real error", "a fatal error", "UserWarning", "(not after",
                "a last line"]),
    (3, True, ["a fatal error", "UserWarning", "(not after", "a last line"]),
])
def test_start_up_filter_drops_only_known_notices_and_lines_below_the_level(level, no_cuda_driver, kept):
    shown = tf_setup._start_up_lines_to_show(_START_UP + _OTHERS, level, no_cuda_driver).decode()
    assert [next(k for k in kept if k in line) for line in shown.splitlines()] == kept, shown
    assert shown.endswith("a last line without a newline")  # unchanged, no newline added


@pytest.mark.parametrize("value, level", [(None, 3), ("0", None), ("1", 1), ("2", 2), ("3", 3), ("4", 3),
                                          (" 2 ", 2), ("", None), ("debug", None)])
def test_start_up_lines_follow_tf_cpp_min_log_level_and_0_shows_them_all(monkeypatch, value, level):
    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    if value is not None:
        monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", value)
    assert tf_setup._start_up_log_level() == level


# Writes lines to fd 2 just before TensorFlow is imported (inside tf_setup's capture), then, with "raise",
# makes that import fail.
_LOUD_IMPORT = """
import importlib.abc, os, sys
class Loud(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow":
            sys.meta_path.remove(self)
            os.write(2, b"E0101 00:00:00.000000    1 some.cc:1] a real error\\nsomething a library printed\\n")
            if sys.argv[1] == "raise":
                raise ImportError("tensorflow is broken")
        return None
sys.meta_path.insert(0, Loud())
from dorefanet import tf_setup
print("imported", file=sys.stderr)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["import", "raise"])
def test_unknown_output_and_exceptions_while_importing_tensorflow_still_surface(tmp_path, mode):
    done = subprocess.run([sys.executable, "-c", _LOUD_IMPORT, mode], capture_output=True,
                          text=True, timeout=300, cwd=str(tmp_path), env=_env(TF_CPP_MIN_LOG_LEVEL="2"))
    lines = done.stderr.splitlines()
    assert lines[:2] == ["E0101 00:00:00.000000    1 some.cc:1] a real error", "something a library printed"], \
        done.stderr
    if mode == "raise":
        assert done.returncode == 1 and lines[-1] == "ImportError: tensorflow is broken", done.stderr
    else:
        assert done.returncode == 0 and lines[2:] == ["imported"], done.stderr
