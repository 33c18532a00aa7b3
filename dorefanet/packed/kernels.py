"""Bit-operation kernels of the packed inference engine: bit planes and popcount GEMM / convolution.

numpy + numba only (no TensorFlow).  All results are exact integers.

Codes and bit planes
--------------------
An ``m``-bit activation is an integer code ``ia`` in ``[0, 2^m - 1]`` and a ``k``-bit quantized
weight an integer code ``q`` in ``[0, 2^k - 1]``.  Plane ``b`` of a code array holds bit ``b`` of
every code.  Planes are packed along the reduction axis (channels), little-endian within 64-bit
words: element ``c`` of a row is bit ``c % 64`` of word ``c // 64``; rows are zero-padded to whole
words (a code of 0 adds nothing to any sum below, so the padding is exact).

* :func:`pack_planes` ``codes [..., C] -> uint64 [bits, ..., ceil(C / 64)]``; :func:`unpack_planes`
  is its inverse.
* :func:`gemm_popcount` (fully-connected layers) and :func:`conv_popcount` (NHWC convolutions, TF
  ``conv2d`` cross-correlation) return ``acc = sum ia * q`` and ``rowsum = sum ia`` over each
  output's reduction, computed as ``sum_{i,j} 2^(i+j) popcount(a_j & w_i)``.
* :func:`gemm_popcount_codes` / :func:`conv_popcount_codes` take the uint8 activation codes instead of
  their planes and pack them in the pass that zero-pads the map and sums the codes (what the engine
  calls: one pass over the input instead of three).
* :func:`compact_window_words`: where the convolution from codes reads its windows without the empty
  bits of pixels that are not whole words (48 channels: 7 words for a 3 x 3 window instead of 9).
* :func:`prepare_weights` lays weight planes out for the kernels.  Both kernels take either the
  ``[k, C, ...]`` planes (laid out again on every call) or its result (laid out once, at load time).
* :func:`reference_gemm` / :func:`reference_conv`: numpy references computed on the unpacked codes.

How the kernels compute
-----------------------
Both are one GEMM on bit planes with the output channels in SIMD lanes (a fully-connected layer is
a 1 x 1 convolution of a 1 x 1 map).  The weights are laid out in panels of 32 output channels,
``[k, C / 32, K, 32]``, so that the 32 channels of one reduction word are four 512-bit vectors.  A
"virtual row" is the window of one output pixel (an FC input row) in one activation plane ``j``;
its words are read in place from the input planes, zero-padded once per call.  A register tile
takes 4 virtual rows x 32 channels: for each reduction word, 4 weight vectors are loaded and each
row's word is broadcast against them; ``acc += popcount(a & w)`` accumulates in 16 vector registers
(``vpandq`` + ``vpopcntq`` + ``vpaddq`` with AVX512_VPOPCNTDQ; numba compiles for the host CPU,
other CPUs get LLVM's generic lowering of the same vector code).  At the end of a tile the rows of
one output pixel are summed with their shifts ``i + j`` (weight plane ``i``) and stored, or added,
to the ``int32`` output.  The vectors are an LLVM ``<8 x i64>`` type of their own
(:data:`.intrinsics.vec8`, with the instructions above in :mod:`.intrinsics`), so the tile compiles to exactly
this code, independent of the auto-vectoriser.
``rowsum`` comes from per-pixel code sums (popcounts) taken while padding the input.

Work is split into (pixel block x channel block) tasks, handed out through an atomic counter to the
calling thread and ``numba.get_num_threads() - 1`` helper threads (:mod:`.threads`) running the same ``nogil``
function (small calls stay on the calling thread).  Every kernel is a plain serial numba function:
about 3 s of JIT on first use, cached on disk (``cache=True``) after that.
"""
import math

import numpy as np
from numba import njit

from . import profiling
from .elementwise import affine_accumulators
from .intrinsics import (affine8, affine8_codes, bits_of_64_bytes, load, load_at, popcount, store_at, vadd, vfold,
                         vload, vpopadd, vput, vshl, vzero)
from .threads import next_task, num_threads, run_workers

__all__ = ["pack_planes", "unpack_planes", "prepare_weights", "PreparedWeights", "gemm_popcount",
           "gemm_popcount_codes", "conv_popcount", "conv_popcount_codes", "compact_window_words", "reference_gemm",
           "reference_conv"]

_JIT = dict(nogil=True, cache=True)
_PANEL = 32                                 # output channels per weight panel (4 vectors of 8)


# ------------------------------------------------------------------------------------------- packing
@njit(**_JIT)
def _pack_worker(counter, n_tasks, flat, width, bits, out, row_block):
    """Rows of flat (uint8 codes [R * width], C order) -> out: uint64 [bits, R, Cw]; task = row block."""
    rows = out.shape[1]
    full = width // 64
    rest = width - 64 * full
    keep = (np.uint64(1) << np.uint64(rest)) - np.uint64(1)      # the rest's bits of a last word
    tail = np.zeros(64, np.uint8)
    task = next_task(counter)
    while task < n_tasks:
        for r in range(task * row_block, min(rows, (task + 1) * row_block)):
            base = r * width
            for w in range(full):
                for b in range(bits):
                    out[b, r, w] = bits_of_64_bytes(flat, base + 64 * w, b)
            if rest:
                start = base + 64 * full
                if start + 64 <= flat.shape[0]:      # read on into the next row, keep `rest` bits
                    for b in range(bits):
                        out[b, r, full] = bits_of_64_bytes(flat, start, b) & keep
                else:                               # the array's last bytes: through a zeroed copy
                    for c in range(rest):
                        tail[c] = flat[start + c]
                    for b in range(bits):
                        out[b, r, full] = bits_of_64_bytes(tail, 0, b)
        task = next_task(counter)


