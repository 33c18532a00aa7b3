"""The quantizers of dorefa.py against independent numpy references (docs: quantizers.md)."""
import numpy as np
import pytest

from dorefa import get_dorefa, quantize, ternarize
from dorefanet.tf_setup import tf

SHAPES = [(7, 13), (3, 5, 4, 6)]
F32 = np.float32


# ---------------------------------------------------------------- numpy references
def q_ref(x, k):
    n = F32(2 ** k - 1)
    return (np.round(x.astype(F32) * n) / n).astype(F32)  # np.round: half to even, like tf.round


def fw_ref(w, k):
    """Forward value and d(sum(dy * fw(w)))/dw, computed by hand."""
    w = w.astype(np.float64)
    if k == 32:
        return w, lambda dy: dy
    if k == 1:
        E = np.mean(np.abs(w))
        return np.where(w >= 0, 1.0, -1.0) * E, lambda dy: dy
    s = np.tanh(w)
    M = np.max(np.abs(s))
    t = s / M * 0.5 + 0.5
    fwd = 2 * q_ref(t.astype(F32), k).astype(np.float64) - 1

    def grad(dy):
        g_t = 2 * dy                                  # straight through the rounding
        g_s = g_t * 0.5 / M                           # direct path
        j = np.unravel_index(np.argmax(np.abs(s)), s.shape)
        g_M = -np.sum(g_t * 0.5 * s) / M ** 2         # through the max normalisation
        g_s[j] += g_M * np.sign(s[j])
        return g_s * (1 - s ** 2)                     # through tanh
    return fwd, grad


def grad_of(sess, fn, x_val, dy_val, extra_feed=None):
    x = tf.placeholder(tf.float32, x_val.shape)
    y = fn(x)
    dy = tf.placeholder(tf.float32, x_val.shape)
    (gx,) = tf.gradients(y, x, grad_ys=dy)
    sess.run(tf.global_variables_initializer())
    feed = {x: x_val, dy: dy_val}
    feed.update(extra_feed or {})
    return sess.run([y, gx], feed)


def rand(shape, seed=0, scale=1.0):
    return (np.random.RandomState(seed).randn(*shape) * scale).astype(F32)


# ---------------------------------------------------------------- activations
@pytest.mark.parametrize("k", [1, 2, 4, 8, 32])
@pytest.mark.parametrize("shape", SHAPES)
def test_fa_forward_and_straight_through_gradient(session, k, shape):
    _, fa, _ = get_dorefa(32, k, 32)
    x = np.clip(rand(shape, 1) * 0.4 + 0.5, 0, 1).astype(F32)
    dy = rand(shape, 2)
    y, gx = grad_of(session, fa, x, dy)
    if k == 32:
        np.testing.assert_array_equal(y, x)
    else:
        # the integer codes are exact; TensorFlow may divide by n as a multiply
        # by 1/n, which moves the value by at most one float32 ulp
        n = 2 ** k - 1
        np.testing.assert_array_equal(np.round(y * n), np.round(x * F32(n)))
        np.testing.assert_allclose(y, q_ref(x, k), rtol=2e-7, atol=0)
    np.testing.assert_array_equal(gx, dy)
    assert y.dtype == np.float32 and y.shape == shape


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_quantize_on_rounding_boundaries_rounds_half_to_even(session, k):
    n = 2 ** k - 1
    # every half step j + 0.5 (exact in float32 after * n for these widths), plus the ends
    x = np.concatenate([(np.arange(n, dtype=F32) + F32(0.5)) / F32(n), [0, 1]]).astype(F32)
    x = x[np.newaxis]
    y = session.run(quantize(tf.constant(x), k))
    np.testing.assert_array_equal(np.round(y * n), np.round(x * F32(n)))
    np.testing.assert_allclose(y, q_ref(x, k), rtol=2e-7, atol=0)
    if k == 1:  # 0.5 -> 0 (half to even), not 1
        assert y[0, 0] == 0.0


