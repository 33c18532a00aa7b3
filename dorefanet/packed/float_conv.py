"""Direct float32 convolution with the layer's affine map applied in registers (numba, AVX-512 where present).

The engine's float layers (a net's first convolution above all) took most of
the packed SVHN net's time through im2col + BLAS: a 75-wide im2col copy of the
whole batch, a skinny matrix product and two more passes for bias and batch
norm.  This kernel reads the input map in place and keeps a register tile of
6 output pixels x 48 output channels (18 ``<16 x float>`` accumulators): for
each (ky, kx, c) of the window one weight vector is loaded and each pixel's
input value broadcast against it (``acc += x * w``, fused multiply-add).  The
tile is then multiplied by the channels' ``scale`` and added ``shift`` (two
float32 operations, as the engine's numpy epilogue did) and stored.

With ``levels`` the tile is quantized in registers and stored as uint8 codes.
:func:`dense_affine` runs fully-connected layers on the same tiles (batch rows
as pixels).  Summation order differs from TensorFlow's (as any two float32
convolutions' do); the engine's exactness tests bound what that can change.
"""
import numpy as np
from numba import njit

from .intrinsics import emit, fma_at, fzero, lanes_load
from .threads import next_task, num_threads, run_workers

__all__ = ["LANES", "conv2d_affine"]

_JIT = dict(nogil=True, cache=True)
#: Output channels per vector; the kernel needs a multiple of this.
LANES = 16
_PIXELS = 6                             # output pixels per register tile (36 and 54 wide maps: no tail)


@njit(inline="always", **_JIT)
def _emit6x3(out, codes, levels, o, n_out, scale, shift, ob, p0, p1, p2, p3, p4, p5):
    """The epilogue of a 6 x 48 tile: pixel k's three accumulators ``pk`` scaled by ``scale[ob:ob + 48]``, shifted
    and stored (or quantized) at ``o + k n_out``."""
    # hand-unrolled over the pixels, whose accumulators are separate register values
    sa, sb, sc = lanes_load(scale, ob), lanes_load(scale, ob + 16), lanes_load(scale, ob + 32)
    ta, tb, tc = lanes_load(shift, ob), lanes_load(shift, ob + 16), lanes_load(shift, ob + 32)
    s, t = (sa, sb, sc), (ta, tb, tc)
    emit(out, codes, levels, o, p0, s, t)
    emit(out, codes, levels, o + n_out, p1, s, t)
    emit(out, codes, levels, o + 2 * n_out, p2, s, t)
    emit(out, codes, levels, o + 3 * n_out, p3, s, t)
    emit(out, codes, levels, o + 4 * n_out, p4, s, t)
    emit(out, codes, levels, o + 5 * n_out, p5, s, t)


@njit(inline="always", **_JIT)
def _tile6x3(x, w, base, step, wrow, n_out, row_in, cin, kh, kw, out, codes, levels, o, scale, shift, ob):
    """6 output pixels x 48 channels: 18 accumulators, 3 weight loads and 6 broadcasts per input value."""
    # hand-unrolled tile of named accumulators: numba keeps scalar values in registers across the loop, an
    # array tile's elements in memory
    a00 = a01 = a02 = a10 = a11 = a12 = a20 = a21 = a22 = fzero()
    a30 = a31 = a32 = a40 = a41 = a42 = a50 = a51 = a52 = fzero()
    # within one kernel row, the (kx, c) inputs are contiguous in x and their weights in w: one loop
    span = kw * cin
    for ky in range(kh):
        p0 = base + ky * row_in
        w0 = wrow + ky * span * n_out
        for j in range(span):
            wa = lanes_load(w, w0 + j * n_out)
            wb = lanes_load(w, w0 + j * n_out + 16)
            wc = lanes_load(w, w0 + j * n_out + 32)
            p = p0 + j
            # hand-unrolled: every pixel's input broadcast against the weight vectors, one FMA per accumulator
            a00 = fma_at(x, p, wa, a00)
            a01 = fma_at(x, p, wb, a01)
            a02 = fma_at(x, p, wc, a02)
            a10 = fma_at(x, p + step, wa, a10)
            a11 = fma_at(x, p + step, wb, a11)
            a12 = fma_at(x, p + step, wc, a12)
            a20 = fma_at(x, p + 2 * step, wa, a20)
            a21 = fma_at(x, p + 2 * step, wb, a21)
            a22 = fma_at(x, p + 2 * step, wc, a22)
            a30 = fma_at(x, p + 3 * step, wa, a30)
            a31 = fma_at(x, p + 3 * step, wb, a31)
            a32 = fma_at(x, p + 3 * step, wc, a32)
            a40 = fma_at(x, p + 4 * step, wa, a40)
            a41 = fma_at(x, p + 4 * step, wb, a41)
            a42 = fma_at(x, p + 4 * step, wc, a42)
            a50 = fma_at(x, p + 5 * step, wa, a50)
            a51 = fma_at(x, p + 5 * step, wb, a51)
            a52 = fma_at(x, p + 5 * step, wc, a52)
    _emit6x3(out, codes, levels, o, n_out, scale, shift, ob, (a00, a01, a02), (a10, a11, a12), (a20, a21, a22),
             (a30, a31, a32), (a40, a41, a42), (a50, a51, a52))


