"""tf_setup's process settings that are not about TensorFlow's API."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

# Allocates, fills and frees 48 MB with the C library's malloc 6 times and prints the page faults of the last 5 rounds.  48 MB is
# above the largest mmap threshold glibc's malloc sets by itself (32 MB), so with its defaults every round
# maps fresh, zero-filled pages (about 12,000 faults); with tf_setup's thresholds the rounds reuse heap memory.
_PROBE = """
import ctypes, resource, sys
sys.path.insert(0, {root!r})
from dorefanet import tf_setup
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def one_round():
    p = libc.malloc(48 << 20)
    ctypes.memset(p, 1, 48 << 20)
    libc.free(p)
one_round()
start = faults()
for _ in range(5):
    one_round()
print(faults() - start)
"""


def _faults(env):
    done = subprocess.run([sys.executable, "-c", _PROBE.format(root=ROOT)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings: Linux only")
def test_freed_heap_memory_is_reused_not_faulted_in_again():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    tuned = _faults(env)
    # a MALLOC_ variable of the user's own (here one that changes nothing relevant) leaves glibc's defaults
    default = _faults(dict(env, MALLOC_ARENA_TEST="1"))
    assert default > 5 * 10000          # glibc's defaults: each round's 12,288 pages fault in again
    assert tuned < 1000