def test_quantize_rejects_bad_width():
    with pytest.raises(ValueError, match="bit width"):
        quantize(tf.zeros([2, 2]), 0)


# ---------------------------------------------------------------- weights
@pytest.mark.parametrize("k", [1, 2, 4, 8, 32])
@pytest.mark.parametrize("shape", SHAPES)
def test_fw_forward_and_gradient(session, k, shape):
    fw, _, _ = get_dorefa(k, 32, 32)
    w = rand(shape, 3, scale=0.7)
    dy = rand(shape, 4)
    y, gw = grad_of(session, fw, w, dy)
    fwd, grad = fw_ref(w, k)
    np.testing.assert_allclose(y, fwd, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gw, grad(dy.astype(np.float64)), rtol=1e-4, atol=1e-5)
    assert y.dtype == np.float32 and y.shape == shape


def test_fw_multibit_values_lie_on_grid(session):
    fw, _, _ = get_dorefa(2, 32, 32)
    y = session.run(fw(tf.constant(rand((50, 40), 5))))
    assert set(np.round(np.unique(y) * 3, 5)) <= {-3.0, -1.0, 1.0, 3.0}


def test_bwn_sign_of_zero_is_plus_one_and_scale_is_mean_abs(session):
    fw, _, _ = get_dorefa(1, 32, 32)
    w = np.array([[0.0, -2.0, 0.5, 0.0], [1.5, -0.25, 0.0, 3.0]], F32)
    y = session.run(fw(tf.constant(w)))
    E = np.mean(np.abs(w))
    np.testing.assert_allclose(y, np.where(w >= 0, E, -E), rtol=1e-7)
    assert np.all(y[w == 0] > 0)


def test_bwn_scale_is_constant_for_the_gradient(session):
    # If E were differentiated, dW would gain sum(dy * sign(W)) * sign(W) / size.
    fw, _, _ = get_dorefa(1, 32, 32)
    w = rand((6, 5), 6)
    dy = np.ones_like(w)
    _, gw = grad_of(session, fw, w, dy)
    np.testing.assert_array_equal(gw, dy)


# ---------------------------------------------------------------- gradients
def fg_grad(session, k, dy_val, seed=0):
    _, _, fg = get_dorefa(32, 32, k)
    x = tf.placeholder(tf.float32, dy_val.shape)
    y = fg(x)
    (gx,) = tf.gradients(y, x, grad_ys=tf.constant(dy_val))
    return y, gx, x


@pytest.mark.parametrize("k", [1, 2, 4, 8, 32])
@pytest.mark.parametrize("shape", SHAPES)
def test_fg_forward_identity_and_backward_on_per_sample_grid(session, k, shape):
    dy = rand(shape, 7)
    dy[0] = 0.0  # a sample with no gradient at all must stay finite (0)
    x_val = rand(shape, 8)
    y, gx, x = fg_grad(session, k, dy)
    y_val, g = session.run([y, gx], {x: x_val})
    np.testing.assert_array_equal(y_val, x_val)
    assert g.shape == shape and g.dtype == np.float32
    assert np.all(np.isfinite(g))
    np.testing.assert_array_equal(g[0], 0.0)
    if k == 32:
        np.testing.assert_array_equal(g, dy)
        return
    n = 2 ** k - 1
    axes = tuple(range(1, len(shape)))
    m = np.max(np.abs(dy), axis=axes, keepdims=True)[1:]
    levels = (g[1:] / (2 * m) + 0.5) * n          # must be integers in [0, n]
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)
    assert levels.min() > -1e-3 and levels.max() < n + 1e-3