@njit(inline="always", **_JIT)
def _tile1x1(x, w, base, wrow, n_out, row_in, cin, kh, kw, out, codes, levels, o, scale, shift, ob):
    """One output pixel x 16 channels (the tails)."""
    acc = fzero()
    span = kw * cin
    for ky in range(kh):
        p0 = base + ky * row_in
        w0 = wrow + ky * span * n_out
        for j in range(span):
            acc = fma_at(x, p0 + j, lanes_load(w, w0 + j * n_out), acc)
    emit(out, codes, levels, o, (acc,), (lanes_load(scale, ob),), (lanes_load(shift, ob),))


@njit(inline="always", **_JIT)
def _tile6x4(x, w, b0, b1, b2, b3, b4, b5, wrow, n_out, row_in, span, kh, out, codes, levels, o, scale, shift,
             ob):
    """6 output pixels (input windows at b0 .. b5) x 64 channels: 24 accumulators, 4 weight loads and 6
    broadcasts per input value."""
    # hand-unrolled tile of named accumulators: numba keeps scalar values in registers across the loop, an
    # array tile's elements in memory
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = a20 = a21 = a22 = a23 = fzero()
    a30 = a31 = a32 = a33 = a40 = a41 = a42 = a43 = a50 = a51 = a52 = a53 = fzero()
    for ky in range(kh):
        d = ky * row_in
        w0 = wrow + ky * span * n_out
        for j in range(span):
            q = w0 + j * n_out
            wa, wb, wc, wd = lanes_load(w, q), lanes_load(w, q + 16), lanes_load(w, q + 32), lanes_load(w, q + 48)
            p = d + j
            # hand-unrolled: every pixel's input broadcast against the weight vectors, one FMA per accumulator
            a00 = fma_at(x, b0 + p, wa, a00)
            a01 = fma_at(x, b0 + p, wb, a01)
            a02 = fma_at(x, b0 + p, wc, a02)
            a03 = fma_at(x, b0 + p, wd, a03)
            a10 = fma_at(x, b1 + p, wa, a10)
            a11 = fma_at(x, b1 + p, wb, a11)
            a12 = fma_at(x, b1 + p, wc, a12)
            a13 = fma_at(x, b1 + p, wd, a13)
            a20 = fma_at(x, b2 + p, wa, a20)
            a21 = fma_at(x, b2 + p, wb, a21)
            a22 = fma_at(x, b2 + p, wc, a22)
            a23 = fma_at(x, b2 + p, wd, a23)
            a30 = fma_at(x, b3 + p, wa, a30)
            a31 = fma_at(x, b3 + p, wb, a31)
            a32 = fma_at(x, b3 + p, wc, a32)
            a33 = fma_at(x, b3 + p, wd, a33)
            a40 = fma_at(x, b4 + p, wa, a40)
            a41 = fma_at(x, b4 + p, wb, a41)
            a42 = fma_at(x, b4 + p, wc, a42)
            a43 = fma_at(x, b4 + p, wd, a43)
            a50 = fma_at(x, b5 + p, wa, a50)
            a51 = fma_at(x, b5 + p, wb, a51)
            a52 = fma_at(x, b5 + p, wc, a52)
            a53 = fma_at(x, b5 + p, wd, a53)
    # hand-unrolled epilogue: each pixel's accumulators scaled, shifted and stored (or quantized) by one emit
    sa, sb, sc, sd = lanes_load(scale, ob), lanes_load(scale, ob + 16), lanes_load(scale, ob + 32), \
        lanes_load(scale, ob + 48)
    ta, tb, tc, td = lanes_load(shift, ob), lanes_load(shift, ob + 16), lanes_load(shift, ob + 32), \
        lanes_load(shift, ob + 48)
    s, t = (sa, sb, sc, sd), (ta, tb, tc, td)
    emit(out, codes, levels, o, (a00, a01, a02, a03), s, t)
    emit(out, codes, levels, o + n_out, (a10, a11, a12, a13), s, t)
    emit(out, codes, levels, o + 2 * n_out, (a20, a21, a22, a23), s, t)
    emit(out, codes, levels, o + 3 * n_out, (a30, a31, a32, a33), s, t)
    emit(out, codes, levels, o + 4 * n_out, (a40, a41, a42, a43), s, t)
    emit(out, codes, levels, o + 5 * n_out, (a50, a51, a52, a53), s, t)


