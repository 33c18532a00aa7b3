"""The engine's per-element work in single passes (numba): input normalisation, accumulators to
floats or codes, quantizing, max pooling.

numpy would take several full passes (and float64 temporaries) over every
feature map for these; at batch 128 that cost more than the bit-plane
convolutions themselves.  Each kernel is a serial ``nogil`` function over a
range of rows; large maps are split over ``numba.get_num_threads()`` threads
(:mod:`.threads`) (small ones stay on the calling thread, where a thread hand-off would
cost more than the work).
"""
import numpy as np
from numba import get_num_threads, njit

from .threads import run_split

__all__ = ["affine_accumulators", "quantize", "affine_quantize", "maxpool", "normalize"]

_JIT = dict(nogil=True, cache=True)
#: Single-thread cost of each kernel, ns per element (measured on the 2-core AMD EPYC at 200K-3M elements).
_NS_PER_ELEMENT = {"quantize": 0.1, "affine_quantize": 0.25, "affine_accumulators": 0.4, "normalize": 0.25,
                   "maxpool": 0.75}
#: Work (ns on one thread) from which a kernel is split over the threads: handing rows to a ThreadPoolExecutor
#: cost 50-100 us, so smaller splits lost (a batch-1 ResNet-18 map of 200K values: quantize 77 us on two threads,
#: 20 us on one; batch norm + quantize 96 against 48 us); with the spinning team of .threads, a threshold of 40 us
#: gained nothing at batch 1.
_SPLIT_NS = 250e3


def _split_rows(kernel, rows, elements, *args):
    """``kernel(r0, r1, *args)`` over ``range(rows)``, split over the threads when the work is large."""
    # the kernel's name without its leading underscore and "_codes" variant suffix keys its cost
    work = elements * _NS_PER_ELEMENT[kernel.__name__.lstrip("_").replace("_codes", "")]
    threads = min(get_num_threads(), rows) if work >= _SPLIT_NS else 1
    run_split(kernel, rows, threads, *args)


@njit(inline="always", **_JIT)
def affine_row(acc, s, a, b, c, out):
    """One row's ``out = float32(acc * a + (s * b + c))`` in float64 (1-D slices; LLVM vectorises the loop,
    which it does not where a loop indexes a flat array at computed offsets)."""
    for i in range(acc.size):
        out[i] = np.float32(np.float64(acc[i]) * a[i] + (s * b[i] + c[i]))


@njit(inline="always", **_JIT)
def affine_row_codes(acc, s, a, b, c, n, out):
    """The uint8 codes ``rint(clip(y, 0, 1) * n)`` of :func:`affine_row`'s float32 ``y``."""
    zero, one = np.float32(0), np.float32(1)
    for i in range(acc.size):
        y = np.float32(np.float64(acc[i]) * a[i] + (s * b[i] + c[i]))
        out[i] = np.rint(min(max(y, zero), one) * n)


@njit(**_JIT)
def _affine_accumulators(r0, r1, acc, sums, a, b, c, out):
    for r in range(r0, r1):
        affine_row(acc[r], np.float64(sums[r]), a, b, c, out[r])


@njit(**_JIT)
def _affine_accumulators_codes(r0, r1, acc, sums, a, b, c, n, out):
    for r in range(r0, r1):
        affine_row_codes(acc[r], np.float64(sums[r]), a, b, c, n, out[r])


def affine_accumulators(acc, sums, a, b, c, out=None, levels=None):
    """``float32(acc * a + (sums * b + c))`` per channel, in float64.

    ``acc [..., C]`` and ``sums [...]`` are integers; ``out`` (optional) is a
    ``[rows, C]`` array or strided view to write into (e.g. one group's
    channels of a layer's output).  With ``levels`` = n, the result is
    quantized at once to uint8 codes ``round(clip(y, 0, 1) * n)`` (exactly
    :func:`quantize` of the float32 result, without storing it).  Returns the
    ``[..., C]`` result.
    """
    shape = acc.shape
    acc2 = np.ascontiguousarray(acc).reshape(-1, shape[-1])
    dtype = np.float32 if levels is None else np.uint8
    target = np.empty(acc2.shape, dtype) if out is None else out
    args = (acc2, np.ascontiguousarray(sums).reshape(-1).astype(np.int64, copy=False),
            a.astype(np.float64), b.astype(np.float64), c.astype(np.float64))
    if levels is None:
        _split_rows(_affine_accumulators, acc2.shape[0], acc2.size, *args, target)
    else:
        _split_rows(_affine_accumulators_codes, acc2.shape[0], acc2.size, *args, np.float32(levels), target)
    return target.reshape(shape) if out is None else out


@njit(**_JIT)
def _quantize(r0, r1, x, n, out):
    # loops over slices, not over range(r0, r1): LLVM vectorises only the former (10-20x faster here)
    xs, codes = x[r0:r1], out[r0:r1]
    zero, one = np.float32(0), np.float32(1)
    for i in range(xs.size):
        codes[i] = np.rint(min(max(xs[i], zero), one) * n)


