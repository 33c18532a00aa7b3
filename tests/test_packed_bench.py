"""bench/packed_speed.py produces well-formed tables (a smoke test: no timing is asserted)."""
import os
import subprocess
import sys

from conftest import ROOT


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