@njit(inline="always", **_JIT)
def _tile6x3p(x, w, b0, b1, b2, b3, b4, b5, wrow, n_out, row_in, span, kh, out, codes, levels, o, scale, shift,
              ob):
    """6 output pixels (input windows at b0 .. b5) x 48 channels: 18 accumulators."""
    # hand-unrolled tile of named accumulators: numba keeps scalar values in registers across the loop, an
    # array tile's elements in memory
    a00 = a01 = a02 = a10 = a11 = a12 = a20 = a21 = a22 = fzero()
    a30 = a31 = a32 = a40 = a41 = a42 = a50 = a51 = a52 = fzero()
    for ky in range(kh):
        d = ky * row_in
        w0 = wrow + ky * span * n_out
        for j in range(span):
            q = w0 + j * n_out
            wa, wb, wc = lanes_load(w, q), lanes_load(w, q + 16), lanes_load(w, q + 32)
            p = d + j
            # hand-unrolled: every pixel's input broadcast against the weight vectors, one FMA per accumulator
            a00 = fma_at(x, b0 + p, wa, a00)
            a01 = fma_at(x, b0 + p, wb, a01)
            a02 = fma_at(x, b0 + p, wc, a02)
            a10 = fma_at(x, b1 + p, wa, a10)
            a11 = fma_at(x, b1 + p, wb, a11)
            a12 = fma_at(x, b1 + p, wc, a12)
            a20 = fma_at(x, b2 + p, wa, a20)
            a21 = fma_at(x, b2 + p, wb, a21)
            a22 = fma_at(x, b2 + p, wc, a22)
            a30 = fma_at(x, b3 + p, wa, a30)
            a31 = fma_at(x, b3 + p, wb, a31)
            a32 = fma_at(x, b3 + p, wc, a32)
            a40 = fma_at(x, b4 + p, wa, a40)
            a41 = fma_at(x, b4 + p, wb, a41)
            a42 = fma_at(x, b4 + p, wc, a42)
            a50 = fma_at(x, b5 + p, wa, a50)
            a51 = fma_at(x, b5 + p, wb, a51)
            a52 = fma_at(x, b5 + p, wc, a52)
    _emit6x3(out, codes, levels, o, n_out, scale, shift, ob, (a00, a01, a02), (a10, a11, a12), (a20, a21, a22),
             (a30, a31, a32), (a40, a41, a42), (a50, a51, a52))