@pytest.mark.parametrize("k", [1, 2, 4])
def test_fg_stochastic_rounding_is_unbiased_inside_the_range(session, k):
    draws = 4000
    base = np.linspace(-0.8, 0.8, 9).astype(F32)
    base = np.concatenate([base, [1.0]]).astype(F32)  # the per-sample max, m = 1
    dy = np.tile(base, (draws, 1))
    _, gx, x = fg_grad(session, k, dy)
    g = session.run(gx, {x: np.zeros_like(dy)})
    mean = g.mean(axis=0)
    step = 2.0 / (2 ** k - 1)
    tol = 5 * (step / 2) / np.sqrt(draws)
    np.testing.assert_allclose(mean[:-1], base[:-1], atol=tol)
    assert len(np.unique(np.round(g[:, 4], 5))) > 1, "rounding must be stochastic"


def test_fg_rejects_rank_1(session):
    _, _, fg = get_dorefa(32, 32, 4)
    with pytest.raises(ValueError, match="rank >= 2"):
        fg(tf.zeros([5]))


# ---------------------------------------------------------------- TTQ
@pytest.mark.parametrize("shape", SHAPES)
def test_ternarize_forward_and_gradients(session, backward_path, shape):
    w_val = rand(shape, 9)
    dy_val = rand(shape, 10)
    wp_val, wn_val = 1.7, 0.6
    w = tf.placeholder(tf.float32, shape)
    with tf.variable_scope("layer"):
        y = ternarize(w)
    wp, wn = tf.global_variables()
    assert (wp.op.name, wn.op.name) == ("layer/Wp", "layer/Wn")
    g_w, g_p, g_n = tf.gradients(y, [w, wp, wn], grad_ys=tf.constant(dy_val))
    session.run(tf.global_variables_initializer())
    assert session.run([wp, wn]) == [1.0, 1.0]
    session.run([wp.assign(wp_val), wn.assign(wn_val)])
    y_v, gw, gp, gn = session.run([y, g_w, g_p, g_n], {w: w_val})

    d = 0.05 * np.max(np.abs(w_val))
    pos, neg = w_val > d, w_val < -d
    np.testing.assert_array_equal(y_v, np.where(pos, F32(wp_val), np.where(neg, -F32(wn_val), F32(0))))
    np.testing.assert_allclose(gw, np.where(pos, dy_val * wp_val, np.where(neg, dy_val * wn_val, dy_val)),
                               rtol=1e-6)
    np.testing.assert_allclose(gp, dy_val[pos].sum(), rtol=1e-4)
    np.testing.assert_allclose(gn, -dy_val[neg].sum(), rtol=1e-4)
    assert (~pos & ~neg).any(), "the test tensor must have weights inside the threshold"


def test_get_dorefa_t_uses_ternarize(session):
    fw, fa, fg = get_dorefa("t", 32, 32)
    with tf.variable_scope("conv1"):
        fw(tf.constant(rand((3, 3), 11)))
    assert sorted(v.op.name for v in tf.global_variables()) == ["conv1/Wn", "conv1/Wp"]


def test_many_widths_in_one_graph(session):
    x = tf.constant(np.clip(rand((4, 9), 12) * 0.3 + 0.5, 0, 1))
    outs = session.run([get_dorefa(32, k, 32)[1](x) for k in (1, 2, 3, 8)])
    for k, out in zip((1, 2, 3, 8), outs):
        assert len(np.unique(out)) <= 2 ** k


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize("bits", [
    (0, 2, 4), (-1, 2, 4), (33, 32, 32), (1, 64, 32), (1.5, 2, 4), (1, 2.0, 4), (True, 2, 4),
    ("t", 2, 32), ("t", 32, 8), (1, "t", 32), (1, 2, "t"), ("x", 2, 4), (None, 2, 4)])
def test_get_dorefa_rejects_invalid_widths(bits):
    with pytest.raises(ValueError) as err:
        get_dorefa(*bits)
    assert "bit width" in str(err.value) or "TTQ" in str(err.value)


