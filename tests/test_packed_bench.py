"""bench/packed_speed.py produces well-formed tables (a smoke test: no timing is asserted)."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow   # runs the benchmark script in a subprocess


def test_packed_speed_prints_size_and_speed_tables():
    cmd = [sys.executable, os.path.join(ROOT, "bench", "packed_speed.py"), "--models", "svhn", "--bits", "1,2,4",
           "--batches", "1", "2", "--repeats", "1", "--rounds", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    # stdout carries only the tables and the machine line (graph-building logs go to stderr)
    assert all(line.startswith(("|", "machine: ")) or not line for line in lines), lines
    size = [line for line in lines if line.startswith("| svhn | 1,2,4 |") and line.count("|") == 6]
    assert len(size) == 1 and float(size[0].split("|")[5].strip().rstrip("x")) > 20
    speed = [line.split("|") for line in lines if line.startswith("| svhn | 1,2,4 |") and line.count("|") == 8]
    assert [row[3].strip() for row in speed] == ["1", "2"]
    for row in speed:
        assert float(row[4]) > 0 and float(row[5]) > 0 and row[6].strip().endswith("x")
        assert row[7].strip().endswith("%")
    assert lines[-1].startswith("machine: ") and "load average" in lines[-1]


def test_packed_speed_profile_prints_every_op_and_the_stage_summary():
    cmd = [sys.executable, os.path.join(ROOT, "bench", "packed_speed.py"), "--profile", "--models", "svhn",
           "--bits", "1,2,4", "--batches", "2", "--repeats", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("#### svhn 1,2,4, batch 2: ") for line in lines)
    ops = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.count("|") == 11
           and line.split("|")[1].strip().isdigit()]
    # conv0 (float, its input's normalisation folded into its weights) with its fused pooling and quantizing,
    # then the six popcount convolutions
    assert ops[0][1] == "conv+maxpool+activate" and ops[0][2] == "conv0" and ops[0][3] == "float"
    assert not any(row[1] == "normalize" for row in ops)
    popcount = [row for row in ops if row[3] == "popcount"]
    assert len(popcount) == 6 and all(row[4] == "1x2" for row in popcount)
    for row in popcount:
        assert float(row[5]) > 0 and row[6].endswith("%") and "popcount" in row[7] and row[9].endswith("%")
    summary = [line for line in lines if line.startswith("| quantized conv / fc |")]
    assert len(summary) == 1
    assert lines[-1].startswith("machine: ")


def test_packed_speed_eval_times_both_engines_on_cifar_records():
    """The --eval timing of ResNet-20: generated CIFAR-10 binary records, a --layer-bits setting passed to the
    TensorFlow command too, and both commands print the same test error."""
    cmd = [sys.executable, os.path.join(ROOT, "bench", "packed_speed.py"), "--models", "cifar", "--bits",
           "2,2,32;stage3blk.*=4,4,32", "--eval-images", "20", "--eval-batch", "8", "--rounds", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in done.stdout.splitlines()
            if line.startswith("| cifar |")]
    assert len(rows) == 1 and rows[0][1:4] == ["2,2,32;stage3blk.*=4,4,32", "20", "8"], rows
    assert float(rows[0][4]) > 0 and float(rows[0][5]) > 0 and rows[0][7] == "yes", rows
    svhn = subprocess.run(cmd[:2] + ["--models", "svhn", "--eval-images", "4"], capture_output=True, text=True,
                          timeout=60)
    assert svhn.returncode == 2 and "needs one of alexnet, cifar, resnet" in svhn.stderr


def test_machine_peaks_prints_one_row_per_kernel():
    cmd = [sys.executable, os.path.join(ROOT, "bench", "machine_peaks.py"), "--gemm-size", "256", "--seconds",
           "0.02", "--rounds", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines
            if line.startswith("| ") and not line.startswith("| kernel")]
    with open("/proc/cpuinfo") as f:
        vnni = " avx512_vnni" in f.read()
    assert [row[0].split(" (")[0] for row in rows] == ["fp32 GEMM", "popcount tile"] + (["int8 VNNI"] if vnni else [])
    for row in rows:
        assert int(row[1]) >= 1 and float(row[2]) > 0
    assert lines[-1].startswith("machine: ") and "load average" in lines[-1]
    bad = subprocess.run(cmd[:2] + ["--rounds", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--rounds" in bad.stderr.splitlines()[-1]
