"""bench/train_speed.py and bench/determinism_cost.py produce well-formed tables (smoke tests: no timing is asserted)."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow   # runs the benchmark script in a subprocess


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
        assert len(cells) == 10
        assert all(float(c) > 0 for c in (cells[3], cells[6], cells[7], cells[8])) and float(cells[9]) >= 0
        assert cells[4].endswith("x") and cells[5].endswith("%")
    # the SVHN net's arithmetic, counted from the graph: 83.5 MFLOP forward, 241 MFLOP per training image
    bound = [line for line in lines if line.startswith("svhn: ")]
    assert len(bound) == 1 and "0.0835 GFLOP per image forward, 0.2411 per training image" in bound[0]
    assert "at 200 GFLOP/s the bound is 830 training images/s" in bound[0]
    pipeline = [line for line in lines if line.startswith("| svhn dataflow")]
    assert len(pipeline) == 1 and pipeline[0].count("|") == 6


def test_paired_mode_prints_ratios_against_32_bits_from_one_process():
    cmd = [sys.executable, os.path.join(ROOT, "bench", "train_speed.py"), "--models", "svhn", "--paired",
           "--bits", "1,2,4", "32,32,32", "--batch", "8", "--steps", "1", "--rounds", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in done.stdout.splitlines()
            if line.startswith("| svhn |")]
    # the baseline first, whatever the order given
    assert [row[1] for row in rows] == ["32,32,32", "1,2,4"]
    assert rows[0][4] == "1.00x" and rows[0][5] == "1.00-1.00"
    assert float(rows[1][3]) > 0 and rows[1][4].endswith("x")
    q1, q3 = (float(v) for v in rows[1][5].split("-"))
    assert 0 < q1 <= float(rows[1][4][:-1]) <= q3
    assert "2 rounds x 1 timed steps per setting" in done.stdout


def test_paired_mode_needs_the_baseline():
    cmd = [sys.executable, os.path.join(ROOT, "bench", "train_speed.py"), "--models", "svhn", "--paired",
           "--bits", "1,2,4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--bits must include 32,32,32" in done.stderr.splitlines()[-1]


def test_determinism_cost_prints_each_variant_against_the_arrival_order():
    cmd = [sys.executable, os.path.join(ROOT, "bench", "determinism_cost.py"), "--models", "cifar", "--steps", "2",
           "--batch", "8", "--rounds", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| cifar10-resnet-dorefa.py 2,2,32 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["arrival", "seeded", "seeded + --deterministic-ops"]
    assert all(float(row.split("|")[3]) > 0 for row in rows) and rows[0].split("|")[4].strip() == "1.000"