@pytest.mark.parametrize("bits", [(1, 2, 6), (32, 32, 32), ("t", 32, 32), (np.int64(8), 8, 8), (31, 1, 1)])
def test_get_dorefa_accepts_valid_widths(bits):
    fw, fa, fg = get_dorefa(*bits)
    assert callable(fw) and callable(fa) and callable(fg)


# ---------------------------------------------------------------- the fast training paths
import dorefa  # noqa: E402
from dorefa import quantize_clipped  # noqa: E402


@pytest.fixture(params=[True, False], ids=["xla", "tf-ops"])
def backward_path(request, monkeypatch):
    """Build the quantizers' backward passes with XLA (the default) or from plain TensorFlow ops."""
    monkeypatch.setattr(dorefa, "USE_XLA", request.param)
    return request.param


def bits_of(a):
    return np.asarray(a, F32).view(np.uint32)


def clip_test_values():
    """Every special case of clip + quantize: ends, ties, NaN, infinities, signed zeros, denormals."""
    specials = [0.0, -0.0, 1.0, -1.0, 2.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1e-38, -1e-38,
                np.nextafter(F32(0), F32(1)), np.nextafter(F32(1), F32(0)), np.nextafter(F32(1), F32(2)),
                np.nextafter(F32(0), F32(-1))]
    ties = []
    for k in (1, 2, 3, 4, 8):
        n = F32(2 ** k - 1)
        half = (np.arange(2 ** k, dtype=F32) + F32(0.5)) / n
        ties += [half, np.nextafter(half, F32(2)), np.nextafter(half, F32(-1)), np.arange(2 ** k, dtype=F32) / n]
    rng = np.random.RandomState(20)
    sweep = [rng.uniform(-0.5, 1.5, 20000).astype(F32), np.linspace(-0.25, 1.25, 30001, dtype=F32),
             rng.randint(0, 2 ** 32, 20000, dtype=np.uint64).astype(np.uint32).view(F32)]
    return np.concatenate([np.array(specials, F32)] + ties + sweep).astype(F32)


def negative_zero_or_denormal(x):
    """Inputs that TensorFlow's fused QuantizeAndDequantizeV4 maps to -0.0 (clip_by_value: +0.0)."""
    return np.signbit(x) & (x > -np.finfo(F32).tiny)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8, 31, 32])
def test_quantize_clipped_forward_is_bit_identical_to_quantize_of_clip(session, backward_path, k):
    """Bit for bit, but for the fast path's -0.0 where clip_by_value gives +0.0 (same number)."""
    x_val = clip_test_values()
    x = tf.placeholder(tf.float32, [None])
    reference = quantize(tf.clip_by_value(x, 0.0, 1.0), k)
    y, ref = session.run([quantize_clipped(x, k), reference], {x: x_val})
    assert y.dtype == np.float32
    signed_zero = bits_of(y) != bits_of(ref)
    if backward_path and k < 32:
        np.testing.assert_array_equal(signed_zero, negative_zero_or_denormal(x_val))
        assert np.all(bits_of(y[signed_zero]) == bits_of(F32(-0.0))) and np.all(ref[signed_zero] == 0)
    else:
        assert not signed_zero.any()
    np.testing.assert_array_equal(bits_of(y[~signed_zero]), bits_of(ref[~signed_zero]))


