"""The engine's per-element work in single passes (numba): accumulators to floats, codes, max pooling.

numpy would take several full passes (and float64 temporaries) over every
feature map for these; at batch 128 that cost more than the bit-plane
convolutions themselves.  Each kernel is a serial ``nogil`` function over a
range of rows; large maps are split over ``numba.get_num_threads()`` Python
threads (small ones stay on the calling thread, where a thread hand-off would
cost more than the work).
"""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import get_num_threads, njit

__all__ = ["affine_accumulators", "quantize", "maxpool"]

_JIT = dict(nogil=True, cache=True)
#: Elements below which a kernel runs on the calling thread only.
_PARALLEL_MIN_ELEMENTS = 1 << 16
_pool = None
_pool_lock = threading.Lock()


def _split_rows(kernel, rows, elements, *args):
    """``kernel(r0, r1, *args)`` over ``range(rows)``, split over the threads when the work is large."""
    threads = min(get_num_threads(), rows) if elements >= _PARALLEL_MIN_ELEMENTS else 1
    if threads <= 1:
        kernel(0, rows, *args)
        return
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < threads - 1:
            _pool = ThreadPoolExecutor(max_workers=threads - 1, thread_name_prefix="packed-elementwise")
        pool = _pool
    bounds = [rows * i // threads for i in range(threads + 1)]
    futures = [pool.submit(kernel, bounds[i], bounds[i + 1], *args) for i in range(1, threads)]
    kernel(bounds[0], bounds[1], *args)
    for future in futures:
        future.result()


@njit(**_JIT)
def _affine_accumulators(r0, r1, acc, sums, a, b, c, out):
    channels = acc.shape[1]
    for r in range(r0, r1):
        s = np.float64(sums[r])
        for ch in range(channels):
            out[r, ch] = np.float32(np.float64(acc[r, ch]) * a[ch] + (s * b[ch] + c[ch]))


def affine_accumulators(acc, sums, a, b, c, out=None):
    """``float32(acc * a + (sums * b + c))`` per channel, in float64.

    ``acc [..., C]`` and ``sums [...]`` are integers; ``out`` (optional) is a
    float32 ``[rows, C]`` array or strided view to write into (e.g. one group's
    channels of a layer's output).  Returns the ``[..., C]`` result.
    """
    shape = acc.shape
    acc2 = np.ascontiguousarray(acc).reshape(-1, shape[-1])
    target = np.empty(acc2.shape, np.float32) if out is None else out
    _split_rows(_affine_accumulators, acc2.shape[0], acc2.size, acc2,
                np.ascontiguousarray(sums).reshape(-1).astype(np.int64, copy=False),
                a.astype(np.float64), b.astype(np.float64), c.astype(np.float64), target)
    return target.reshape(shape) if out is None else out


@njit(**_JIT)
def _quantize(r0, r1, x, n, out):
    zero, one = np.float32(0), np.float32(1)
    for i in range(r0, r1):
        v = x[i]
        v = zero if v < zero else (one if v > one else v)
        out[i] = np.rint(v * n)


def quantize(x, n, dtype=np.uint8):
    """Codes ``round(clip(x, 0, 1) * n)`` (float32 product, round half to even), as the graph's ``fa``."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.empty(flat.shape, dtype)
    _split_rows(_quantize, flat.size, flat.size, flat, np.float32(n), out)
    return out.reshape(x.shape)


@njit(**_JIT)
def _maxpool(t0, t1, x, size, stride, top, left, out):
    _, height, width, channels = x.shape
    _, out_h, out_w, _ = out.shape
    for task in range(t0, t1):
        bi = task // out_h
        oy = task % out_h
        for ox in range(out_w):
            first = True
            for dy in range(size):
                y = oy * stride + dy - top
                if y < 0 or y >= height:
                    continue
                for dx in range(size):
                    xx = ox * stride + dx - left
                    if xx < 0 or xx >= width:
                        continue
                    if first:
                        for ch in range(channels):
                            out[bi, oy, ox, ch] = x[bi, y, xx, ch]
                        first = False
                    else:
                        for ch in range(channels):
                            v = x[bi, y, xx, ch]
                            if v > out[bi, oy, ox, ch]:
                                out[bi, oy, ox, ch] = v


def maxpool(x, size, stride, pads):
    """NHWC max pooling; padded positions never win (TensorFlow's SAME semantics)."""
    top, bottom, left, right = pads
    batch, height, width, channels = x.shape
    out_h = (height + top + bottom - size) // stride + 1
    out_w = (width + left + right - size) // stride + 1
    out = np.empty((batch, out_h, out_w, channels), x.dtype)
    _split_rows(_maxpool, batch * out_h, x.size, np.ascontiguousarray(x), size, stride, top, left, out)
    return out
