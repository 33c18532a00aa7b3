"""The engine's float and per-element kernels against numpy references: direct convolution, quantizing, pooling."""
import numpy as np
import pytest

from dorefanet.packed import elementwise
from dorefanet.packed.float_conv import conv2d_affine


def _reference_conv(x, w, stride, pads):
    """TensorFlow's NHWC cross-correlation in float64."""
    top, bottom, left, right = pads
    x = np.pad(x.astype(np.float64), ((0, 0), (top, bottom), (left, right), (0, 0)))
    kh, kw, _, n_out = w.shape
    out_h, out_w = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, n_out))
    for ky in range(kh):
        for kx in range(kw):
            patch = x[:, ky:ky + (out_h - 1) * stride + 1:stride, kx:kx + (out_w - 1) * stride + 1:stride]
            out += patch @ w[ky, kx].astype(np.float64)
    return out


def _reference_codes(y, n):
    return np.rint(np.clip(y.astype(np.float32), np.float32(0), np.float32(1)) * np.float32(n))


# (batch, height, width, channels, kernel, out, stride, pads): the SVHN and AlexNet first layers' shapes
# (6-pixel tiles with no tail), tails of 1..5 pixels, 16-channel remainders, padding and uneven rows
CONV_SHAPES = [
    (2, 40, 40, 3, 5, 48, 1, (0, 0, 0, 0)),
    (1, 39, 39, 3, 11, 96, 4, (0, 0, 0, 0)),
    (3, 17, 13, 5, 3, 64, 2, (1, 1, 1, 1)),
    (2, 9, 11, 4, 3, 16, 1, (1, 1, 1, 1)),
    (1, 14, 14, 7, 7, 112, 2, (3, 2, 3, 2)),
    (2, 10, 12, 2, 2, 32, 3, (0, 0, 0, 0)),
    (3, 13, 11, 3, 7, 128, 2, (3, 3, 3, 3)),      # ResNet's conv1 in small: 64-channel tiles across rows and images
]


@pytest.mark.parametrize("shape", CONV_SHAPES, ids=[str(s[:6]) for s in CONV_SHAPES])
def test_direct_conv_matches_float64_reference(shape):
    batch, height, width, cin, k, n_out, stride, pads = shape
    rng = np.random.RandomState(sum(shape[:6]))
    x = rng.randn(batch, height, width, cin).astype(np.float32)
    w = rng.randn(k, k, cin, n_out).astype(np.float32)
    scale, shift = rng.randn(n_out).astype(np.float32), rng.randn(n_out).astype(np.float32)
    z = _reference_conv(x, w, stride, pads)
    got = conv2d_affine(x, w, scale, shift, stride, pads)
    assert got.dtype == np.float32 and got.shape == z.shape
    # float32 sums of k*k*cin terms: relative to the sum of the terms' magnitudes
    bound = _reference_conv(np.abs(x), np.abs(w), stride, pads) * np.abs(scale) * 1e-6 + 1e-6
    assert np.all(np.abs(got - (z * scale + shift)) <= bound)
    np.testing.assert_allclose(conv2d_affine(x, w, None, None, stride, pads), z, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("shape", CONV_SHAPES[:3], ids=[str(s[:6]) for s in CONV_SHAPES[:3]])
@pytest.mark.parametrize("levels", [1, 3, 15, 255])
def test_direct_conv_codes_are_the_quantized_floats(shape, levels):
    batch, height, width, cin, k, n_out, stride, pads = shape
    rng = np.random.RandomState(levels)
    x = rng.randn(batch, height, width, cin).astype(np.float32)
    w = rng.randn(k, k, cin, n_out).astype(np.float32)
    # scaled so that the outputs spread over [0, 1] and beyond on both sides
    scale = (rng.uniform(0.5, 1, n_out) / np.sqrt(k * k * cin) / 3).astype(np.float32)
    shift = np.full(n_out, 0.5, np.float32)
    floats = conv2d_affine(x, w, scale, shift, stride, pads)
    codes = conv2d_affine(x, w, scale, shift, stride, pads, levels=levels)
    assert codes.dtype == np.uint8
    np.testing.assert_array_equal(codes, _reference_codes(floats, levels))
    assert 0 < (codes == 0).mean() < 1 and (codes == levels).any()


def test_direct_conv_refuses_channels_not_a_multiple_of_16():
    with pytest.raises(ValueError, match="multiple of 16"):
        conv2d_affine(np.zeros((1, 4, 4, 3), np.float32), np.zeros((3, 3, 3, 24), np.float32), None, None, 1,
                      (0, 0, 0, 0))


@pytest.mark.parametrize("levels", [1, 3, 15, 255])
def test_quantize_rounds_half_to_even_like_the_graph(levels):
    n = np.float32(levels)
    rng = np.random.RandomState(levels)
    # random values, exact boundaries k + 0.5 (ties go to even), their float32 neighbours, and out-of-range values
    boundaries = ((np.arange(levels) + np.float32(0.5)) / n).astype(np.float32)
    x = np.concatenate([rng.uniform(-0.3, 1.3, 100000).astype(np.float32), boundaries,
                        np.nextafter(boundaries, np.float32(0)), np.nextafter(boundaries, np.float32(1)),
                        np.array([-1e30, -0.0, 0, 1, 1e30], np.float32)])
    # shapes large enough to be split over threads and odd enough to leave remainders
    x = np.resize(x, (3, 301, 211))
    np.testing.assert_array_equal(elementwise.quantize(x, levels), _reference_codes(x, levels))


@pytest.mark.parametrize("levels", [None, 3])
def test_affine_accumulators_float_and_codes(levels):
    rng = np.random.RandomState(5)
    acc = rng.randint(-500, 500, (4, 7, 9, 40)).astype(np.int32)
    sums = rng.randint(0, 300, (4, 7, 9)).astype(np.int64)
    a, b, c = rng.randn(40) * 1e-3, rng.randn(40) * 1e-3, rng.randn(40) * 0.3 + 0.5
    want = (acc * a + (sums[..., None] * b + c)).astype(np.float32)
    got = elementwise.affine_accumulators(acc, sums, a, b, c, levels=levels)
    if levels is None:
        np.testing.assert_array_equal(got, want)
    else:
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, _reference_codes(want, levels))