@njit(inline="always", **_JIT)
def _tile6x1p(x, w, b0, b1, b2, b3, b4, b5, wrow, n_out, row_in, span, kh, out, codes, levels, o, scale, shift,
              ob):
    """6 output pixels x 16 channels (the channels left over by the wide tiles): 6 independent accumulators."""
    # hand-unrolled tile of named accumulators: numba keeps scalar values in registers across the loop, an
    # array tile's elements in memory
    a0 = a1 = a2 = a3 = a4 = a5 = fzero()
    for ky in range(kh):
        d = ky * row_in
        w0 = wrow + ky * span * n_out
        for j in range(span):
            wa = lanes_load(w, w0 + j * n_out)
            p = d + j
            # hand-unrolled: every pixel's input broadcast against the weight vectors, one FMA per accumulator
            a0 = fma_at(x, b0 + p, wa, a0)
            a1 = fma_at(x, b1 + p, wa, a1)
            a2 = fma_at(x, b2 + p, wa, a2)
            a3 = fma_at(x, b3 + p, wa, a3)
            a4 = fma_at(x, b4 + p, wa, a4)
            a5 = fma_at(x, b5 + p, wa, a5)
    # hand-unrolled epilogue: each pixel's accumulators scaled, shifted and stored (or quantized) by one emit
    sa, ta = lanes_load(scale, ob), lanes_load(shift, ob)
    s, t = (sa,), (ta,)
    emit(out, codes, levels, o, (a0,), s, t)
    emit(out, codes, levels, o + n_out, (a1,), s, t)
    emit(out, codes, levels, o + 2 * n_out, (a2,), s, t)
    emit(out, codes, levels, o + 3 * n_out, (a3,), s, t)
    emit(out, codes, levels, o + 4 * n_out, (a4,), s, t)
    emit(out, codes, levels, o + 5 * n_out, (a5,), s, t)


@njit(inline="always", **_JIT)
def _window_base(q, per_image, out_w, image_in, row_in, stride, step):
    """First input element of the window of output pixel ``q`` (flat over the batch)."""
    image = q // per_image
    r = q - image * per_image
    oy = r // out_w
    return image * image_in + oy * stride * row_in + (r - oy * out_w) * step


@njit(inline="always", **_JIT)
def _next_window(ox, oy, row_base, image_base, out_w, out_h, row_step, image_in):
    """The next output pixel's (ox, oy) and the starts of its window row and image: its window is at
    ``row_base + ox * step``.  Two divisions for every pixel (as in :func:`_window_base`) made SVHN's conv0
    (75 multiply-adds per output) about 10% slower."""
    ox += 1
    if ox == out_w:
        ox = 0
        oy += 1
        row_base += row_step
        if oy == out_h:
            oy = 0
            image_base += image_in
            row_base = image_base
    return ox, oy, row_base, image_base


@njit(inline="always", **_JIT)
def _two_windows(ox, oy, row_base, image_base, step, out_w, out_h, row_step, image_in):
    """Window starts of the next two output pixels and the state after them (see :func:`_next_window`).
    (The same code as a loop over a tile's pixels into an array of starts ran SVHN's conv0 about 15% slower.)"""
    first = row_base + ox * step
    ox, oy, row_base, image_base = _next_window(ox, oy, row_base, image_base, out_w, out_h, row_step, image_in)
    second = row_base + ox * step
    ox, oy, row_base, image_base = _next_window(ox, oy, row_base, image_base, out_w, out_h, row_step, image_in)
    return first, second, ox, oy, row_base, image_base