def quantize(x, n, dtype=np.uint8):
    """Codes ``round(clip(x, 0, 1) * n)`` (float32 product, round half to even), as the graph's ``fa``."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    out = np.empty(flat.shape, dtype)
    _split_rows(_quantize, flat.size, flat.size, flat, np.float32(n), out)
    return out.reshape(x.shape)


def _along_row(values, width, channels):
    """Per-channel ``values`` (or one value for all) repeated for ``width`` pixels: float32 ``[width * channels]``.
    (``np.tile`` took 6 us, a batch-1 SVHN net's normalisation 29 us in all for 3 us of arithmetic.)"""
    row = np.empty((width, channels), np.float32)
    row[:] = values
    return row.reshape(-1)


@njit(**_JIT)
def _affine_quantize(r0, r1, x, scale, shift, n, out):
    xs, codes = x[r0:r1], out[r0:r1]
    zero, one = np.float32(0), np.float32(1)
    for r in range(xs.shape[0]):
        row, target = xs[r], codes[r]
        for j in range(row.size):
            # two float32 roundings, as numpy's x * scale + shift (no fused multiply-add)
            y = row[j] * scale[j] + shift[j]
            target[j] = np.rint(min(max(y, zero), one) * n)


def affine_quantize(x, scale, shift, n):
    """:func:`quantize` of ``x * scale + shift`` (float32, per channel of NHWC ``x``; None: 1 and 0) in one pass:
    a batch norm and the activation quantizing after it, without the float map in between."""
    x = np.ascontiguousarray(x, np.float32)
    channels = x.shape[-1]
    scale = np.ones(channels, np.float32) if scale is None else np.asarray(scale, np.float32)
    shift = np.zeros(channels, np.float32) if shift is None else np.asarray(shift, np.float32)
    # x * 1 + 0 is x: a missing scale or shift changes nothing
    width = x.shape[-2] if x.ndim == 4 else 1
    rows = x.reshape(-1, width * channels)
    out = np.empty(rows.shape, np.uint8)
    _split_rows(_affine_quantize, rows.shape[0], rows.size, rows, _along_row(scale, width, channels),
                _along_row(shift, width, channels), np.float32(n), out)
    return out.reshape(x.shape)


@njit(**_JIT)
def _maxpool(t0, t1, x, size, stride, top, left, n, out):
    """Rows ``t0 .. t1`` (image, oy) of max pooling; ``n`` > 0 quantizes the maxima to codes at once.

    Each window row is one contiguous slice of ``width * channels`` values, read in place.
    """
    _, height, width, channels = x.shape
    _, out_h, out_w, _ = out.shape
    zero, one = np.float32(0), np.float32(1)
    best = np.empty(out_w * channels, x.dtype)
    for task in range(t0, t1):
        image, oy = task // out_h, task % out_h
        first_row = True
        for dy in range(size):
            y = oy * stride + dy - top
            if y < 0 or y >= height:
                continue
            row = x[image, y].reshape(-1)
            for ox in range(out_w):
                target = best[ox * channels:(ox + 1) * channels]
                started = not first_row
                for dx in range(size):
                    xx = ox * stride + dx - left
                    if xx < 0 or xx >= width:
                        continue
                    pixel = row[xx * channels:(xx + 1) * channels]
                    if started:
                        for ch in range(channels):
                            target[ch] = max(target[ch], pixel[ch])
                    else:
                        target[:] = pixel
                        started = True
            first_row = False
        result = out[image, oy].reshape(-1)
        if n > 0:
            for i in range(result.size):
                result[i] = np.rint(min(max(np.float32(best[i]), zero), one) * n)
        else:
            result[:] = best


def maxpool(x, size, stride, pads, levels=None):
    """NHWC max pooling; padded positions never win (TensorFlow's SAME semantics).

    With ``levels`` = n (float32 ``x``), the maxima are quantized to uint8 codes
    ``round(clip(m, 0, 1) * n)``: the same as :func:`quantize` after pooling,
    without the float map in between.
    """
    top, bottom, left, right = pads
    batch, height, width, channels = x.shape
    out_h = (height + top + bottom - size) // stride + 1
    out_w = (width + left + right - size) // stride + 1
    out = np.empty((batch, out_h, out_w, channels), x.dtype if levels is None else np.uint8)
    _split_rows(_maxpool, batch * out_h, x.size, np.ascontiguousarray(x), size, stride, top, left,
                np.float32(levels or 0), out)
    return out


# error_model="numpy": x / 0 follows IEEE instead of raising, which lets LLVM vectorise the division
@njit(error_model="numpy", **_JIT)
def _normalize(r0, r1, x, mean, std, out):
    xs, ys = x[r0:r1], out[r0:r1]
    for r in range(xs.shape[0]):
        row, target = xs[r], ys[r]
        for j in range(row.size):
            target[j] = (np.float32(row[j]) - mean[j]) / std[j]


def normalize(x, mean, std):
    """``(float32(x) - mean) / std`` per channel of an NHWC batch, float32 (``mean`` None: 0).

    One pass instead of numpy's three; ``x - 0`` is ``x``, so a missing mean
    changes nothing.
    """
    batch, height, width, channels = x.shape
    mean = np.zeros(channels, np.float32) if mean is None else np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    # per-channel constants repeated along a whole image row, so the inner loop runs over W * C values
    mean_row = _along_row(mean, width, channels)
    std_row = _along_row(std.reshape(-1), width, channels)
    rows = np.ascontiguousarray(x).reshape(batch * height, width * channels)
    out = np.empty(rows.shape, np.float32)
    _split_rows(_normalize, rows.shape[0], rows.size, rows, mean_row, std_row, out)
    return out.reshape(x.shape)