def _reference_maxpool(x, size, stride, pads):
    top, bottom, left, right = pads
    low = np.iinfo(x.dtype).min if x.dtype.kind in "iu" else -np.inf
    x = np.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)), constant_values=low)
    out_h, out_w = (x.shape[1] - size) // stride + 1, (x.shape[2] - size) // stride + 1
    return np.max([x[:, dy:dy + (out_h - 1) * stride + 1:stride, dx:dx + (out_w - 1) * stride + 1:stride]
                   for dy in range(size) for dx in range(size)], axis=0)


@pytest.mark.parametrize("size,stride,pads", [(2, 2, (0, 0, 0, 0)), (3, 2, (0, 0, 0, 0)), (3, 2, (1, 1, 1, 1)),
                                              (2, 2, (0, 1, 0, 1)), (3, 2, (0, 1, 0, 1)), (3, 3, (2, 2, 1, 1))])
# 48 and 64 channels take the 16-lane vector kernel (uint8 and float32), 20 the scalar one
@pytest.mark.parametrize("channels", [48, 64, 20])
def test_maxpool_floats_codes_and_fused_quantizing(size, stride, pads, channels):
    rng = np.random.RandomState(size + stride)
    x = rng.uniform(-0.5, 1.5, (5, 13, 12, channels)).astype(np.float32)
    pooled = elementwise.maxpool(x, size, stride, pads)
    np.testing.assert_array_equal(pooled, _reference_maxpool(x, size, stride, pads))
    codes = elementwise.quantize(x, 3)
    # quantizing is monotone, so pooling commutes with it: the engine pools codes and fuses the two
    np.testing.assert_array_equal(elementwise.maxpool(codes, size, stride, pads), _reference_codes(pooled, 3))
    np.testing.assert_array_equal(elementwise.maxpool(x, size, stride, pads, levels=3), _reference_codes(pooled, 3))


@pytest.mark.parametrize("size,stride", [(2, 2), (3, 2), (3, 3), (2, 1), (1, 2), (5, 1)])
@pytest.mark.parametrize("channels", [64, 16, 5])       # 16-lane vector kernel, and the scalar one
def test_avgpool_is_numpys_float32_window_mean(size, stride, channels):
    x = np.random.RandomState(size * stride + channels).randn(3, 11, 10, channels).astype(np.float32)
    view = np.lib.stride_tricks.sliding_window_view(x, (size, size), axis=(1, 2))[:, ::stride, ::stride]
    got = elementwise.avgpool(x, size, stride)
    assert got.dtype == np.float32
    # the engine's numpy expression before the kernel: the same float32 sums in the same order, bit for bit
    np.testing.assert_array_equal(got, view.mean(axis=(-2, -1), dtype=np.float32))
    with pytest.raises(ValueError, match="larger than the map"):
        elementwise.avgpool(x, 12, 1)


@pytest.mark.parametrize("dtype,mean,std", [(np.uint8, [123.68, 116.78, 103.94], [58.4, 57.1, 57.4]),
                                            (np.float32, None, 256.0)])
def test_normalize_is_numpys_float32_arithmetic(dtype, mean, std):
    x = np.random.RandomState(3).uniform(0, 255, (3, 17, 19, 3)).astype(dtype)
    want = x.astype(np.float32)
    if mean is not None:
        want = want - np.asarray(mean, np.float32)
    want = want / np.asarray(std, np.float32)
    got = elementwise.normalize(x, mean, std)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    # ResNet's input: normalised, then zero-padded 3 before and 2 after, in one pass
    padded = elementwise.normalize(x, mean, std, pad=(3, 2))
    np.testing.assert_array_equal(padded, np.pad(want, ((0, 0), (3, 2), (3, 2), (0, 0))))


