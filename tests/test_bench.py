"""bench/train_speed.py produces a well-formed table (a smoke test: no timing is asserted)."""
import os
import subprocess
import sys

from conftest import ROOT


def test_train_speed_prints_a_markdown_table():
    cmd = [sys.executable, os.path.join(ROOT, "bench", "train_speed.py"), "--models", "svhn",
           "--bits", "32,32,32", "1,2,4", "--batch", "16", "--steps", "1", "--repeats", "1", "--workers", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("machine: ") and "cores" in lines[0] and "TensorFlow" in lines[0]
    assert lines[1].startswith("load average")
    rows = [line for line in lines if line.startswith("| svhn |")]
    assert [row.split("|")[2].strip() for row in rows] == ["32,32,32", "1,2,4"]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 9
        assert all(float(c) > 0 for c in (cells[3], cells[6], cells[7], cells[8]))
        assert cells[4].endswith("x") and cells[5].endswith("%")
    # the SVHN net's arithmetic, counted from the graph: 83.5 MFLOP forward, 241 MFLOP per training image
    bound = [line for line in lines if line.startswith("svhn: ")]
    assert len(bound) == 1 and "0.0835 GFLOP per image forward, 0.2411 per training image" in bound[0]
    assert "at 200 GFLOP/s the bound is 830 training images/s" in bound[0]
    pipeline = [line for line in lines if line.startswith("| svhn dataflow")]
    assert len(pipeline) == 1 and pipeline[0].count("|") == 6
