"""The engine's per-element work in single passes (numba): accumulators to floats, codes, max pooling.

numpy would take several full passes (and float64 temporaries) over every
feature map for these; at batch 128 that cost more than the bit-plane
convolutions themselves.
"""
import numpy as np
from numba import njit

__all__ = ["affine_accumulators", "quantize", "maxpool"]

_JIT = dict(nogil=True, cache=True)


@njit(**_JIT)
def _affine_accumulators(acc, sums, a, b, c, out):
    rows, channels = acc.shape
    for r in range(rows):
        s = sums[r]
        for ch in range(channels):
            out[r, ch] = np.float32(acc[r, ch] * a[ch] + s * b[ch] + c[ch])


def affine_accumulators(acc, sums, a, b, c):
    """``float32(acc * a + sums * b + c)`` per channel, in float64: ``acc [..., C]`` int, ``sums [...]`` int."""
    shape = acc.shape
    acc2 = np.ascontiguousarray(acc).reshape(-1, shape[-1])
    out = np.empty(acc2.shape, np.float32)
    _affine_accumulators(acc2, np.ascontiguousarray(sums).reshape(-1).astype(np.int64, copy=False),
                         a.astype(np.float64), b.astype(np.float64), c.astype(np.float64), out)
    return out.reshape(shape)


@njit(**_JIT)
def _quantize(x, n, out):
    zero, one = np.float32(0), np.float32(1)
    for i in range(x.shape[0]):
        v = x[i]
        v = zero if v < zero else (one if v > one else v)
        out[i] = np.rint(v * n)


def quantize(x, n, dtype=np.uint8):
    """Codes ``round(clip(x, 0, 1) * n)`` (float32 product, round half to even), as the graph's ``fa``."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.empty(flat.shape, dtype)
    _quantize(flat, np.float32(n), out)
    return out.reshape(x.shape)


@njit(**_JIT)
def _maxpool(x, size, stride, top, left, out):
    batch, height, width, channels = x.shape
    _, out_h, out_w, _ = out.shape
    for task in range(batch * out_h):
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
    _maxpool(np.ascontiguousarray(x), size, stride, top, left, out)
    return out
