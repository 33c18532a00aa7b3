"""The quantizers of dorefa.py against independent numpy references (docs: quantizers.md)."""
import numpy as np
import pytest

from dorefa import get_dorefa, quantize, ternarize
from tf_setup import tf

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
def test_ternarize_forward_and_gradients(session, shape):
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
    np.testing.assert_allclose(y_v, np.where(pos, wp_val, np.where(neg, -wn_val, 0.0)), rtol=1e-6)
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