@pytest.mark.parametrize("k", [1, 2, 4, 32])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_clipped_gradient_is_that_of_clip_by_value(session, backward_path, k, shape):
    """dy where 0 <= x <= 1 (both ends: tf.clip_by_value's Minimum/Maximum pass ties), else 0; NaN: 0.

    Checked against the gradient TensorFlow derives for quantize(clip_by_value(x)): bit for bit on the
    plain path; the fast path's dy * [0 <= x <= 1] gives -0.0 instead of 0 where dy < 0 outside.
    """
    size = int(np.prod(shape))
    x_val = np.resize(clip_test_values()[:400], size).reshape(shape)
    x_val.flat[:6] = [0.0, 1.0, -0.0, np.nan, np.inf, -np.inf]
    dy_val = rand(shape, 21)
    x = tf.placeholder(tf.float32, shape)
    dy = tf.constant(dy_val)
    (g,) = tf.gradients(quantize_clipped(x, k), x, grad_ys=dy)
    (g_ref,) = tf.gradients(quantize(tf.clip_by_value(x, 0.0, 1.0), k), x, grad_ys=dy)
    g, g_ref = session.run([g, g_ref], {x: x_val})
    with np.errstate(invalid="ignore"):
        x_ftz = np.where(np.abs(x_val) < np.finfo(F32).tiny, F32(0), x_val)  # TensorFlow flushes denormals
        inside = (x_ftz >= 0) & (x_ftz <= 1)
    signed_zero = bits_of(g) != bits_of(g_ref)
    if backward_path:
        np.testing.assert_array_equal(signed_zero, ~inside & (dy_val < 0))
        assert np.all(bits_of(g[signed_zero]) == bits_of(F32(-0.0)))
    else:
        assert not signed_zero.any()
    np.testing.assert_array_equal(g, np.where(inside, dy_val, 0.0))
    assert g.flat[0] == dy_val.flat[0] and g.flat[1] == dy_val.flat[1]  # x == 0 and x == 1 pass dy
    assert g.flat[3] == 0.0  # NaN


def test_quantize_clipped_rejects_bad_width():
    with pytest.raises(ValueError, match="bit width"):
        quantize_clipped(tf.zeros([2, 2]), 33)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_fg_grid_on_both_backward_paths(session, backward_path, k, shape):
    test_fg_forward_identity_and_backward_on_per_sample_grid(session, k, shape)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_fg_unbiased_on_both_backward_paths(session, backward_path, k):
    test_fg_stochastic_rounding_is_unbiased_inside_the_range(session, k)


def threefry2x32_ref(key, x0, x1, rounds):
    """Threefry-2x32 in numpy uint32 arithmetic, written from Salmon et al. (2011) / Random123's threefry.h."""
    rot = (13, 15, 26, 6, 17, 29, 16, 24)
    key = [np.uint32(k) for k in key]
    ks = key + [key[0] ^ key[1] ^ np.uint32(0x1BD11BDA)]
    x0, x1 = np.asarray(x0, np.uint32) + ks[0], np.asarray(x1, np.uint32) + ks[1]
    for r in range(rounds):
        x0 = x0 + x1
        x1 = ((x1 << np.uint32(rot[r % 8])) | (x1 >> np.uint32(32 - rot[r % 8]))) ^ x0
        if r % 4 == 3:
            i = (r + 1) // 4
            x0, x1 = x0 + ks[i % 3], x1 + ks[(i + 1) % 3] + np.uint32(i)
    return x0, x1


#: Random123's known-answer vectors (examples/kat_vectors): rounds, counter, key, output.
THREEFRY_KAT = [
    (13, (0, 0), (0, 0), (0x9d1c5ec6, 0x8bd50731)),
    (13, (0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff), (0xfd36d048, 0x2d17272c)),
    (13, (0x243f6a88, 0x85a308d3), (0x13198a2e, 0x03707344), (0xba3e4725, 0xf27d669e)),
    (20, (0, 0), (0, 0), (0x6b200159, 0x99ba4efe)),
    (20, (0xffffffff, 0xffffffff), (0xffffffff, 0xffffffff), (0x1cb996fc, 0xbb002be7)),
    (20, (0x243f6a88, 0x85a308d3), (0x13198a2e, 0x03707344), (0xc4923a9c, 0x483df7a0)),
]