def pack_planes(codes, bits):
    """Bit planes of integer codes, packed along the last axis.

    ``codes``: integer array ``[..., C]`` with values in ``[0, 2^bits - 1]`` (not checked: bits at and
    above ``bits`` are ignored).  Returns ``uint64 [bits, ..., ceil(C / 64)]``: word ``w`` of plane
    ``b`` holds bit ``b`` of codes ``64 w .. 64 w + 63`` (code ``64 w + t`` in bit ``t``), zero-padded.
    """
    bits = int(bits)
    if not 1 <= bits <= 8:
        raise ValueError("bits must be in 1..8, got %d" % bits)
    codes = np.asarray(codes)
    if codes.ndim == 0:
        raise ValueError("codes must have at least one axis (the packed one)")
    if codes.dtype != np.uint8:
        if not np.issubdtype(codes.dtype, np.integer) and codes.dtype != np.bool_:
            raise ValueError("codes must be integers, got %s" % codes.dtype)
        codes = codes.astype(np.uint8)         # bits >= 8 are ignored anyway
    lead, width = codes.shape[:-1], codes.shape[-1]
    words = (width + 63) // 64
    out = np.empty((bits,) + lead + (words,), np.uint64)
    rows = math.prod(lead)
    if rows and words:
        flat = np.ascontiguousarray(codes).reshape(-1)
        threads = num_threads() if flat.size * bits > (1 << 23) else 1      # ~1 ms of work
        row_block = max(1, min(256, -(-rows // (4 * threads))))
        run_workers(_pack_worker, -(-rows // row_block), threads, flat, width, bits,
                     out.reshape(bits, rows, words), row_block)
    return out


def unpack_planes(planes, width):
    """Inverse of :func:`pack_planes`: ``uint64 [bits, ..., Cw] -> uint8 codes [..., width]``."""
    planes = np.ascontiguousarray(planes, dtype=np.uint64)
    bits = planes.shape[0]
    if planes.shape[-1] * 64 < width:
        raise ValueError("%d words cannot hold %d codes" % (planes.shape[-1], width))
    unpacked = np.unpackbits(planes.view(np.uint8), axis=-1, bitorder="little")[..., :width]
    codes = np.zeros(planes.shape[1:-1] + (width,), np.uint8)
    for b in range(bits):
        codes |= unpacked[b] << np.uint8(b)
    return codes


# ----------------------------------------------------------------------------------- weight layout
class PreparedWeights:
    """Weight planes laid out for the kernels (see :func:`prepare_weights`).

    ``panels``: flat uint64 ``[k, ceil(C / 32), K, 32]`` (channels beyond ``C`` zero); ``shape``: the
    shape of the planes it came from, ``(k, C, Kw)`` or ``(k, Cout, kh, kw, Cw)``.
    """

    __slots__ = ("panels", "shape", "planes", "windows", "plans")

    def __init__(self, panels, shape, planes=None):
        self.panels = panels
        self.shape = tuple(shape)
        self.planes = planes        # a convolution's [k, Cout, kh, kw, Cw] planes, for window_panels
        self.windows = {}           # input channels -> panels in the compact window layout
        self.plans = {}             # _run's plans for the shapes it was called with

    def window_panels(self, chans):
        """Panels of a convolution's weights in the compact window order of :func:`_conv_worker`
        (column by column, and in a column row by row, ``chans`` codes per pixel, no gaps), laid out on
        first use for that ``chans``."""
        if chans not in self.windows:
            k, cout, kh, kw, cw = self.planes.shape
            codes = unpack_planes(self.planes.reshape(k, cout * kh * kw, cw), 64 * cw)
            codes = codes.reshape(cout, kh, kw, 64 * cw)[..., :chans].transpose(0, 2, 1, 3)
            self.windows[chans] = prepare_weights(pack_planes(codes.reshape(cout, -1), k)).panels
        return self.windows[chans]

    def __repr__(self):
        return "PreparedWeights(shape=%s)" % (self.shape,)


@njit(**_JIT)
def _to_panels(w, out):
    """w: uint64 [k, C, K] -> out: [k, ceil(C / 32), K, 32], zero beyond channel C."""
    k, chans, depth = w.shape
    for i in range(k):
        for panel in range(out.shape[1]):
            for kk in range(depth):
                for e in range(_PANEL):
                    c = panel * _PANEL + e
                    out[i, panel, kk, e] = w[i, c, kk] if c < chans else np.uint64(0)


def prepare_weights(w_planes):
    """Lay weight planes out for :func:`gemm_popcount` / :func:`conv_popcount` (once, at load time).

    ``w_planes``: ``uint64 [k, C, Kw]`` (fully-connected) or ``[k, Cout, kh, kw, Cw]`` (convolution),
    as :func:`pack_planes` returns them for codes ``[C, K]`` / ``[Cout, kh, kw, Cin]``.  Returns a
    :class:`PreparedWeights`; a :class:`PreparedWeights` is returned as it is.
    """
    if isinstance(w_planes, PreparedWeights):
        return w_planes
    w = np.asarray(w_planes)
    if w.dtype != np.uint64 or w.ndim not in (3, 5):
        raise ValueError("weight planes must be uint64 [k, C, Kw] or [k, Cout, kh, kw, Cw], got %s %s"
                         % (w.dtype, w.shape))
    k, chans = w.shape[:2]
    flat = np.ascontiguousarray(w).reshape(k, chans, int(np.prod(w.shape[2:])))
    panels = np.empty((k, -(-chans // _PANEL), flat.shape[2], _PANEL), np.uint64)
    if panels.size:
        _to_panels(flat, panels)
    return PreparedWeights(panels.reshape(-1), w.shape, np.ascontiguousarray(w) if w.ndim == 5 else None)


# ------------------------------------------------------------------------------------ tile kernels
@njit(inline="always", **_JIT)
def _add_panel(out, index, y0, y1, y2, y3, first):
    """out[index:index + 32] (int32) = the four vectors if ``first``, else += them."""
    # hand-unrolled over the four vectors: they are separate register values, not an array numba could index
    if first:
        vput(out, index, y0)
        vput(out, index + 8, y1)
        vput(out, index + 16, y2)
        vput(out, index + 24, y3)
    else:
        vfold(out, index, y0, 0)
        vfold(out, index + 8, y1, 0)
        vfold(out, index + 16, y2, 0)
        vfold(out, index + 24, y3, 0)


@njit(inline="always", **_JIT)
def _tile4(words, r0, r1, r2, r3, kh, span, pitch, wp, wbase, out, o0, o1, o2, o3, s0, s1, s2, s3):
    """4 virtual rows x one 32-channel weight panel, 16 accumulators in registers.

    Virtual row l's window: ``kh`` runs of ``span`` words, run dy at byte ``r_l + dy * pitch`` of
    ``words`` (byte offsets: a window of the compact layout need not start on a word);
    the panel's 32 channels of reduction word kk are wp[wbase + 32 kk:][:32].  Adds the counts of
    row l, shifted by s_l, to out[o_l:o_l + 32].
    """
    # hand-unrolled 4 x 4 tile of named accumulators: numba keeps scalars in registers across the loop, not an
    # array tile (an array's elements go to memory on every update)
    x00 = vzero()
    x01 = vzero()
    x02 = vzero()
    x03 = vzero()
    x10 = vzero()
    x11 = vzero()
    x12 = vzero()
    x13 = vzero()
    x20 = vzero()
    x21 = vzero()
    x22 = vzero()
    x23 = vzero()
    x30 = vzero()
    x31 = vzero()
    x32 = vzero()
    x33 = vzero()
    w = wbase
    for dy in range(kh):
        run = dy * pitch
        for t in range(run, run + 8 * span, 8):
            # hand-unrolled: each row's word broadcast against the four weight vectors, one accumulator each
            w0 = vload(wp, w)
            w1 = vload(wp, w + 8)
            w2 = vload(wp, w + 16)
            w3 = vload(wp, w + 24)
            a = load_at(words, r0 + t)
            x00 = vpopadd(x00, a, w0)
            x01 = vpopadd(x01, a, w1)
            x02 = vpopadd(x02, a, w2)
            x03 = vpopadd(x03, a, w3)
            a = load_at(words, r1 + t)
            x10 = vpopadd(x10, a, w0)
            x11 = vpopadd(x11, a, w1)
            x12 = vpopadd(x12, a, w2)
            x13 = vpopadd(x13, a, w3)
            a = load_at(words, r2 + t)
            x20 = vpopadd(x20, a, w0)
            x21 = vpopadd(x21, a, w1)
            x22 = vpopadd(x22, a, w2)
            x23 = vpopadd(x23, a, w3)
            a = load_at(words, r3 + t)
            x30 = vpopadd(x30, a, w0)
            x31 = vpopadd(x31, a, w1)
            x32 = vpopadd(x32, a, w2)
            x33 = vpopadd(x33, a, w3)
            w += _PANEL
    # Rows of one output row are consecutive (its planes): sum them before adding to the output.
    # The group holding plane 0 of weight plane 0 (shift 0) comes first and stores (out is empty).
    # Hand-unrolled over the four rows and four vectors, as the accumulators are named values.
    first = s0 == 0
    y0 = vshl(x00, s0)
    y1 = vshl(x01, s0)
    y2 = vshl(x02, s0)
    y3 = vshl(x03, s0)
    if o1 != o0:
        _add_panel(out, o0, y0, y1, y2, y3, first)
        first = s1 == 0
        y0 = vshl(x10, s1)
        y1 = vshl(x11, s1)
        y2 = vshl(x12, s1)
        y3 = vshl(x13, s1)
    else:
        y0 = vadd(y0, vshl(x10, s1))
        y1 = vadd(y1, vshl(x11, s1))
        y2 = vadd(y2, vshl(x12, s1))
        y3 = vadd(y3, vshl(x13, s1))
    if o2 != o1:
        _add_panel(out, o1, y0, y1, y2, y3, first)
        first = s2 == 0
        y0 = vshl(x20, s2)
        y1 = vshl(x21, s2)
        y2 = vshl(x22, s2)
        y3 = vshl(x23, s2)
    else:
        y0 = vadd(y0, vshl(x20, s2))
        y1 = vadd(y1, vshl(x21, s2))
        y2 = vadd(y2, vshl(x22, s2))
        y3 = vadd(y3, vshl(x23, s2))
    if o3 != o2:
        _add_panel(out, o2, y0, y1, y2, y3, first)
        first = s3 == 0
        y0 = vshl(x30, s3)
        y1 = vshl(x31, s3)
        y2 = vshl(x32, s3)
        y3 = vshl(x33, s3)
    else:
        y0 = vadd(y0, vshl(x30, s3))
        y1 = vadd(y1, vshl(x31, s3))
        y2 = vadd(y2, vshl(x32, s3))
        y3 = vadd(y3, vshl(x33, s3))
    _add_panel(out, o3, y0, y1, y2, y3, first)


@njit(inline="always", **_JIT)
def _tile1(words, r0, kh, span, pitch, wp, wbase, out, o0, s0):
    """One virtual row x one panel (as _tile4): the rows _tile4 leaves over."""
    # hand-unrolled over the panel's four vectors, for the same reason as _tile4's accumulators
    x0 = vzero()
    x1 = vzero()
    x2 = vzero()
    x3 = vzero()
    w = wbase
    for dy in range(kh):
        run = dy * pitch
        for t in range(run, run + 8 * span, 8):
            a = load_at(words, r0 + t)
            x0 = vpopadd(x0, a, vload(wp, w))
            x1 = vpopadd(x1, a, vload(wp, w + 8))
            x2 = vpopadd(x2, a, vload(wp, w + 16))
            x3 = vpopadd(x3, a, vload(wp, w + 24))
            w += _PANEL
    _add_panel(out, o0, vshl(x0, s0), vshl(x1, s0), vshl(x2, s0), vshl(x3, s0), s0 == 0)


# ------------------------------------------------------------------------------------ the workers
@njit(inline="always", **_JIT)
def _window_sums(pixel, sums, at, p_width, kw):
    """sums[at + x] = pixel[x] + ... + pixel[x + kw - 1] for every window start x of a padded row."""
    window = 0
    for x in range(kw - 1):
        window += pixel[x]
    for x in range(p_width - kw + 1):
        window += pixel[x + kw - 1]
        sums[at + x] = window
        window -= pixel[x]


@njit(**_JIT)
def _prep_worker(counter, n_tasks, row_block, a, padded, sums, top, left, kw):
    """Copy a [m, B, H, W, Cw] into the zero-padded ``padded`` (unless it is ``a``) and set the flat
    int32 map ``sums`` [B, Hp, Wp] to the sum of the codes of the kw pixels (x .. x + kw - 1) of the
    padded map (zeros where there is no input row); task = ``row_block`` input rows (b, y)."""
    m, batch, height, width, cw = a.shape
    p_height, p_width = padded.shape[2], padded.shape[3]
    copy = padded.shape != a.shape
    source = a.reshape(-1)
    target = padded.reshape(-1)
    run = width * cw
    pixel = np.zeros(p_width + kw, np.int64)        # codes' sum of each pixel of the padded row
    task = next_task(counter)
    while task < n_tasks:
        for row in range(task * row_block, min(batch * height, (task + 1) * row_block)):
            b = row // height
            y = row % height
            for j in range(m):
                src = (j * batch * height + row) * run
                if copy:
                    dst = ((j * batch + b) * p_height + top + y) * p_width * cw + left * cw
                    for t in range(run):
                        target[dst + t] = source[src + t]
                for x in range(width):
                    ones = 0
                    for u in range(src + x * cw, src + x * cw + cw):
                        ones += np.int64(popcount(load(source, u)))
                    if j == 0:
                        pixel[left + x] = ones
                    else:
                        pixel[left + x] += ones << j
            _window_sums(pixel, sums, (b * p_height + top + y) * p_width, p_width, kw)
        task = next_task(counter)


@njit(**_JIT)
def _pack_pad_worker(counter, n_tasks, row_block, codes, padded, sums, top, left, kw):
    """Pack uint8 codes [B, H, W, C] straight into the bit planes ``padded`` [m, B, Hp, Wp, Cw] at
    (top, left) (its border is already zero) and set ``sums`` as :func:`_prep_worker` does: one pass
    instead of :func:`pack_planes` followed by :func:`_prep_worker`; task = ``row_block`` input rows."""
    batch, height, width, chans = codes.shape
    m, _, p_height, p_width, cw = padded.shape
    flat = codes.reshape(-1)
    size = flat.shape[0]
    target = padded.reshape(-1)
    plane = batch * p_height * p_width * cw
    keep = np.empty(cw, np.uint64)                  # word w's valid bits (a last word may be partial)
    for w in range(cw):
        keep[w] = np.uint64(0xFFFFFFFFFFFFFFFF) >> np.uint64(64 - min(64, chans - 64 * w))
    tail = np.zeros(64, np.uint8)                   # the array's last codes, zero-extended to 64
    pixel = np.zeros(p_width + kw, np.int64)
    task = next_task(counter)
    while task < n_tasks:
        for row in range(task * row_block, min(batch * height, (task + 1) * row_block)):
            b = row // height
            y = row % height
            base = row * width * chans
            at = ((b * p_height + top + y) * p_width + left) * cw
            for x in range(width):
                ones = 0
                for w in range(cw):
                    start = base + 64 * w
                    if start + 64 <= size:
                        for j in range(m):
                            word = bits_of_64_bytes(flat, start, j) & keep[w]
                            target[j * plane + at] = word
                            ones += np.int64(popcount(word)) << j
                    else:                           # a 64-byte read would run off the array: a zeroed copy
                        for c in range(size - start):
                            tail[c] = flat[start + c]
                        for j in range(m):
                            word = bits_of_64_bytes(tail, 0, j) & keep[w]
                            target[j * plane + at] = word
                            ones += np.int64(popcount(word)) << j
                    at += 1
                pixel[left + x] = ones
                base += chans
            _window_sums(pixel, sums, (b * p_height + top + y) * p_width, p_width, kw)
        task = next_task(counter)


@njit(inline="always", **_JIT)
def _fill_column(words, bands, pixel, at, width, kh, chunk):
    """The ``kh`` one-word pixels of a column, ``width`` words apart in ``words``, to bytes ``at``,
    ``at + chunk``, ... of ``bands`` (see :func:`_fill_bands`)."""
    for dy in range(kh):
        store_at(bands, at, load(words, pixel))
        pixel += width
        at += chunk


@njit(inline="always", **_JIT)
def _fill_bands(words, bands, m, height, width, cw, kh, out_h, g0, g1, n_bands, band_row, chunk):
    """Bands of output rows g0 .. g1 - 1 (over the batch: row g is row g % out_h of image g // out_h)
    from the padded planes ``words`` [m, B, height, width, cw]: band (j, g - g0) of ``bands`` holds, at
    byte (x kh + dy) chunk, the chunk bytes of codes of pixel (g % out_h + dy, x) of plane j.

    Each word is stored whole at its byte offset: the bytes above a pixel's codes are zero and the
    next store, made later by this same thread, overwrites them (the last one runs into the next band,
    or into the one spare word at the end).  Pixels of one word and the 3 x 3 and 5 x 5 kernels have
    their own loops with a constant count: with the count known at run time only, this copy took
    several times as long (measured on SVHN's conv1 shape).
    """
    image = height * width * cw
    plane = words.shape[0] // m
    for j in range(m):
        for g in range(g0, g1):
            at = (j * n_bands + g - g0) * band_row
            src = j * plane + (g // out_h) * image + (g % out_h) * width * cw
            if cw == 1 and kh == 3:
                for x in range(width):
                    _fill_column(words, bands, src + x, at, width, 3, chunk)
                    at += 3 * chunk
            elif cw == 1 and kh == 5:
                for x in range(width):
                    _fill_column(words, bands, src + x, at, width, 5, chunk)
                    at += 5 * chunk
            else:
                for x in range(width):
                    for dy in range(kh):
                        pixel = src + (dy * width + x) * cw
                        for w in range(cw):
                            store_at(bands, at + 8 * w, load(words, pixel + w))
                        at += chunk


@njit(**_JIT)
def _conv_worker(counter, n_tasks, a, sums, wp, k, out, rowsum, kh, kw, stride, out_h, out_w, pix_block,
                 panel_block, chunk, ep, ep_a, ep_b, ep_c, ep_levels, fout, cout, ep_ld, ep_off):
    """Popcount GEMM of a convolution (a fully-connected layer is a 1 x 1 one on a 1 x 1 map).

    a: uint64 [m, B, H, W, Cw], already zero-padded; sums: flat int32 [B, H, W], the sum of the codes
    of pixels x .. x + kw - 1 (of row y, image b); wp: weight panels, flat [k, P, kh*kw*Cw, 32];
    out: flat int32 [B*Ho*Wo, 32 P] (uninitialised: the first contribution to each output row
    stores; unused with ``ep`` > 0); rowsum: int32 [B*Ho*Wo].
    A task is (block of output pixels, block of panels).  Virtual row v of a task is (pixel
    p0 + v // m, plane v % m); the tiles read its window straight from ``a`` and add to the output
    with shift i + v % m for weight plane i.
    With ``chunk`` > 0 (stride 1, pixels of ``chunk`` bytes of codes) the tiles read compact windows
    instead, and wp holds the weights in the same order (``PreparedWeights.window_panels``): for each
    output row of the task and plane, a band of its ``kh`` input rows is first copied column by column
    (pixel (dy, x) at byte (x kh + dy) chunk, the bytes of one pixel's codes right after the last
    one's), so that the window of output pixel x is the kh kw chunk bytes from byte x kh chunk on,
    without the empty part of each pixel's last word.
    With ``ep`` > 0 each task then maps its finished block of ``out`` (still in cache) to the layer's
    output, ``y = float32(acc * ep_a + (rowsum * ep_b + ep_c))`` per channel in float64: ``ep`` = 1
    stores ``y`` into ``fout``, ``ep`` = 2 the codes ``rint(clip(y, 0, 1) * ep_levels)`` into ``cout``
    (both flat [B*Ho*Wo, ep_ld], channel c at ep_off + c), exactly
    :func:`packed.elementwise.affine_accumulators` of the results.
    """
    m, _, height, width, cw = a.shape
    pitch = width * cw
    words = a.reshape(-1)
    band_row = width * kh * chunk                 # bytes of one band (chunk > 0)
    n_bands = pix_block // out_w + 2              # output rows a task can touch
    if chunk > 0:
        depth = (kh * kw * chunk + 7) // 8
        src = np.empty((m * n_bands * band_row + 7) // 8 + 1, np.uint64)     # one more: see _fill_bands
        t_kh, t_span, t_pitch = 1, depth, 0
    else:
        depth = kh * kw * cw
        src = words
        t_kh, t_span, t_pitch = kh, kw * cw, 8 * pitch
    image = height * pitch
    plane = a.shape[1] * image
    n_pix = rowsum.shape[0]
    n_panels = wp.shape[0] // (k * depth * _PANEL)
    ldo = n_panels * _PANEL
    n_cb = (n_panels + panel_block - 1) // panel_block
    if ep > 0:
        # the sums live only until the task's epilogue: a block of this thread's own, reused task after task
        # while in cache (a whole-layer array was written to memory and read back: 26 MB per ResNet-18 layer
        # and chunk of 32 images)
        acc = np.empty(pix_block * panel_block * _PANEL, np.int32)
        acc_ld = panel_block * _PANEL
    else:
        acc = out
        acc_ld = ldo
    task = next_task(counter)
    while task < n_tasks:
        p0 = task // n_cb * pix_block
        p1 = min(n_pix, p0 + pix_block)
        q0 = task % n_cb * panel_block
        q1 = min(n_panels, q0 + panel_block)
        nv = (p1 - p0) * m
        row_at = np.empty(nv, np.int64)           # virtual row v: first byte of its window
        out_at = np.empty(nv, np.int64)           # and of its output row
        shift = np.empty(nv, np.int64)            # and its plane
        b = p0 // (out_h * out_w)
        y = p0 // out_w % out_h
        x = p0 % out_w
        v = 0
        for p in range(p0, p1):
            at = b * image + y * stride * pitch + x * stride * cw
            for j in range(m):
                if chunk > 0:
                    row_at[v] = (j * n_bands + p // out_w - p0 // out_w) * band_row + x * kh * chunk
                else:
                    row_at[v] = 8 * (j * plane + at)
                out_at[v] = (p - p0) * acc_ld if ep > 0 else p * ldo
                shift[v] = j
                v += 1
            x += 1
            if x == out_w:
                x = 0
                y += 1
                if y == out_h:
                    y = 0
                    b += 1
        task_sums = np.empty(p1 - p0 if ep > 0 else 0, np.int64)
        if q0 == 0 or ep > 0:                       # rowsum: kh row sums of the sums map
            b = p0 // (out_h * out_w)
            y = p0 // out_w % out_h
            x = p0 % out_w
            for p in range(p0, p1):
                at = (b * height + y * stride) * width + x * stride
                total = 0
                for dy in range(kh):
                    total += sums[at + dy * width]
                if q0 == 0:
                    rowsum[p] = total
                if ep > 0:                          # each task's own: the q0 == 0 task may not have run yet
                    task_sums[p - p0] = total
                x += 1
                if x == out_w:
                    x = 0
                    y += 1
                    if y == out_h:
                        y = 0
                        b += 1
        if chunk > 0:
            _fill_bands(words, src, m, height, width, cw, kh, out_h, p0 // out_w, (p1 - 1) // out_w + 1, n_bands,
                        band_row, chunk)
        full = nv // 4 * 4
        for i in range(k):
            for q in range(q0, q1):
                wbase = (i * n_panels + q) * depth * _PANEL
                c0 = (q - q0 if ep > 0 else q) * _PANEL
                for v in range(0, full, 4):
                    _tile4(src, row_at[v], row_at[v + 1], row_at[v + 2], row_at[v + 3], t_kh, t_span, t_pitch,
                           wp, wbase, acc, out_at[v] + c0, out_at[v + 1] + c0, out_at[v + 2] + c0,
                           out_at[v + 3] + c0, i + shift[v], i + shift[v + 1], i + shift[v + 2],
                           i + shift[v + 3])
                for v in range(full, nv):
                    _tile1(src, row_at[v], t_kh, t_span, t_pitch, wp, wbase, acc, out_at[v] + c0, i + shift[v])
        if ep > 0:
            chans = ep_a.shape[0]
            c0, c1 = q0 * _PANEL, min(q1 * _PANEL, chans)
            c8 = c0 + (c1 - c0) // 8 * 8
            zero, one = np.float32(0), np.float32(1)
            for p in range(p0, p1):
                o = p * ep_ld + ep_off
                r = (p - p0) * acc_ld - c0             # channel c's sum is at acc[r + c]
                s = np.float64(task_sums[p - p0])
                if ep == 2:
                    for c in range(c0, c8, 8):
                        affine8_codes(acc, r + c, s, ep_a, ep_b, ep_c, c, ep_levels, cout, o + c)
                else:
                    for c in range(c0, c8, 8):
                        affine8(acc, r + c, s, ep_a, ep_b, ep_c, c, fout, o + c)
                for c in range(c8, c1):                # affine_row / affine_row_codes, one channel
                    y = np.float32(np.float64(acc[r + c]) * ep_a[c] + (s * ep_b[c] + ep_c[c]))
                    if ep == 2:
                        cout[o + c] = np.rint(min(max(y, zero), one) * ep_levels)
                    else:
                        fout[o + c] = y
        task = next_task(counter)


def _check_planes(name, planes, ndim):
    planes = np.asarray(planes)
    if planes.dtype != np.uint64 or planes.ndim != ndim:
        raise ValueError("%s must be uint64 with %d axes, got %s %s" % (name, ndim, planes.dtype, planes.shape))
    return np.ascontiguousarray(planes)


def _blocks(n_pix, n_panels, depth, m, k, threads):
    """(pixels, panels) per task: weights and rows of a task fit in L2, and every thread has work."""
    panel_bytes = depth * _PANEL * 8 * k
    panel_block = n_panels if n_panels * panel_bytes <= (512 << 10) else max(1, (256 << 10) // panel_bytes)
    n_cb = -(-n_panels // panel_block)
    max_rows = min(256, max(8, (64 << 10) // max(1, m * depth * 8)))  # rows of a task ~64 KiB
    want = 4 * threads                                                # tasks: balance on a busy machine
    pix_block = max(1, min(max_rows, -(-n_pix // -(-want // n_cb))))
    n_pb = -(-n_pix // pix_block)
    if n_pb * n_cb < want:                                            # few pixels (batch 1): split channels
        panel_block = max(1, -(-n_panels // -(-want // n_pb)))
    return pix_block, panel_block


def compact_window_words(kernel, stride, chans):
    """Words per plane of a window in the compact layout that :func:`conv_popcount_codes` reads, or 0
    where it keeps the plain one (pixels in whole words).

    Pixels of 48 channels leave 16 bits of every word empty, so a 3 x 3 window takes 9 words per
    plane where its 432 bits fit in 7, and the popcount work drops by 2/9; copying the windows
    together costs part of that back (measured, same process, interleaved: SVHN's conv1 at batch 128
    2.26 -> 2.13 ms, one of AlexNet's conv1 groups at batch 32 23.5 -> 21.6 ms).  Used for stride-1
    convolutions on pixels of whole bytes (``chans % 8 == 0``) when it saves words.
    """
    kh, kw = kernel
    compact = -(-kh * kw * chans // 64)
    if stride != 1 or chans % 8 or compact >= kh * kw * -(-chans // 64):
        return 0
    return compact


#: The epilogue arguments of a call without one (never written).
_NO_EPILOGUE = (np.zeros(0), np.zeros(0), np.zeros(0), np.float32(0), np.empty(0, np.float32), np.empty(0, np.uint8),
                0, 0)
#: Largest padded map (in words) whose scratch a plan keeps for its next call: a large call's allocations are a
#: small share of its time, and a plan kept per layer and shape should not hold a batch's maps for good
_SPARE_WORDS = 1 << 17
#: Plans kept per weights (input shapes of one layer: a batch and the last chunk of a large one, say).
_PLANS_PER_WEIGHTS = 8


class _Plan:
    """What :func:`_run` works out from shapes alone: the reduction's layout, task blocks, thread counts.

    Made once per (weights, input shape and geometry, thread count) and kept with the weights: working it
    out on every call took about 25 us, as much as half of a batch-1 layer (SVHN's conv1: 85 us a call of
    ``conv_popcount_codes``, 59 us of it in the two kernels).
    """

    __slots__ = ("from_codes", "m", "k", "chans", "depth", "panels", "chunk", "n_pix", "n_panels", "fused",
                 "kh", "kw", "stride", "top", "left", "out_shape", "threads", "pix_block", "panel_block",
                 "n_tasks", "padded_shape", "any_pads", "prep_threads", "row_block", "prep_tasks", "_spare",
                 "_epilogue", "_no_acc")

    def __init__(self, a_shape, from_codes, m, w, kernel, stride, pads, out_shape, with_epilogue):
        kh, kw = kernel
        top, bottom, left, right = pads
        batch, height, width = a_shape[-4:-1] if from_codes else a_shape[1:4]
        cw = -(-a_shape[-1] // 64) if from_codes else a_shape[-1]
        k, chans = w.shape[:2]
        depth = kh * kw * cw
        n_pix = math.prod(out_shape)
        if depth * 64 * (2 ** m - 1) * (2 ** k - 1) >= 2 ** 31:
            raise ValueError("sums of %d codes of %d x %d bits may not fit in int32" % (depth * 64, m, k))
        panels = w.panels
        chunk = 0               # > 0: compact windows of pixels of `chunk` bytes (see _conv_worker)
        compact = compact_window_words(kernel, stride, a_shape[-1]) if from_codes and w.planes is not None else 0
        if chans == 0:          # no output: one zero panel still yields the row sums
            k, panels = 1, np.zeros(depth * _PANEL, np.uint64)
        elif compact:
            depth = compact
            panels = w.window_panels(a_shape[-1])
            chunk = a_shape[-1] // 8
        n_panels = -(-max(chans, 1) // _PANEL)
        self.from_codes, self.m, self.k, self.chans, self.depth, self.panels = from_codes, m, k, chans, depth, panels
        self.chunk, self.n_pix, self.n_panels = chunk, n_pix, n_panels
        self.fused = with_epilogue and chans > 0 and depth > 0 and n_pix > 0
        self.kh, self.kw, self.stride, self.top, self.left = kh, kw, stride, top, left
        self.out_shape = tuple(out_shape)
        word_pairs = n_pix * m * k * depth * n_panels * _PANEL
        # with the spinning team of .threads a hand-off costs a few us: from 256K word pairs two threads win
        # (batch 1, the pipeline's steps, medians of 200-2000 predicts, 3 rounds alternating with a 3M threshold:
        # SVHN's conv1 41 -> 36 us and conv2 49 -> 43 us, AlexNet's conv3 305 -> 195 us and conv4 223 -> 155 us);
        # smaller layers (SVHN's 7 x 7 maps) lose to the hand-off
        many = word_pairs > (1 << 18)
        self.threads = threads = num_threads() if many else 1
        self.pix_block, self.panel_block = _blocks(n_pix, n_panels, depth, m, k, threads)
        self.n_tasks = -(-n_pix // self.pix_block) * -(-n_panels // self.panel_block)
        self.padded_shape = (m, batch, top + height + bottom, left + width + right, cw)
        self.any_pads = any(pads)
        self.prep_threads = threads if m * batch * height * width * cw > (1 << 15) else 1
        # whole blocks of rows per task: handing out one row at a time made two threads slower than one
        # (the shared task counter's cache line moves between the cores for every row)
        rows = batch * height
        self.row_block = -(-rows // (8 * self.prep_threads))
        self.prep_tasks = -(-rows // self.row_block)
        # scratch of finished fused calls, (padded, sums, rowsum, counter): allocating and zeroing them took
        # about a tenth of a batch-1 SVHN layer.  A reused padded map's border is still zero and its sums'
        # border rows too: the kernels write only the interior.  Each call takes a set of its own (list
        # pop and append are atomic), so calls from two Python threads never share one
        self._spare = None if self.padded_shape and math.prod(self.padded_shape) > _SPARE_WORDS else []
        self._epilogue = (None, None)      # the last epilogue tuple and its converted arrays (see run)
        self._no_acc = np.empty((0, n_panels * _PANEL), np.int32)

    def run(self, a, epilogue, into):
        chans, n_pix = self.chans, self.n_pix
        if not self.fused:
            return self._unfused(a)
        last, head = self._epilogue
        if epilogue is not last:
            # callers that keep their epilogue tuple (the engine) convert it once; holding the tuple keeps its
            # id from going to another object, and one assignment of both keeps another thread's call apart
            ea, eb, ec, levels = epilogue
            head = (np.ascontiguousarray(ea, np.float64), np.ascontiguousarray(eb, np.float64),
                    np.ascontiguousarray(ec, np.float64), np.float32(levels or 0))
            self._epilogue = (epilogue, head)
        codes_out = epilogue[3] is not None
        if into is None:
            result, ld, offset = np.empty((n_pix, chans), np.uint8 if codes_out else np.float32), chans, 0
        else:
            result, offset = into
            ld = result.shape[-1]
        if codes_out:
            ep, fout, cout = 2, _NO_EPILOGUE[4], result.reshape(-1)
        else:
            ep, fout, cout = 1, result.reshape(-1), _NO_EPILOGUE[5]
        scratch = self._spare.pop() if self._spare else self._scratch()
        self._pack_and_sum(a, scratch, self._no_acc, ep, head + (fout, cout, ld, offset), "popcount+epilogue")
        if self._spare is not None:
            self._spare.append(scratch)
        return result if into is not None else result.reshape(self.out_shape + (chans,))

    def _pack_and_sum(self, a, scratch, acc, ep, ep_args, stage):
        """The two kernels of a call: the input into the padded planes and window sums of ``scratch``, then the
        popcount sums into ``acc`` (or, with ``ep`` > 0, through the epilogue ``ep_args``); profiled as ``pack``
        and ``stage``."""
        padded, sums, rowsum, counter = scratch
        if padded is None:      # planes without a border: the kernels read the input itself
            padded = a
        prof = profiling.current()
        if prof is not None:
            start = profiling.clock()
        self._launch(_pack_pad_worker if self.from_codes else _prep_worker, self.prep_tasks, self.prep_threads,
                     counter, self.row_block, a, padded, sums, self.top, self.left, self.kw)
        if prof is not None:
            middle = profiling.clock()
            prof.add("pack", middle - start)
        self._launch(_conv_worker, self.n_tasks, self.threads, counter, padded, sums, self.panels, self.k,
                     acc.reshape(-1), rowsum, self.kh, self.kw, self.stride, self.out_shape[-2], self.out_shape[-1],
                     self.pix_block, self.panel_block, self.chunk, ep, *ep_args)
        if prof is not None:
            prof.add(stage, profiling.clock() - middle)

    def _scratch(self):
        """A new (padded, sums, rowsum, counter) set for a call (see ``_spare``).  The padded planes' border
        must read as code 0: packing from codes writes only the interior."""
        shape = self.padded_shape
        if self.any_pads:
            padded = np.zeros(shape, np.uint64)
        else:
            padded = np.empty(shape, np.uint64) if self.from_codes else None
        return padded, np.zeros(shape[1] * shape[2] * shape[3], np.int32), np.zeros(self.n_pix, np.int32), \
            np.zeros(1, np.int64)

    @staticmethod
    def _launch(worker, n_tasks, threads, counter, *args):
        """``worker`` over its tasks: on this thread alone with its own ``counter`` (reset here), or on the team."""
        if threads == 1:
            counter[0] = 0
            worker(counter, n_tasks, *args)
        else:
            run_workers(worker, n_tasks, threads, *args)

    def _unfused(self, a):
        """acc and rowsum (new arrays: they are the result) of a call without an epilogue, or with nothing to fuse."""
        chans, n_pix = self.chans, self.n_pix
        acc = np.empty((n_pix, self.n_panels * _PANEL), np.int32)
        scratch = self._scratch()           # its rowsum is returned: the set is not kept
        rowsum = scratch[2]
        if self.depth == 0:     # no input channel: nothing to add up
            acc[:] = 0
        elif n_pix:
            self._pack_and_sum(a, scratch, acc, 0, _NO_EPILOGUE, "popcount")
        if acc.shape[1] != chans:
            acc = np.ascontiguousarray(acc[:, :chans])
        return acc.reshape(self.out_shape + (chans,)), rowsum.reshape(self.out_shape)


def _run(a, m, w, kernel, stride, pads, out_shape, epilogue=None, into=None):
    """acc int32 [*out_shape, C] and rowsum int32 [*out_shape] of the popcount convolution.

    ``a``: the input as bit planes, uint64 [m, B, H, W, Cw], or as its uint8 codes [B, H, W, C]
    (C-contiguous), packed here into the padded planes in the same pass that sums the codes.
    ``epilogue = (a, b, c, levels)`` (float64 ``[C]`` each, ``levels`` None or n): instead the layer's
    output ``float32(acc * a + (rowsum * b + c))`` [*out_shape, C], or its uint8 codes at ``levels``, made
    by each task from its block of ``acc`` while in cache (``_conv_worker``).  ``into = (array, offset)``
    (with an epilogue): write it into channels ``offset ..`` of ``array`` [*out_shape, C'] (see
    :func:`_check_into`) and return ``array``.
    """
    plan = _plan(a.shape, a.dtype == np.uint8, m, w, kernel, stride, pads, out_shape, epilogue is not None)
    return plan.run(a, epilogue, into)


def _plan(a_shape, from_codes, m, w, kernel, stride, pads, out_shape, with_epilogue):
    """The :class:`_Plan` kept with the weights ``w`` for these shapes and this thread count."""
    key = (a_shape, from_codes, m, kernel, stride, pads, out_shape, with_epilogue, num_threads())
    plan = w.plans.get(key)
    if plan is None:
        if len(w.plans) >= _PLANS_PER_WEIGHTS:
            w.plans.clear()
        plan = w.plans[key] = _Plan(a_shape, from_codes, m, w, kernel, stride, pads, out_shape, with_epilogue)
    return plan


# ------------------------------------------------------------------------------------- public API
def _check_codes(codes, bits, ndim):
    bits = int(bits)
    if not 1 <= bits <= 8:
        raise ValueError("bits must be in 1..8, got %d" % bits)
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != ndim:
        raise ValueError("codes must be uint8 with %d axes, got %s %s" % (ndim, codes.dtype, codes.shape))
    return np.ascontiguousarray(codes), bits


def gemm_popcount(a_planes, w_planes):
    """Fully-connected layer on bit planes.

    ``a_planes``: ``uint64 [m, N, Kw]`` (activation codes ``[N, K]`` packed); ``w_planes``:
    ``uint64 [k, C, Kw]`` (weight codes ``[C, K]`` packed) or :func:`prepare_weights` of it.
    Returns ``(acc, rowsum)``: ``acc`` int32 ``[N, C]`` = ``sum_K ia * q`` and ``rowsum`` int32 ``[N]``
    = ``sum_K ia``.
    """
    a = _check_planes("a_planes", a_planes, 3)
    w = prepare_weights(w_planes)
    m, n_rows, words = a.shape
    if len(w.shape) != 3 or w.shape[2] != words:
        raise ValueError("weight planes %s do not match activation planes %s (need [k, C, %d])"
                         % (w.shape, a.shape, words))
    acc, rowsum = _run(a.reshape(m, n_rows, 1, 1, words), m, w, (1, 1), 1, (0, 0, 0, 0), (n_rows, 1, 1))
    return acc.reshape(n_rows, -1), rowsum.reshape(n_rows)


def gemm_popcount_codes(codes, bits, w_planes, epilogue=None):
    """:func:`gemm_popcount` of ``pack_planes(codes, bits)``, packing in the kernel's own pass.

    ``codes``: ``uint8 [N, K]`` activation codes below ``2^bits`` (higher bits are ignored, as by
    :func:`pack_planes`).  ``epilogue``: as for :func:`conv_popcount_codes`.
    """
    codes, bits = _check_codes(codes, bits, 2)
    w = prepare_weights(w_planes)
    n_rows, width = codes.shape
    if len(w.shape) != 3 or w.shape[2] != -(-width // 64):
        raise ValueError("weight planes %s do not match %d activation codes per row (need [k, C, %d])"
                         % (w.shape, width, -(-width // 64)))
    done = _run(codes.reshape(n_rows, 1, 1, width), bits, w, (1, 1), 1, (0, 0, 0, 0), (n_rows, 1, 1), epilogue)
    if epilogue is not None and not isinstance(done, tuple):
        return done.reshape(n_rows, -1)
    acc, rowsum = done
    if epilogue is not None:        # nothing to sum (no input or output channels): the epilogue in numpy
        return _numpy_epilogue(acc.reshape(n_rows, -1), rowsum.reshape(n_rows), epilogue)
    return acc.reshape(n_rows, -1), rowsum.reshape(n_rows)


def _numpy_epilogue(acc, rowsum, epilogue):
    """The epilogue of :func:`_run` on whole arrays (the degenerate shapes the kernel does not take)."""
    a, b, c, levels = epilogue
    return affine_accumulators(acc, rowsum, np.asarray(a, np.float64), np.asarray(b, np.float64),
                               np.asarray(c, np.float64), levels=levels)


def _conv_geometry(kernel, stride, pads, w_planes, height, width, cw, what):
    kh, kw = (int(v) for v in kernel)
    stride = int(stride)
    pads = tuple(int(v) for v in pads)
    if kh < 1 or kw < 1 or stride < 1 or len(pads) != 4 or min(pads) < 0:
        raise ValueError("bad kernel %s / stride %d / pads %s" % ((kh, kw), stride, pads))
    w = prepare_weights(w_planes)
    if len(w.shape) != 5 or w.shape[2:] != (kh, kw, cw):
        raise ValueError("weight planes %s do not match kernel %s and %s (need [k, Cout, %d, %d, %d])"
                         % (w.shape, (kh, kw), what, kh, kw, cw))
    top, bottom, left, right = pads
    out_h = (height + top + bottom - kh) // stride + 1
    out_w = (width + left + right - kw) // stride + 1
    if out_h < 1 or out_w < 1:
        raise ValueError("kernel %s larger than the padded map %s" % ((kh, kw), (height, width)))
    return w, (kh, kw), stride, pads, (out_h, out_w)


def conv_popcount(a_planes, w_planes, kernel, stride, pads):
    """NHWC convolution (TF ``conv2d``: cross-correlation) on bit planes, zero padding (code 0).

    ``a_planes``: ``uint64 [m, B, H, W, Cw]`` (activation codes ``[B, H, W, Cin]`` packed);
    ``w_planes``: ``uint64 [k, Cout, kh, kw, Cw]`` (weight codes ``[Cout, kh, kw, Cin]`` packed) or
    :func:`prepare_weights` of it; ``kernel = (kh, kw)``; ``stride``: int; ``pads = (top, bottom,
    left, right)``.  Returns ``(acc, rowsum)``: ``acc`` int32 ``[B, Ho, Wo, Cout]`` = sum over the
    window and channels of ``ia * q``, ``rowsum`` int32 ``[B, Ho, Wo]`` = sum of the codes in each
    window; ``Ho = (H + top + bottom - kh) // stride + 1``, likewise ``Wo``.
    """
    a = _check_planes("a_planes", a_planes, 5)
    m, batch, height, width, cw = a.shape
    w, kernel, stride, pads, out_hw = _conv_geometry(kernel, stride, pads, w_planes, height, width, cw,
                                                     "activation planes %s" % (a.shape,))
    return _run(a, m, w, kernel, stride, pads, (batch,) + out_hw)


def conv_popcount_codes(codes, bits, w_planes, kernel, stride, pads, epilogue=None, out=None, out_offset=0):
    """:func:`conv_popcount` of ``pack_planes(codes, bits)``, packing in the kernel's own pass.

    ``epilogue = (a, b, c, levels)``: return instead the layer's output ``float32(acc * a + (rowsum * b +
    c))`` per channel (float64 ``[Cout]`` each), or with ``levels`` = n its uint8 codes ``rint(clip(y, 0, 1)
    * n)``, as :func:`packed.elementwise.affine_accumulators` of ``(acc, rowsum)``: computed by the kernel's
    tasks on their blocks of ``acc`` while in cache, not in a pass of its own over the whole output.
    ``out`` (with an epilogue): a C-contiguous ``[B, Ho, Wo, C']`` array of the result's dtype that receives
    it in channels ``out_offset .. out_offset + Cout - 1`` (one group of a grouped convolution written in
    place, with no copy of the groups into one map); ``out`` is returned.

    ``codes``: ``uint8 [B, H, W, Cin]`` activation codes below ``2^bits`` (higher bits are ignored, as
    by :func:`pack_planes`).  The codes are packed
    straight into the zero-padded planes the kernel reads, by the pass that also sums each window's
    codes, instead of packing, then copying into the padded planes, then summing.
    """
    codes, bits = _check_codes(codes, bits, 4)
    batch, height, width, chans = codes.shape
    w, kernel, stride, pads, out_hw = _conv_geometry(kernel, stride, pads, w_planes, height, width,
                                                     -(-chans // 64), "activation codes %s" % (codes.shape,))
    into = None if out is None else _check_into(out, out_offset, (batch,) + out_hw, w.shape[1], epilogue)
    done = _run(codes, bits, w, kernel, stride, pads, (batch,) + out_hw, epilogue, into)
    if epilogue is not None and isinstance(done, tuple):
        result = _numpy_epilogue(*done, epilogue)
        if out is None:
            return result
        out[..., out_offset:out_offset + result.shape[-1]] = result
        return out
    return done


def conv_codes_plan(codes_shape, bits, w_planes, kernel, stride, pads):
    """The checked plan of :func:`conv_popcount_codes` with an epilogue, for codes of ``codes_shape``; None
    where that call would not fuse its epilogue (no channels, no pixels).

    ``plan.run(codes, epilogue, into)`` is then that call for C-contiguous uint8 ``codes`` of that shape and
    ``into = (out, offset)`` (or None) of the right shape and dtype, without checking its arguments again:
    the checks took about 5 us of every call, a sixth of a batch-1 layer of the SVHN net.
    """
    bits = int(bits)
    if not 1 <= bits <= 8 or len(codes_shape) != 4:
        raise ValueError("bits must be in 1..8 and codes [B, H, W, C], got %d and %s" % (bits, codes_shape))
    batch, height, width, chans = codes_shape
    w, kernel, stride, pads, out_hw = _conv_geometry(kernel, stride, pads, w_planes, height, width,
                                                     -(-chans // 64), "activation codes %s" % (codes_shape,))
    plan = _plan(tuple(codes_shape), True, bits, w, kernel, stride, pads, (batch,) + out_hw, True)
    return plan if plan.fused else None


def _check_into(out, offset, out_shape, chans, epilogue):
    """``(out, offset)`` for :func:`_run` after checking that the epilogue's result fits there."""
    if epilogue is None:
        raise ValueError("out is for a result with an epilogue (acc and rowsum are returned as new arrays)")
    dtype = np.float32 if epilogue[3] is None else np.uint8
    offset = int(offset)
    if not (isinstance(out, np.ndarray) and out.dtype == dtype and out.flags.c_contiguous
            and out.shape[:-1] == tuple(out_shape) and 0 <= offset and offset + chans <= out.shape[-1]):
        raise ValueError("out must be a C-contiguous %s array [%s, C] with channels %d .. %d, got %s %s"
                         % (np.dtype(dtype).name, ", ".join(map(str, out_shape)), offset, offset + chans - 1,
                            getattr(out, "dtype", type(out).__name__), getattr(out, "shape", "")))
    return out, offset


# ------------------------------------------------------------------------------------- references
def _exact_matmul(x, y, bound):
    """Integer x @ y through float64 BLAS when every partial sum is exact (< 2^53), else int64."""
    if bound < 2 ** 53:
        return np.rint(x.astype(np.float64) @ y.astype(np.float64)).astype(np.int64)
    return x.astype(np.int64) @ y.astype(np.int64)


def reference_gemm(a_planes, w_planes):
    """numpy reference of :func:`gemm_popcount` (int64 results) from the unpacked codes."""
    a_planes, w_planes = np.asarray(a_planes), np.asarray(w_planes)
    width = a_planes.shape[-1] * 64
    ia = unpack_planes(a_planes, width).astype(np.int64)           # [N, K]
    q = unpack_planes(w_planes, width).astype(np.int64)            # [C, K]
    bound = width * (2 ** a_planes.shape[0] - 1) * (2 ** w_planes.shape[0] - 1)
    return _exact_matmul(ia, q.T, bound), ia.sum(axis=1)


def reference_conv(a_planes, w_planes, kernel, stride, pads):
    """numpy reference of :func:`conv_popcount` (int64 results) from the unpacked codes."""
    a_planes, w_planes = np.asarray(a_planes), np.asarray(w_planes)
    kh, kw = kernel
    top, bottom, left, right = pads
    width = a_planes.shape[-1] * 64
    ia = unpack_planes(a_planes, width)                            # [B, H, W, Cin] uint8
    q = unpack_planes(w_planes, width).astype(np.int64)            # [Cout, kh, kw, Cin]
    ia = np.pad(ia, ((0, 0), (top, bottom), (left, right), (0, 0)))
    batch, height, wide, cin = ia.shape
    out_h = (height - kh) // stride + 1
    out_w = (wide - kw) // stride + 1
    q = q.reshape(q.shape[0], -1).T                                # [kh * kw * Cin, Cout]
    bound = q.shape[0] * (2 ** a_planes.shape[0] - 1) * (2 ** w_planes.shape[0] - 1)
    acc = np.empty((batch, out_h, out_w, q.shape[1]), np.int64)
    rowsum = np.empty((batch, out_h, out_w), np.int64)
    step = max(1, (1 << 22) // max(1, out_h * out_w * q.shape[0]))  # im2col of ~4M codes at a time
    for b0 in range(0, batch, step):
        part = ia[b0:b0 + step]
        cols = np.empty((part.shape[0], out_h, out_w, kh, kw, cin), np.int64)
        for dy in range(kh):
            for dx in range(kw):
                cols[:, :, :, dy, dx, :] = part[:, dy:dy + stride * (out_h - 1) + 1:stride,
                                                dx:dx + stride * (out_w - 1) + 1:stride, :]
        cols = cols.reshape(part.shape[0] * out_h * out_w, -1)
        acc[b0:b0 + step] = _exact_matmul(cols, q, bound).reshape(part.shape[0], out_h, out_w, -1)
        rowsum[b0:b0 + step] = cols.sum(axis=1).reshape(part.shape[0], out_h, out_w)
    return acc, rowsum
