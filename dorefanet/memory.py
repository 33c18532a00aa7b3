"""The command-line tools' allocator setting: glibc keeps freed memory for reuse.

Nothing in the package calls this on import or when a model is loaded: a process
that imports the library keeps its own allocator settings.  The scripts call
:func:`keep_freed_memory` for training and for the packed engine, and ``bench/``
does for what it measures, because there it was measured to pay off:

* training: with glibc's defaults the quantizers' temporaries (up to 6.5 MB each)
  freed the top of a thread's arena, about 400 to 720 page faults per 8,8,8 SVHN
  step (2.8 us each); with these thresholds none;
* the packed engine: every map above the mmap threshold was a fresh mapping
  faulted in on every call (about 10,000 faults per AlexNet call at batch 128);
  kept, later calls reuse the first call's pages.
"""
import functools
import os
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_freed_memory():
    """Have glibc's malloc reuse freed blocks of any size (mmap threshold 1 GiB, up to 2 GiB kept).

    Once per process; Linux with glibc only, and not when the user set glibc's
    ``MALLOC_*`` variables or ``GLIBC_TUNABLES`` (their choice stands).  Returns
    whether both settings took.
    """
    import platform

    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if "GLIBC_TUNABLES" in os.environ or any(name.startswith("MALLOC_") for name in os.environ):
        return False
    import ctypes

    mallopt = ctypes.CDLL(None).mallopt
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 31))