@pytest.mark.parametrize("rounds, counter, key, expected", THREEFRY_KAT)
def test_threefry2x32_matches_random123_known_answers(session, rounds, counter, key, expected):
    u32 = lambda v: tf.constant([v], tf.uint32)  # noqa: E731
    xla = tf.function(lambda k0, k1, c0, c1: dorefa._threefry2x32(k0, k1, c0, c1, rounds),
                      jit_compile=True, autograph=False)
    out = session.run(xla(u32(key[0])[0], u32(key[1])[0], u32(counter[0]), u32(counter[1])))
    assert (int(out[0][0]), int(out[1][0])) == expected
    with np.errstate(over="ignore"):
        ref = threefry2x32_ref(key, [counter[0]], [counter[1]], rounds)
    assert (int(ref[0][0]), int(ref[1][0])) == expected


def threefry_words16_ref(key, size):
    """The first ``4 * ceil(size / 4)`` 16-bit words of fg's noise under ``key``: the low and high halves of block
    j's words x0 and x1 to elements 4j .. 4j + 3."""
    blocks = (size + 3) // 4
    with np.errstate(over="ignore"):
        x0, x1 = threefry2x32_ref(key, np.arange(blocks, dtype=np.uint32), np.zeros(blocks, np.uint32), 13)
    words = np.stack([x0, x1], axis=1).reshape(-1)
    return np.stack([words & np.uint32(0xFFFF), words >> np.uint32(16)], axis=1).reshape(-1).astype(np.uint16)


def fg_noise_ref(key, size):
    """fg's draws in [0, 1) for ``size`` elements under ``key``: (b + 1/2) / 2^16 for each 16-bit word b."""
    b = threefry_words16_ref(key, size)[:size].astype(np.float64)
    return ((b + 0.5) / 2 ** 16).astype(F32)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 1000])