@njit(**_JIT)
def _conv_worker(counter, n_tasks, x, width, cin, w, scale, shift, kh, kw, stride, out_h, out_w, out, codes,
                 levels, task_pixels):
    """Tasks are ``task_pixels`` consecutive output pixels of the batch; ``x`` is the flat padded NHWC input whose
    rows are ``width`` pixels.  Tiles take 6 consecutive pixels wherever they are (across row and image ends),
    each with its own window start: tiles bound to one output row left a latency-bound one-pixel tail on most
    widths (112 % 6 = 4 in ResNet's conv1), and 64 channels ran a third of them in one-accumulator tiles."""
    n_out = scale.size
    row_in = width * cin
    step = stride * cin
    span = kw * cin
    per_image = out_h * out_w
    image_in = ((out_h - 1) * stride + kh) * row_in
    row_step = stride * row_in
    n_pix = per_image * (out.size if levels == 0 else codes.size) // (per_image * n_out)
    vec = 64 if n_out % 64 == 0 else 48
    wide = n_out - n_out % vec
    while True:
        task = next_task(counter)
        if task >= n_tasks:
            break
        q0 = task * task_pixels
        q1 = min(n_pix, q0 + task_pixels)
        full = q0 + (q1 - q0) // _PIXELS * _PIXELS
        image = q0 // per_image
        oy = (q0 - image * per_image) // out_w
        ox = q0 - image * per_image - oy * out_w
        image_base = image * image_in
        row_base = image_base + oy * row_step
        for q in range(q0, full, _PIXELS):
            b0, b1, ox, oy, row_base, image_base = _two_windows(ox, oy, row_base, image_base, step, out_w, out_h,
                                                                row_step, image_in)
            b2, b3, ox, oy, row_base, image_base = _two_windows(ox, oy, row_base, image_base, step, out_w, out_h,
                                                                row_step, image_in)
            b4, b5, ox, oy, row_base, image_base = _two_windows(ox, oy, row_base, image_base, step, out_w, out_h,
                                                                row_step, image_in)
            o = q * n_out
            for ob in range(0, wide, vec):
                if vec == 64:
                    _tile6x4(x, w, b0, b1, b2, b3, b4, b5, ob, n_out, row_in, span, kh, out, codes, levels, o + ob,
                             scale, shift, ob)
                else:
                    _tile6x3p(x, w, b0, b1, b2, b3, b4, b5, ob, n_out, row_in, span, kh, out, codes, levels,
                              o + ob, scale, shift, ob)
            for ob in range(wide, n_out, 16):
                _tile6x1p(x, w, b0, b1, b2, b3, b4, b5, ob, n_out, row_in, span, kh, out, codes, levels, o + ob,
                          scale, shift, ob)
        for q in range(full, q1):
            base = _window_base(q, per_image, out_w, image_in, row_in, stride, step)
            for ob in range(0, n_out, 16):
                _tile1x1(x, w, base, ob, n_out, row_in, cin, kh, kw, out, codes, levels, q * n_out + ob, scale,
                         shift, ob)


#: Output pixels of one task of the float convolution (8 tiles).
_TASK_PIXELS = 8 * _PIXELS


