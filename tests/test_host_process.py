"""A library leaves its host process alone: importing the package, or loading and running a packed model,
changes neither glibc's malloc settings nor the process's huge-page mappings; the scripts' explicit
setting (dorefanet.memory) does change them, so the probes below can tell."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, load_script, random_weights
from dorefanet.driver import make_model

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc and /proc: Linux only")

# ``mmapped``: whether a 64 MB malloc is served by a mapping of its own (glibc's default above its 32 MB largest
# dynamic mmap threshold), read from mallinfo2's hblkhd; ``hugepage_maps``: mappings advised MADV_HUGEPAGE.
_PROBE = """
import ctypes, json, sys
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def state():
    before = libc.mallinfo2().hblkhd
    p = libc.malloc(64 << 20)
    mmapped = libc.mallinfo2().hblkhd - before >= 64 << 20
    libc.free(p)
    with open("/proc/self/smaps") as f:
        huge = sum(1 for line in f if line.startswith("VmFlags:") and " hg" in line)
    return {"mmapped": mmapped, "hugepage_maps": huge}
states = {"start": state()}
exec(sys.argv[1])
states["library"] = state()
from dorefanet.memory import keep_freed_memory
took = keep_freed_memory()
states["tuned"] = dict(state(), took=took)
print(json.dumps(states))
"""


def _states(code, env=None):
    env = {k: v for k, v in (env or os.environ).items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = ROOT
    env["NUMPY_MADVISE_HUGEPAGE"] = "0"     # numpy's own advice on its large arrays would blur the count
    done = subprocess.run([sys.executable, "-c", _PROBE, code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def alexnet_packed(tmp_path_factory):
    """An AlexNet 1,2,6 packed file at 64 px: its float fct (16 MB) is what huge pages were for."""
    from dorefanet.checkpoints import save_npz
    from dorefanet.packed.export import export_packed

    model = make_model(load_script("alexnet-dorefa.py"), (1, 2, 6), "channels_last", 64)
    d = tmp_path_factory.mktemp("host")
    save_npz(random_weights(model, seed=3), str(d / "w.npz"))
    export_packed(model, str(d / "w.npz"), str(d / "a.packed.npz"))
    return str(d / "a.packed.npz")


@pytest.mark.slow
def test_loading_and_running_a_packed_model_leaves_malloc_and_mappings_alone(alexnet_packed):
    code = ("import numpy as np\nfrom dorefanet.packed import load_packed\n"
            "m = load_packed({!r})\np = m.predict(np.zeros((2, 64, 64, 3), np.uint8))\n"
            "assert p.shape == (2, 1000)\n".format(alexnet_packed))
    states = _states(code)
    assert states["start"]["mmapped"]
    assert states["library"] == states["start"]


@pytest.mark.slow
def test_huge_pages_are_the_callers_choice(alexnet_packed):
    code = ("import numpy as np\nfrom dorefanet.packed import load_packed\n"
            "m = load_packed({!r}, huge_pages=True)\nm.predict(np.zeros((1, 64, 64, 3), np.uint8))\n"
            .format(alexnet_packed))
    states = _states(code)
    assert states["library"]["hugepage_maps"] > states["start"]["hugepage_maps"]   # the probe sees them


@pytest.mark.slow
def test_importing_the_training_modules_leaves_malloc_alone():
    code = "import dorefa, imagenet_utils\nfrom dorefanet import checkpoints, training, driver\n"
    states = _states(code)
    assert states["library"] == states["start"] and states["start"]["mmapped"]


def test_the_scripts_setting_is_seen_by_the_probe_and_respects_the_users_malloc_variables():
    states = _states("pass", env=None)
    assert states["tuned"]["took"] and states["start"]["mmapped"] and not states["tuned"]["mmapped"]
    env = dict(os.environ)
    code = "import os\nos.environ['MALLOC_ARENA_TEST'] = '1'\n"     # a variable of the user's own
    user = _states(code, env)
    assert user["tuned"] == dict(user["library"], took=False)