def test_fg_noise_bits_are_threefry_13_words_in_counter_order(session, size):
    key = (0x01234567, 0x89abcdef)
    bits = session.run(dorefa._threefry_bits(tf.constant(key, tf.uint32), tf.constant(size)))
    assert bits.dtype == np.uint16 and bits.size == 4 * ((size + 3) // 4)
    np.testing.assert_array_equal(bits, threefry_words16_ref(key, size))


def test_fg_noise_to_uniform_is_the_centre_of_each_bin(session):
    b = np.arange(2 ** 16, dtype=np.uint16)
    r = session.run(dorefa._bits_to_uniform(tf.constant(b)))
    assert r.dtype == np.float32
    np.testing.assert_array_equal(r.astype(np.float64), (b + 0.5) / 2 ** 16)   # exact, all 2^16 words
    assert r.min() > 0 and r.max() < 1 and r.astype(np.float64).mean() == 0.5


def test_fg_noise_is_uniform_and_uncorrelated(session):
    """2^20 draws of fg's generator under one key: uniform over [0, 1), and no correlation between the words
    of a block or between neighbouring blocks.  Every bound is about 5 standard deviations (a fixed key, so the
    test is deterministic; a biased or correlated generator exceeds them)."""
    size = 1 << 20
    bits = session.run(dorefa._threefry_bits(tf.constant([2718281828, 3141592653], tf.uint32), tf.constant(size)))
    r = session.run(dorefa._bits_to_uniform(tf.constant(bits)))
    assert r.min() >= 0 and r.max() < 1
    assert abs(r.mean() - 0.5) < 5 * np.sqrt(1 / 12 / size)
    # chi-square over 1024 equal bins: mean 1023, sd sqrt(2 * 1023) ~ 45
    counts = np.bincount((r * 1024).astype(np.int64), minlength=1024)
    chi2 = np.sum((counts - size / 1024) ** 2 / (size / 1024))
    assert chi2 < 1023 + 5 * np.sqrt(2 * 1023), chi2
    # each of the 16 bits used is 1 half of the time
    used = bits.astype(np.int64)
    for b in range(dorefa.FG_NOISE_BITS):
        assert abs(((used >> b) & 1).mean() - 0.5) < 5 * 0.5 / np.sqrt(size), b
    c = r.astype(np.float64) - 0.5
    for lag in (1, 2, 3, 4, 5):   # the words of one block (lags 1-3), or of neighbouring blocks
        corr = np.mean(c[lag:] * c[:-lag]) / c.var()
        assert abs(corr) < 5 / np.sqrt(size), (lag, corr)


@pytest.mark.parametrize("k", [2, 4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_fg_xla_kernel_is_eq12_with_its_threefry_noise(session, k, shape):
    """The fused kernel computes eq. 12 with noise = r / n - 0.5 / n, r from 16 bits of Threefry-2x32-13."""
    n = 2 ** k - 1
    dy_val = rand(shape, 22)
    dy_val[1] = 0.0
    key = (123456789, 987654321)
    size = int(np.prod(shape))
    bits = dorefa._threefry_bits(tf.constant(key, tf.uint32), tf.constant(size))
    g = session.run(dorefa._fg_gradient_xla(float(n), len(shape))(tf.constant(dy_val), bits))
    r = fg_noise_ref(key, size).reshape(shape)
    distinct = 2 ** 16 * (1 - np.exp(-size / 2 ** 16))   # expected number of distinct words among size draws
    assert r.min() >= 0 and r.max() < 1 and len(np.unique(r)) > 0.95 * distinct
    axes = tuple(range(1, len(shape)))
    m = np.max(np.abs(dy_val), axis=axes, keepdims=True)
    noise = r * (F32(0.5 / n) - F32(-0.5 / n)) + F32(-0.5 / n)
    u = np.clip(dy_val / np.where(m > 0, m, F32(1)) * F32(0.5) + F32(0.5) + noise, 0, 1)
    levels_ref = np.round(u * F32(n))
    with np.errstate(invalid="ignore", divide="ignore"):
        levels = np.round((g / (2 * m) + 0.5) * n)
    keep = np.broadcast_to(m > 0, shape)
    # float32 ties may round apart by an ulp of contraction; virtually never
    assert np.mean(levels[keep] != levels_ref[keep]) < 1e-3
    np.testing.assert_array_equal(g[1], 0.0)


def test_fg_noise_is_fresh_per_call_and_step_and_follows_the_graph_seed(backward_path):
    dy_val = np.tile(np.linspace(-1, 1, 64, dtype=F32), (16, 1))

    def gradients(seed):
        graph = tf.Graph()
        with graph.as_default():
            tf.set_random_seed(seed)
            _, _, fg = get_dorefa(32, 32, 2)
            x = tf.zeros(dy_val.shape)
            g1 = tf.gradients(fg(x), x, grad_ys=tf.constant(dy_val))[0]
            g2 = tf.gradients(fg(x), x, grad_ys=tf.constant(dy_val))[0]
            with tf.Session(graph=graph) as sess:
                return [sess.run([g1, g2]) for _ in range(2)]

    (a1, a2), (b1, b2) = gradients(7)
    assert not np.array_equal(a1, a2), "two fg calls must draw different noise"
    assert not np.array_equal(a1, b1), "each step must draw new noise"
    (c1, c2), (d1, d2) = gradients(7)
    for u, v in ((a1, c1), (a2, c2), (b1, d1), (b2, d2)):
        np.testing.assert_array_equal(u, v)  # reproducible under tf.set_random_seed


def test_fg_rounding_decisions_are_independent_per_element(session, backward_path):
    # m = 1 and dy = 0 elsewhere: u = 0.5 + N lies mid-way between two levels, so each
    # element rounds up with probability 1/2, independently of its neighbours.
    rows, cols = 400, 257
    dy_val = np.zeros((rows, cols), F32)
    dy_val[:, 0] = 1.0
    _, _, fg = get_dorefa(32, 32, 2)
    x = tf.zeros(dy_val.shape)
    (g,) = tf.gradients(fg(x), x, grad_ys=tf.constant(dy_val))
    up = session.run(g)[:, 1:] > 0
    tol = 5 / np.sqrt(up.size)
    assert abs(up.mean() - 0.5) < tol
    b = up.astype(np.float64) - up.mean()
    for lag_rows, lag_cols in ((0, 1), (1, 0), (0, 2), (1, 1)):
        corr = np.mean(b[lag_rows:, lag_cols:] * b[:rows - lag_rows, :cols - 1 - lag_cols]) / b.var()
        assert abs(corr) < tol, (lag_rows, lag_cols, corr)


def fw_multibit_grad_ref(w, dy):
    """d(sum(dy * fw(w)))/dw for 1 < k < 32, with reduce_max's gradient split equally among tied maxima."""
    s = np.tanh(w.astype(np.float64))
    M = np.max(np.abs(s))
    maxima = np.abs(s) == M
    g_M = -np.sum(dy * s) / M ** 2
    return (dy / M + np.where(maxima, np.sign(s) * g_M / maxima.sum(), 0.0)) * (1 - s ** 2)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8, 12, 16])
def test_fw_xla_forward_matches_tensorflow_for_every_code(session, k):
    """XLA's value of 2 * quantize_k(s / M * 0.5 + 0.5) - 1 is TensorFlow's for every code 0..n, bit for bit
    (XLA would contract 2 * (c * (1/n)) - 1 into a fused multiply-add, rounding once where TensorFlow rounds
    twice, for some codes at every k >= 3)."""
    n = 2 ** k - 1
    codes = np.arange(n + 1, dtype=np.float64)
    s_val = np.concatenate([(2 * codes / n - 1).astype(F32), rand([5000], 5).clip(-1, 1)])
    s = tf.placeholder(tf.float32, [None])
    M = tf.placeholder(tf.float32, [])
    y = dorefa._weights_forward_xla(k)(s, M)
    ref = 2.0 * quantize(s / M * 0.5 + 0.5, k) - 1.0
    for m in (1.0, 0.75):
        got, want = session.run([y, ref], {s: s_val * F32(m), M: m})
        assert len(np.unique(want)) == n + 1
        np.testing.assert_array_equal(bits_of(got), bits_of(want))


@pytest.mark.parametrize("shape, maxima", [((5, 5, 8, 16), 2), ((40, 12), 7)])
@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_fw_forward_is_the_same_on_both_paths_and_gradients_agree(monkeypatch, k, shape, maxima):
    rng = np.random.RandomState(23)
    w_val = (rng.randn(*shape) * 0.3).astype(F32)
    w_val.flat[:4] = [0.0, -0.0, 1e-45, -1e-45]
    # tied maxima of |tanh|, among which dM is split: +-1.5, or +-12 where tanh saturates to exactly 1
    w_val.flat[100:100 + maxima] = [(1.5 if maxima == 2 else 12.0) * (-1) ** i for i in range(maxima)]
    dy_val = rng.randn(*w_val.shape).astype(F32)
    results = []
    for use_xla in (True, False):
        monkeypatch.setattr(dorefa, "USE_XLA", use_xla)
        graph = tf.Graph()
        with graph.as_default(), tf.Session(graph=graph) as sess:
            # fed, as weights are variables: a constant would be folded by grappler, which divides
            # by n where a session's graph multiplies by float32(1/n) (see quantize_clipped)
            w = tf.placeholder(tf.float32, w_val.shape)
            fw, _, _ = get_dorefa(k, 32, 32)
            y = fw(w)
            (g,) = tf.gradients(y, w, grad_ys=tf.constant(dy_val))
            results.append(sess.run([y, g], {w: w_val}))
    (y_xla, g_xla), (y_tf, g_tf) = results
    np.testing.assert_array_equal(bits_of(y_xla), bits_of(y_tf))
    np.testing.assert_allclose(g_xla, g_tf, rtol=1e-5, atol=1e-6)
    if k > 1:
        ref = fw_multibit_grad_ref(w_val, dy_val.astype(np.float64))
        np.testing.assert_allclose(g_xla, ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(g_tf, ref, rtol=1e-4, atol=1e-5)