def conv2d_affine(x, w, scale, shift, stride, pads, levels=None):
    """``conv2d(x, w) * scale + shift`` per output channel (NHWC, TensorFlow's cross-correlation), float32.

    ``x [B, H, W, C]``, ``w [kh, kw, C, O]`` with ``O % 16 == 0``; ``scale`` and
    ``shift`` are ``[O]`` (or None: 1 and 0); ``pads`` = (top, bottom, left, right).
    With ``levels`` = n, returns instead the uint8 codes ``round(clip(y, 0, 1) * n)``
    of that float32 result ``y``.
    """
    kh, kw, cin, n_out = w.shape
    if n_out % LANES:
        raise ValueError("conv2d_affine needs a multiple of {} output channels, got {}".format(LANES, n_out))
    top, bottom, left, right = pads
    x = np.asarray(x, np.float32)
    if any(pads):
        x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    batch, height, width, _ = x.shape
    out_h, out_w = (height - kh) // stride + 1, (width - kw) // stride + 1
    # the kernel steps from image to image by the rows the outputs read
    if height != (out_h - 1) * stride + kh:
        x = x[:, :(out_h - 1) * stride + kh]
    x = np.ascontiguousarray(x).reshape(-1)
    scale = np.ones(n_out, np.float32) if scale is None else np.ascontiguousarray(scale, np.float32)
    shift = np.zeros(n_out, np.float32) if shift is None else np.ascontiguousarray(shift, np.float32)
    shape = (batch, out_h, out_w, n_out)
    out = np.empty(shape if levels is None else 0, np.float32)
    codes = np.empty(0 if levels is None else shape, np.uint8)
    n_pix = batch * out_h * out_w
    n_tasks = -(-n_pix // _TASK_PIXELS)
    threads = num_threads() if n_pix * n_out * kh * kw * cin >= 1 << 20 else 1
    run_workers(_conv_worker, n_tasks, threads, x, width, cin,
                 np.ascontiguousarray(w, np.float32).reshape(-1), scale, shift, kh, kw, stride, out_h, out_w,
                 out.reshape(-1), codes.reshape(-1), np.float32(levels or 0), _TASK_PIXELS)
    return out if levels is None else codes


#: Output channels of the widest register tile (fully-connected weights are padded to a multiple).
_TILE_CHANNELS = 48


def pad_dense_weights(w):
    """``w [K, O]`` as ``[1, 1, K, O']`` with O' the next multiple of 48 (zero columns): :func:`dense_affine`'s form."""
    k, n_out = w.shape
    padded = np.zeros((1, 1, k, -(-n_out // _TILE_CHANNELS) * _TILE_CHANNELS), np.float32)
    padded[0, 0, :, :n_out] = w
    return padded


@njit(**_JIT)
def _dense_worker(counter, n_tasks, x, k, w, scale, shift, row_tiles, out, codes, levels):
    """Tasks are 48-channel blocks: each streams its weight columns once and reuses them (from cache) for every
    6-row tile of the batch; ``x`` is the flat ``[row_tiles * 6, k]`` input, ``out`` / ``codes`` ``[.., width]``."""
    width = scale.size
    while True:
        task = next_task(counter)
        if task >= n_tasks:
            break
        ob = task * _TILE_CHANNELS
        for tile in range(row_tiles):
            row = tile * _PIXELS
            _tile6x3(x, w, row * k, k, ob, width, 0, k, 1, 1, out, codes, levels, row * width + ob, scale, shift, ob)


def pad_dense_affine(scale, shift, width):
    """``scale`` and ``shift`` (``[O]`` or None: 1 and 0) as float32 ``[width]`` (1 and 0 beyond ``O``), the form
    :func:`dense_affine` computes with; a caller that keeps them saves their making on every call."""
    scale_p = np.ones(width, np.float32)
    shift_p = np.zeros(width, np.float32)
    if scale is not None:
        scale_p[:scale.size] = scale
    if shift is not None:
        shift_p[:shift.size] = shift
    return scale_p, shift_p


def dense_affine(v, padded_w, n_out, scale, shift, levels=None, clip=False, padded_affine=None):
    """``(v @ w) * scale + shift`` for a fully-connected layer (``v [B, K]``), float32 or codes as
    :func:`conv2d_affine`.

    The register tiles of the convolution (6 batch rows x 48 channels), with the
    weights ``padded_w`` from :func:`pad_dense_weights`; work is split by channel
    blocks, so a large weight matrix is read from memory once per call.  With ``clip``, the input is
    ``np.clip(v, 0, 1)`` (done while it is copied into the tiles' rows).  ``padded_affine``: ``scale`` and
    ``shift`` from :func:`pad_dense_affine`, used instead of making them again.
    """
    batch, k = v.shape
    width = padded_w.shape[-1]
    row_tiles = -(-batch // _PIXELS)
    x = np.zeros((row_tiles * _PIXELS, k), np.float32)
    if clip:
        np.clip(v, np.float32(0), np.float32(1), out=x[:batch])
    else:
        x[:batch] = v
    scale_p, shift_p = padded_affine if padded_affine is not None else pad_dense_affine(scale, shift, width)
    shape = (row_tiles * _PIXELS, width)
    out = np.empty(shape if levels is None else 0, np.float32)
    codes = np.empty(0 if levels is None else shape, np.uint8)
    n_tasks = width // _TILE_CHANNELS
    threads = num_threads() if row_tiles * _PIXELS * k * width >= 1 << 20 else 1
    run_workers(_dense_worker, n_tasks, threads, x.reshape(-1), k, padded_w.reshape(-1), scale_p, shift_p,
                 row_tiles, out.reshape(-1), codes.reshape(-1), np.float32(levels or 0))
    return (out if levels is None else codes)[:batch, :n_out]
