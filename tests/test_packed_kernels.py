"""dorefanet.packed.kernels: bit planes and the popcount GEMM / convolution against plain numpy integer references.

The references here work on the integer codes (no bit planes): ``sum ia * q`` with int64 einsum, the
convolution window by window, and an independent packer built on ``np.packbits``.
"""
import numpy as np
import pytest

from dorefanet.packed import kernels

BITS = [(1, 1), (1, 2), (1, 4), (2, 2), (3, 2)]          # (k weight bits, m activation bits)


def codes(rng, bits, shape):
    return rng.integers(0, 2 ** bits, shape, dtype=np.uint8)


def packbits_planes(c, bits):
    """Reference packer: plane b = bit b of every code, little-endian in uint64 words, zero-padded."""
    width = c.shape[-1]
    words = -(-width // 64)
    padded = np.zeros(c.shape[:-1] + (words * 64,), np.uint8)
    padded[..., :width] = c
    planes = [np.packbits((padded >> b) & 1, axis=-1, bitorder="little").view("<u8") for b in range(bits)]
    return np.stack(planes).astype(np.uint64)


def gemm_reference(ia, q):
    """ia [N, K], q [C, K] -> (sum_K ia * q [N, C], sum_K ia [N]) in int64."""
    ia, q = ia.astype(np.int64), q.astype(np.int64)
    return np.einsum("nk,ck->nc", ia, q), ia.sum(axis=1)


def conv_reference(ia, q, kernel, stride, pads):
    """TF conv2d (NHWC cross-correlation) of codes ia [B, H, W, Cin] with q [Cout, kh, kw, Cin]."""
    kh, kw = kernel
    top, bottom, left, right = pads
    x = np.pad(ia.astype(np.int64), ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    acc = np.zeros((x.shape[0], out_h, out_w, q.shape[0]), np.int64)
    rowsum = np.zeros((x.shape[0], out_h, out_w), np.int64)
    for dy in range(kh):
        for dx in range(kw):
            window = x[:, dy:dy + stride * (out_h - 1) + 1:stride, dx:dx + stride * (out_w - 1) + 1:stride, :]
            acc += np.einsum("bhwc,oc->bhwo", window, q[:, dy, dx, :].astype(np.int64))
            rowsum += window.sum(axis=-1)
    return acc, rowsum


# ------------------------------------------------------------------------------------------ packing
@pytest.mark.parametrize("width", [1, 3, 48, 63, 64, 65, 128, 200])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_planes_layout_and_round_trip(width, bits):
    rng = np.random.default_rng(width * 10 + bits)
    c = codes(rng, bits, (2, 3, width))
    planes = kernels.pack_planes(c, bits)
    assert planes.dtype == np.uint64 and planes.shape == (bits, 2, 3, -(-width // 64))
    np.testing.assert_array_equal(planes, packbits_planes(c, bits))
    np.testing.assert_array_equal(kernels.unpack_planes(planes, width), c)


def test_pack_planes_bit_positions():
    # code c of a row is bit c % 64 of word c // 64 (little-endian), plane b holds bit b
    c = np.zeros((3, 130), np.uint8)
    c[0, 0] = 1           # plane 0, word 0, bit 0
    c[1, 64 + 5] = 2      # plane 1, word 1, bit 5
    c[2, 129] = 3         # planes 0 and 1, word 2, bit 1
    planes = kernels.pack_planes(c, 2)
    expected = np.zeros((2, 3, 3), np.uint64)
    expected[0, 0, 0] = 1
    expected[1, 1, 1] = 1 << 5
    expected[0, 2, 2] = expected[1, 2, 2] = 1 << 1
    np.testing.assert_array_equal(planes, expected)
    assert kernels.pack_planes(np.full((1, 64), 1, np.uint8), 1)[0, 0, 0] == np.uint64(2 ** 64 - 1)


def test_pack_planes_accepts_other_integer_dtypes_and_views():
    rng = np.random.default_rng(1)
    c = codes(rng, 3, (4, 5, 70))
    expected = kernels.pack_planes(c, 3)
    np.testing.assert_array_equal(kernels.pack_planes(c.astype(np.int64), 3), expected)
    wide = codes(rng, 3, (4, 5, 140))
    np.testing.assert_array_equal(kernels.pack_planes(wide[..., 70:], 3), packbits_planes(wide[..., 70:], 3))
    # bits at and above `bits` are ignored
    np.testing.assert_array_equal(kernels.pack_planes(c | 8, 3), expected)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_pack_planes_rejects_bad_bit_widths(bits):
    with pytest.raises(ValueError):
        kernels.pack_planes(np.zeros((2, 3), np.uint8), bits)


def test_pack_planes_empty():
    assert kernels.pack_planes(np.zeros((0, 5), np.uint8), 2).shape == (2, 0, 1)
    assert kernels.pack_planes(np.zeros((3, 0), np.uint8), 2).shape == (2, 3, 0)


# --------------------------------------------------------------------------------------------- GEMM
@pytest.mark.parametrize("k_bits,m_bits", BITS)
@pytest.mark.parametrize("n,c,depth", [(1, 70, 200), (5, 32, 64), (9, 300, 65), (2, 5, 3), (13, 64, 130)])
def test_gemm_popcount_matches_integer_reference(k_bits, m_bits, n, c, depth):
    rng = np.random.default_rng(n * 1000 + c + depth + 10 * k_bits + m_bits)
    ia, q = codes(rng, m_bits, (n, depth)), codes(rng, k_bits, (c, depth))
    acc, rowsum = kernels.gemm_popcount(kernels.pack_planes(ia, m_bits), kernels.pack_planes(q, k_bits))
    want_acc, want_rowsum = gemm_reference(ia, q)
    assert acc.dtype == np.int32 and acc.shape == (n, c) and rowsum.dtype == np.int32 and rowsum.shape == (n,)
    np.testing.assert_array_equal(acc, want_acc)
    np.testing.assert_array_equal(rowsum, want_rowsum)


def test_gemm_popcount_extremes_and_prepared_weights():
    # all-ones codes: every word 2^64 - 1, the largest sums (9216 * 7 * 3) still exact in int32
    ia = np.full((3, 9216), 7, np.uint8)
    q = np.full((40, 9216), 3, np.uint8)
    q[1] = 0
    w = kernels.pack_planes(q, 2)
    acc, rowsum = kernels.gemm_popcount(kernels.pack_planes(ia, 3), kernels.prepare_weights(w))
    want_acc, want_rowsum = gemm_reference(ia, q)
    np.testing.assert_array_equal(acc, want_acc)
    np.testing.assert_array_equal(rowsum, want_rowsum)
    assert acc[0, 0] == 9216 * 21 and acc[0, 1] == 0


def test_gemm_popcount_rejects_mismatched_planes():
    a = kernels.pack_planes(np.zeros((2, 100), np.uint8), 2)
    with pytest.raises(ValueError):
        kernels.gemm_popcount(a, kernels.pack_planes(np.zeros((3, 200), np.uint8), 1))
    with pytest.raises(ValueError):
        kernels.gemm_popcount(a.astype(np.int64), kernels.pack_planes(np.zeros((3, 100), np.uint8), 1))


# -------------------------------------------------------------------------------------- convolution
CONVS = [
    # batch, (H, W, Cin), Cout, (kh, kw), stride, (top, bottom, left, right)
    (2, (9, 7, 70), 24, (3, 2), 2, (1, 0, 2, 1)),
    (1, (5, 5, 3), 9, (5, 5), 1, (0, 0, 0, 0)),
    (3, (12, 12, 130), 40, (3, 3), 4, (2, 2, 1, 1)),
    (2, (6, 8, 64), 33, (1, 3), 1, (0, 0, 1, 1)),
    (1, (7, 7, 128), 64, (3, 3), 1, (1, 1, 1, 1)),
    (5, (4, 6, 48), 8, (2, 4), 2, (3, 0, 0, 2)),
]


@pytest.mark.parametrize("k_bits,m_bits", BITS)
@pytest.mark.parametrize("batch,shape,cout,kernel,stride,pads", CONVS)
def test_conv_popcount_matches_integer_reference(k_bits, m_bits, batch, shape, cout, kernel, stride, pads):
    rng = np.random.default_rng(batch + shape[0] * 7 + cout * 31 + stride + k_bits * 3 + m_bits)
    ia = codes(rng, m_bits, (batch,) + shape)
    q = codes(rng, k_bits, (cout,) + kernel + shape[-1:])
    acc, rowsum = kernels.conv_popcount(kernels.pack_planes(ia, m_bits), kernels.pack_planes(q, k_bits),
                                        kernel, stride, pads)
    want_acc, want_rowsum = conv_reference(ia, q, kernel, stride, pads)
    assert acc.dtype == np.int32 and rowsum.dtype == np.int32
    assert acc.shape == want_acc.shape and rowsum.shape == want_rowsum.shape
    np.testing.assert_array_equal(acc, want_acc)
    np.testing.assert_array_equal(rowsum, want_rowsum)


def test_conv_popcount_fully_connected_as_one_by_one_and_prepared_weights():
    rng = np.random.default_rng(5)
    ia, q = codes(rng, 2, (4, 1, 1, 300)), codes(rng, 1, (70, 1, 1, 300))
    w = kernels.prepare_weights(kernels.pack_planes(q, 1))
    acc, rowsum = kernels.conv_popcount(kernels.pack_planes(ia, 2), w, (1, 1), 1, (0, 0, 0, 0))
    want_acc, want_rowsum = gemm_reference(ia.reshape(4, 300), q.reshape(70, 300))
    np.testing.assert_array_equal(acc.reshape(4, 70), want_acc)
    np.testing.assert_array_equal(rowsum.reshape(4), want_rowsum)


def test_conv_popcount_rejects_bad_arguments():
    a = kernels.pack_planes(np.zeros((1, 4, 4, 10), np.uint8), 2)
    w = kernels.pack_planes(np.zeros((3, 3, 3, 10), np.uint8), 1)
    with pytest.raises(ValueError):
        kernels.conv_popcount(a, w, (3, 2), 1, (0, 0, 0, 0))        # kernel does not match the planes
    with pytest.raises(ValueError):
        kernels.conv_popcount(a, kernels.pack_planes(np.zeros((3, 5, 5, 10), np.uint8), 1), (5, 5), 1,
                              (0, 0, 0, 0))                            # larger than the map
    with pytest.raises(ValueError):
        kernels.conv_popcount(a, w, (3, 3), 0, (0, 0, 0, 0))        # stride
    with pytest.raises(ValueError):
        kernels.conv_popcount(a, w, (3, 3), 1, (0, -1, 0, 0))       # pads


@pytest.mark.parametrize("k_bits,m_bits", BITS)
@pytest.mark.parametrize("batch,shape,cout,kernel,stride,pads", CONVS)
def test_conv_popcount_codes_matches_integer_reference(k_bits, m_bits, batch, shape, cout, kernel, stride, pads):
    """Packing inside the kernel's pass: same sums as the reference; code bits at and above m are ignored
    (as pack_planes ignores them), and channel counts that are not whole words reach the array's end."""
    rng = np.random.default_rng(batch + shape[0] * 5 + cout * 17 + stride + k_bits * 3 + m_bits)
    raw = rng.integers(0, 256, (batch,) + shape, dtype=np.uint8)
    ia = raw & np.uint8(2 ** m_bits - 1)
    q = codes(rng, k_bits, (cout,) + kernel + shape[-1:])
    acc, rowsum = kernels.conv_popcount_codes(raw, m_bits, kernels.pack_planes(q, k_bits), kernel, stride, pads)
    want_acc, want_rowsum = conv_reference(ia, q, kernel, stride, pads)
    assert acc.dtype == np.int32 and rowsum.dtype == np.int32
    assert acc.shape == want_acc.shape and rowsum.shape == want_rowsum.shape
    np.testing.assert_array_equal(acc, want_acc)
    np.testing.assert_array_equal(rowsum, want_rowsum)


@pytest.mark.parametrize("k_bits,m_bits", [(1, 2), (3, 2), (1, 1)])
@pytest.mark.parametrize("batch,shape,cout,kernel,pads,words", [
    (3, (18, 18, 48), 64, (3, 3), (1, 1, 1, 1), 7),     # SVHN conv1: 9 words of 48 bits -> 7
    (2, (9, 9, 48), 40, (5, 5), (2, 2, 2, 2), 19),      # AlexNet's conv1 groups: 25 -> 19
    (2, (7, 6, 8), 33, (3, 3), (1, 1, 1, 1), 2),        # one byte per pixel
    (2, (6, 6, 24), 5, (2, 2), (0, 1, 0, 1), 2),        # windows ending inside a word
    (1, (6, 7, 96), 70, (5, 5), (2, 2, 2, 2), 38),      # two words per pixel, half of the second used
    (2, (5, 5, 112), 9, (3, 2), (1, 0, 0, 1), 11),      # non-square, one-sided padding
    (2, (5, 4, 40), 3, (1, 3), (0, 0, 1, 1), 2),        # a single row
])
def test_conv_popcount_codes_compact_windows(k_bits, m_bits, batch, shape, cout, kernel, pads, words):
    """Channel counts that leave words part empty: the kernel reads the windows without the gaps."""
    assert kernels.compact_window_words(kernel, 1, shape[-1]) == words
    rng = np.random.default_rng(shape[-1] * 7 + cout + k_bits + m_bits)
    ia = codes(rng, m_bits, (batch,) + shape)
    q = codes(rng, k_bits, (cout,) + kernel + shape[-1:])
    w = kernels.prepare_weights(kernels.pack_planes(q, k_bits))
    want_acc, want_rowsum = conv_reference(ia, q, kernel, 1, pads)
    for _ in range(2):              # the second call uses the weights' cached window layout
        acc, rowsum = kernels.conv_popcount_codes(ia, m_bits, w, kernel, 1, pads)
        np.testing.assert_array_equal(acc, want_acc)
        np.testing.assert_array_equal(rowsum, want_rowsum)


def test_compact_windows_only_where_they_save_words():
    assert kernels.compact_window_words((3, 3), 1, 64) == 0          # whole words already
    assert kernels.compact_window_words((3, 3), 1, 128) == 0
    assert kernels.compact_window_words((3, 3), 2, 48) == 0          # stride 2: the plain layout
    assert kernels.compact_window_words((3, 3), 1, 70) == 0          # pixels not whole bytes
    assert kernels.compact_window_words((1, 1), 1, 48) == 0          # one pixel: nothing to gain


def test_conv_popcount_codes_on_several_threads_and_of_a_channel_slice():
    """Big enough for both threads and several rows per task; a non-contiguous channel slice (a
    grouped convolution's input) gives the sums of its own codes."""
    rng = np.random.default_rng(14)
    ia, q = codes(rng, 2, (16, 18, 18, 96)), codes(rng, 1, (64, 3, 3, 48))
    w = kernels.prepare_weights(kernels.pack_planes(q, 1))
    for group in (ia[..., :48], ia[..., 48:]):
        acc, rowsum = kernels.conv_popcount_codes(group, 2, w, (3, 3), 1, (1, 1, 1, 1))
        want_acc, want_rowsum = conv_reference(np.ascontiguousarray(group), q, (3, 3), 1, (1, 1, 1, 1))
        np.testing.assert_array_equal(acc, want_acc)
        np.testing.assert_array_equal(rowsum, want_rowsum)


@pytest.mark.parametrize("n,c,depth", [(1, 70, 200), (9, 300, 65), (2, 5, 3), (300, 64, 130)])
def test_gemm_popcount_codes_matches_integer_reference(n, c, depth):
    rng = np.random.default_rng(n + c + depth)
    ia, q = codes(rng, 2, (n, depth)), codes(rng, 1, (c, depth))
    acc, rowsum = kernels.gemm_popcount_codes(ia, 2, kernels.pack_planes(q, 1))
    want_acc, want_rowsum = gemm_reference(ia, q)
    np.testing.assert_array_equal(acc, want_acc)
    np.testing.assert_array_equal(rowsum, want_rowsum)


def epilogue_reference(acc, rowsum, a, b, c, levels):
    """float32(acc * a + (rowsum * b + c)) in float64, or its codes rint(clip(y, 0, 1) * levels), in numpy."""
    y = (acc.astype(np.float64) * a + (rowsum.astype(np.float64)[..., None] * b + c)).astype(np.float32)
    if levels is None:
        return y
    return np.rint(np.clip(y, np.float32(0), np.float32(1)) * np.float32(levels)).astype(np.uint8)


@pytest.mark.parametrize("levels", [None, 3, 15])
@pytest.mark.parametrize("batch,shape,cout,kernel,stride,pads", [
    (16, (18, 18, 48), 64, (3, 3), 1, (1, 1, 1, 1)),    # compact windows, both threads, several tasks
    (3, (12, 12, 130), 40, (3, 3), 4, (2, 2, 1, 1)),     # a partial panel (40 = 32 + 8 channels)
    (2, (7, 7, 128), 70, (3, 3), 1, (0, 0, 0, 0)),
])
def test_fused_epilogue_equals_the_epilogue_of_the_sums(levels, batch, shape, cout, kernel, stride, pads):
    """The affine map (and quantizing) that the kernel's tasks apply on their blocks: bit-equal to the numpy
    map of the returned sums, for every pixel and channel (tasks, panels and channel tails included)."""
    rng = np.random.default_rng(cout + shape[-1] + (levels or 0))
    ia, q = codes(rng, 2, (batch,) + shape), codes(rng, 1, (cout,) + kernel + shape[-1:])
    w = kernels.prepare_weights(kernels.pack_planes(q, 1))
    # scales that put the outputs across [0, 1] and beyond, so that clipping and every code occur
    depth = kernel[0] * kernel[1] * shape[-1]
    a = rng.uniform(-2, 2, cout) / depth
    b, c = rng.uniform(-1, 1, cout) / depth, rng.uniform(-0.5, 1.5, cout)
    acc, rowsum = kernels.conv_popcount_codes(ia, 2, w, kernel, stride, pads)
    want = epilogue_reference(acc, rowsum, a, b, c, levels)
    got = kernels.conv_popcount_codes(ia, 2, w, kernel, stride, pads, epilogue=(a, b, c, levels))
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    if levels is not None:                      # both clips and codes in between occur
        assert got.min() == 0 and got.max() == levels and len(np.unique(got)) > 2


@pytest.mark.parametrize("levels", [None, 3])
def test_fused_epilogue_into_channels_of_a_wider_output(levels):
    """Two groups written into one output at their channel offsets equal the two results side by side; the
    channels outside a group are left as they were."""
    rng = np.random.default_rng(21)
    ia = codes(rng, 2, (4, 9, 9, 96))
    dtype = np.float32 if levels is None else np.uint8
    out = np.full((4, 9, 9, 2 * 40 + 5), 7, dtype)
    parts = []
    for g in range(2):
        q = codes(rng, 1, (40, 3, 3, 48))
        w = kernels.prepare_weights(kernels.pack_planes(q, 1))
        ep = (rng.uniform(-1, 1, 40) / 432, rng.uniform(-1, 1, 40) / 432, rng.uniform(0, 1, 40), levels)
        group = np.ascontiguousarray(ia[..., 48 * g:48 * (g + 1)])
        parts.append(kernels.conv_popcount_codes(group, 2, w, (3, 3), 1, (1, 1, 1, 1), epilogue=ep))
        assert kernels.conv_popcount_codes(group, 2, w, (3, 3), 1, (1, 1, 1, 1), epilogue=ep, out=out,
                                           out_offset=40 * g) is out
    np.testing.assert_array_equal(out[..., :80], np.concatenate(parts, axis=-1))
    np.testing.assert_array_equal(out[..., 80:], np.full((4, 9, 9, 5), 7, dtype))


def test_a_plan_keeps_nothing_of_one_call_for_the_next():
    """A batch-1 plan keeps its padded planes, window sums and converted epilogue for its next call: calls
    on other codes and with other epilogues, in turn and from two Python threads at once, each give what
    the reference gives for their own arguments."""
    import threading

    rng = np.random.default_rng(5)
    w = kernels.prepare_weights(kernels.pack_planes(codes(rng, 1, (64, 3, 3, 48)), 1))
    inputs = [codes(rng, 2, (1, 10, 10, 48)) for _ in range(4)]
    epilogues = [(rng.uniform(-1, 1, 64) / 432, rng.uniform(-1, 1, 64) / 432, rng.uniform(0, 1, 64), levels)
                 for levels in (3, None)]
    want = {}
    for i, x in enumerate(inputs):
        acc, rowsum = kernels.conv_popcount_codes(x, 2, w, (3, 3), 1, (1, 1, 1, 1))
        for e, ep in enumerate(epilogues):
            want[i, e] = epilogue_reference(acc, rowsum, *ep)
    plan = kernels.conv_codes_plan(inputs[0].shape, 2, w, (3, 3), 1, (1, 1, 1, 1))
    assert plan.threads == 1 and plan._spare is not None     # the batch-1 path: one thread, scratch kept
    for _ in range(2):
        for i, x in enumerate(inputs):
            for e, ep in enumerate(epilogues):
                np.testing.assert_array_equal(plan.run(x, ep, None), want[i, e])
    wrong = []

    def calls(i, e):
        for _ in range(300):
            if not np.array_equal(plan.run(inputs[i], epilogues[e], None), want[i, e]):
                wrong.append((i, e))
                return

    workers = [threading.Thread(target=calls, args=(i, i % 2)) for i in (1, 2)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert not wrong


def test_fused_epilogue_into_rejects_a_wrong_output():
    w = kernels.pack_planes(np.zeros((8, 3, 3, 16), np.uint8), 1)
    x = np.zeros((1, 5, 5, 16), np.uint8)
    ep = (np.ones(8), np.ones(8), np.zeros(8), 3)
    for bad, offset in [(np.zeros((1, 5, 5, 8), np.float32), 0),       # float32 where codes are made
                        (np.zeros((1, 5, 5, 12), np.uint8), 5),         # channels 5 .. 12 do not fit
                        (np.zeros((1, 5, 5, 16), np.uint8)[..., :8], 0),  # not contiguous
                        (np.zeros((1, 3, 3, 8), np.uint8), 0)]:          # not the output's pixels
        with pytest.raises(ValueError, match="out must be"):
            kernels.conv_popcount_codes(x, 2, w, (3, 3), 1, (1, 1, 1, 1), epilogue=ep, out=bad, out_offset=offset)
    with pytest.raises(ValueError, match="epilogue"):
        kernels.conv_popcount_codes(x, 2, w, (3, 3), 1, (1, 1, 1, 1), out=np.zeros((1, 5, 5, 8), np.uint8))


def test_popcount_codes_reject_bad_arguments():
    w = kernels.pack_planes(np.zeros((3, 3, 3, 10), np.uint8), 1)
    with pytest.raises(ValueError, match="uint8"):
        kernels.conv_popcount_codes(np.zeros((1, 4, 4, 10), np.int32), 2, w, (3, 3), 1, (0, 0, 0, 0))
    with pytest.raises(ValueError, match="bits"):
        kernels.conv_popcount_codes(np.zeros((1, 4, 4, 10), np.uint8), 9, w, (3, 3), 1, (0, 0, 0, 0))
    with pytest.raises(ValueError, match="do not match"):
        kernels.conv_popcount_codes(np.zeros((1, 4, 4, 70), np.uint8), 2, w, (3, 3), 1, (0, 0, 0, 0))
    with pytest.raises(ValueError, match="do not match"):
        kernels.gemm_popcount_codes(np.zeros((2, 100), np.uint8), 2,
                                    kernels.pack_planes(np.zeros((3, 200), np.uint8), 1))


# ---------------------------------------------------------------------------------------- references
def test_module_references_match_the_test_references():
    """The bench checks the kernels with kernels.reference_*; they must agree with these."""
    rng = np.random.default_rng(9)
    ia, q = codes(rng, 3, (6, 100)), codes(rng, 2, (11, 100))
    got = kernels.reference_gemm(kernels.pack_planes(ia, 3), kernels.pack_planes(q, 2))
    for g, w in zip(got, gemm_reference(ia, q)):
        np.testing.assert_array_equal(g, w)
    ia, q = codes(rng, 2, (3, 8, 7, 20)), codes(rng, 1, (5, 3, 2, 20))
    got = kernels.reference_conv(kernels.pack_planes(ia, 2), kernels.pack_planes(q, 1), (3, 2), 2, (1, 2, 0, 1))
    for g, w in zip(got, conv_reference(ia, q, (3, 2), 2, (1, 2, 0, 1))):
        np.testing.assert_array_equal(g, w)


def test_outputs_do_not_depend_on_reused_memory():
    """The kernels write their output without zeroing it first: a freed buffer full of other values
    (which the allocator is likely to hand back for the same size) must not leak into the result."""
    rng = np.random.default_rng(11)
    ia, q = codes(rng, 3, (2, 6, 6, 64)), codes(rng, 2, (64, 3, 3, 64))
    want = conv_reference(ia, q, (3, 3), 1, (1, 1, 1, 1))[0]
    a, w = kernels.pack_planes(ia, 3), kernels.prepare_weights(kernels.pack_planes(q, 2))
    for _ in range(3):
        junk = np.full(want.size, 0x5A5A5A5A, np.int32)
        del junk
        np.testing.assert_array_equal(kernels.conv_popcount(a, w, (3, 3), 1, (1, 1, 1, 1))[0], want)


def test_large_call_on_several_threads_and_after_fork():
    """Big enough for the helper threads (dynamic task hand-out); a forked child gets its own pool."""
    import os
    import signal

    rng = np.random.default_rng(12)
    ia, q = codes(rng, 2, (8, 16, 16, 128)), codes(rng, 1, (64, 3, 3, 128))
    a, w = kernels.pack_planes(ia, 2), kernels.prepare_weights(kernels.pack_planes(q, 1))
    want = conv_reference(ia, q, (3, 3), 1, (1, 1, 1, 1))
    for got, expected in zip(kernels.conv_popcount(a, w, (3, 3), 1, (1, 1, 1, 1)), want):
        np.testing.assert_array_equal(got, expected)
    pid = os.fork()
    if pid == 0:                                    # child: must not wait on the parent's threads
        signal.alarm(60)
        ok = np.array_equal(kernels.conv_popcount(a, w, (3, 3), 1, (1, 1, 1, 1))[0], want[0])
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_no_input_channels():
    a = kernels.pack_planes(np.zeros((3, 0), np.uint8), 2)
    acc, rowsum = kernels.gemm_popcount(a, kernels.pack_planes(np.zeros((5, 0), np.uint8), 1))
    np.testing.assert_array_equal(acc, np.zeros((3, 5)))
    np.testing.assert_array_equal(rowsum, np.zeros(3))


def test_no_output_channels_and_int32_bound():
    rng = np.random.default_rng(13)
    ia = codes(rng, 2, (2, 5, 5, 10))
    acc, rowsum = kernels.conv_popcount(kernels.pack_planes(ia, 2), np.zeros((1, 0, 3, 3, 1), np.uint64),
                                        (3, 3), 1, (1, 1, 1, 1))
    assert acc.shape == (2, 5, 5, 0)
    np.testing.assert_array_equal(rowsum, conv_reference(ia, np.zeros((0, 3, 3, 10), np.uint8), (3, 3), 1,
                                                         (1, 1, 1, 1))[1])
    a = kernels.pack_planes(np.zeros((1, 40000), np.uint8), 8)          # 40000 * 255 * 255 > 2^31
    with pytest.raises(ValueError, match="int32"):
        kernels.gemm_popcount(a, kernels.pack_planes(np.zeros((1, 40000), np.uint8), 8))