@pytest.mark.parametrize("batch", [1, 5, 6, 13])
@pytest.mark.parametrize("n_out", [10, 48, 100])
def test_dense_matches_float64_reference(batch, n_out):
    from dorefanet.packed.float_conv import dense_affine, pad_dense_weights

    rng = np.random.RandomState(batch * n_out)
    v = rng.randn(batch, 300).astype(np.float32)
    w = rng.randn(300, n_out).astype(np.float32)
    scale, shift = rng.randn(n_out).astype(np.float32), rng.randn(n_out).astype(np.float32)
    got = dense_affine(v, pad_dense_weights(w), n_out, scale, shift)
    assert got.shape == (batch, n_out) and got.dtype == np.float32
    want = (v.astype(np.float64) @ w) * scale + shift
    bound = (np.abs(v).astype(np.float64) @ np.abs(w)) * np.abs(scale) * 1e-6 + 1e-6
    assert np.all(np.abs(got - want) <= bound)
    codes = dense_affine(v, pad_dense_weights(w), n_out, scale / 30, shift / 30 + 0.5, levels=3)
    np.testing.assert_array_equal(codes, _reference_codes(dense_affine(v, pad_dense_weights(w), n_out, scale / 30,
                                                                       shift / 30 + 0.5), 3))


def test_normalize_rows_are_kept_per_constants_and_width():
    """The repeated per-channel rows are cached: another mean, std or width must not get the first one's rows."""
    x = np.random.RandomState(4).uniform(0, 255, (1, 4, 5, 3)).astype(np.float32)
    for mean, std, width in [([1.0, 2.0, 3.0], [2.0, 4.0, 8.0], 5), ([3.0, 2.0, 1.0], [2.0, 4.0, 8.0], 5),
                             ([1.0, 2.0, 3.0], [8.0, 4.0, 2.0], 5), ([1.0, 2.0, 3.0], [2.0, 4.0, 8.0], 4)]:
        v = x[:, :, :width]
        want = (v - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
        np.testing.assert_array_equal(elementwise.normalize(v, mean, std), want)


@pytest.mark.parametrize("scale,shift", [("yes", "yes"), (None, "yes"), ("yes", None)])
def test_affine_clip_is_numpys_float32_batch_norm_then_clip(scale, shift):
    rng = np.random.RandomState(6)
    x = rng.randn(2, 3, 5, 24).astype(np.float32)
    s = rng.uniform(0.1, 2, 24).astype(np.float32) if scale else None
    b = rng.uniform(-0.5, 0.5, 24).astype(np.float32) if shift else None
    want = x * (np.float32(1) if s is None else s) + (np.float32(0) if b is None else b)
    want = np.clip(want, np.float32(0), np.float32(1))
    got = elementwise.affine_clip(x, s, b)
    assert got.dtype == np.float32 and 0 < np.mean((got > 0) & (got < 1)) < 1     # both clipped and kept values
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape,by", [((1, 7, 7, 512), 49.0), ((3, 5, 4, 20), 1.0), ((2, 1, 1, 8), 3.0)])
def test_global_average_is_numpys_float32_mean(shape, by):
    x = np.random.RandomState(7).uniform(0, 3, shape).astype(np.float32)
    want = x.mean(axis=(1, 2), dtype=np.float32) * np.float32(by)
    np.testing.assert_array_equal(elementwise.global_average(x, by), want)


@pytest.mark.parametrize("classes", [1, 10, 1000])
def test_softmax_rows_match_float64(classes):
    rng = np.random.RandomState(classes)
    x = (rng.randn(4, classes) * 8).astype(np.float32)
    x[1] += 80          # large logits: exp of the raw values would overflow float32
    got = elementwise.softmax(x)
    want = np.exp(x.astype(np.float64) - x.max(axis=1, keepdims=True))
    want /= want.sum(axis=1, keepdims=True)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-9)
    np.testing.assert_allclose(got.sum(axis=1), 1, rtol=1e-5)


def test_dense_clips_its_input_and_takes_kept_padded_affine():
    from dorefanet.packed.float_conv import dense_affine, pad_dense_affine, pad_dense_weights

    rng = np.random.RandomState(8)
    v = rng.randn(3, 64).astype(np.float32)
    w = pad_dense_weights(rng.randn(64, 10).astype(np.float32))
    scale, shift = rng.randn(10).astype(np.float32), rng.randn(10).astype(np.float32)
    want = dense_affine(np.clip(v, np.float32(0), np.float32(1)), w, 10, scale, shift)
    np.testing.assert_array_equal(dense_affine(v, w, 10, scale, shift, clip=True), want)
    kept = pad_dense_affine(scale, shift, w.shape[-1])
    np.testing.assert_array_equal(dense_affine(v, w, 10, None, None, clip=True, padded_affine=kept), want)
    assert not np.array_equal(dense_affine(v, w, 10, scale, shift), want)      # the clip changes the result
