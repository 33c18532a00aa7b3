"""DoReFa-Net quantizers for weights, activations and gradients, and TTQ.

Stateless functions built on ``tf.custom_gradient``, for TF1-style graphs
(``tf.compat.v1``), any rank, float32.  The semantics are those of

* DoReFa-Net: Zhou et al., "DoReFa-Net: Training Low Bitwidth Convolutional
  Neural Networks with Low Bitwidth Gradients", arXiv:1606.06160;
* BWN (1-bit weights with a mean-magnitude scale): Rastegari et al.,
  "XNOR-Net", arXiv:1603.05279, as used by DoReFa-Net for W = 1;
* TTQ: Zhu et al., "Trained Ternary Quantization", arXiv:1612.01064.

A bit width of 32 always means "not quantized" (identity forward and backward).

Usage, unchanged from the original module::

    fw, fa, fg = get_dorefa(1, 2, 6)
    w = fw(w_latent)                      # quantized weights
    y = fg(conv(x, w))                    # quantize the gradient flowing into conv
    x = fa(tf.clip_by_value(y, 0, 1))     # quantized activations
    x = quantize_clipped(y, 2)            # the same value and gradient, cheaper to train

Rounding is ``tf.round`` (round half to even), as in the implementation that
trained the published checkpoints.

Speed: the element-wise work of fg's and the k-bit weights' backward passes, of the
k-bit weights' forward pass after tanh and the maximum, of TTQ's value and input
gradient, of BWN's sign select and fg's noise run as small XLA-compiled functions, one
fused loop each; fg draws its noise from Threefry-2x32 with 13 rounds
(:func:`_threefry2x32`), 16 bits per element (:func:`_bits_to_uniform`), its blocks in
a loop of their own.  :func:`quantize_clipped` is TensorFlow's fused
``QuantizeAndDequantizeV4`` op on the range [0, 1] (one pass forward, one backward,
and faster than an XLA loop on this kind of CPU).  Forward values are unchanged:
reductions and tanh stay TensorFlow ops, and what XLA and the fused op compute
(selects, clips, divisions, products by n, rounding, and the product of the integer
codes by float32(1/n), which is what a TensorFlow session computes for the division
by the constant n, as grappler's constant folding rewrites it) is the same IEEE
arithmetic as TensorFlow's; the one exception is the sign of a zero (see
:func:`quantize_clipped`).  Set the environment variable ``DOREFA_XLA=0`` (or
:data:`USE_XLA` to False before building a graph) to build everything from plain
TensorFlow ops.
"""
import os

import numpy as np

from dorefanet.tf_setup import tf

from dorefanet.bits import TERNARY, check_bits, check_width  # noqa: E402,F401  (TensorFlow-free)

__all__ = ["get_dorefa", "ternarize", "quantize", "quantize_clipped", "check_bits", "TERNARY",
           "USE_XLA"]

#: Build the quantizers' element-wise work from fused kernels (XLA-compiled functions for
#: the backward passes, the k-bit weights' and TTQ's values, BWN's sign select and fg's noise;
#: TensorFlow's QuantizeAndDequantizeV4 for quantize_clipped); read when a graph is built.  ``DOREFA_XLA=0`` in the environment
#: turns it off.  The two settings give the same forward values and gradients, except that
#: fg draws its noise from different generators (Threefry-2x32-13, 16 bits per element, or
#: TensorFlow's Philox, 23 bits; both i.i.d. per element, uniform on equally spaced values)
#: and for the sign of zeros in quantize_clipped.
USE_XLA = os.environ.get("DOREFA_XLA", "1").strip().lower() not in ("0", "false", "no", "off")


def _levels(k):
    return float(2 ** k - 1)


def quantize(x, k):
    """Uniform k-bit quantizer on [0, 1] with a straight-through gradient.

    ``quantize_k(x) = round(x * n) / n`` with ``n = 2^k - 1``; d/dx is taken
    as 1 (straight-through estimator).  ``x`` is expected in [0, 1].
    k = 32 is the identity.  (arXiv:1606.06160, eq. 5.)
    """
    k = check_width(k, "bit width k")
    if k == 32:
        return tf.identity(x)
    n = _levels(k)

    @tf.custom_gradient
    def _quantize(v):
        return tf.round(v * n) / n, lambda dy: dy

    return _quantize(x)


def _xla_function(fn):
    return tf.function(fn, jit_compile=True, autograph=False, reduce_retracing=True)


def _in_unit_interval_gradient(x, dy):
    # dy where 0 <= x <= 1, else 0 (NaN: 0): the gradient of tf.clip_by_value(x, 0, 1),
    # whose Minimum and Maximum pass the gradient on ties (x == 1, x == 0).
    return tf.where_v2(tf.logical_and(x >= 0.0, x <= 1.0), dy, tf.zeros_like(dy))


def _unit_range_quantize(x, k):
    # TensorFlow's fused QuantizeAndDequantizeV4, unsigned, on the fixed range [0, 1], k bits, half to
    # even: round(clip(x, 0, 1) * n) * float32(1/n) in one pass; its registered gradient is
    # QuantizeAndDequantizeV4Grad (dy * [0 <= x <= 1], one pass)
    return tf.quantization.quantize_and_dequantize_v2(
        x, 0.0, 1.0, signed_input=False, num_bits=k, range_given=True, round_mode="HALF_TO_EVEN", narrow_range=False)


def _unit_range_quantizer_gradient(x, dy):
    # TensorFlow's one-pass gradient of QuantizeAndDequantizeV4 on [0, 1]: dy * [0 <= x <= 1]
    return tf.raw_ops.QuantizeAndDequantizeV4Grad(gradients=dy, input=x, input_min=0.0, input_max=1.0)[0]


def quantize_clipped(x, k):
    """``quantize(tf.clip_by_value(x, 0, 1), k)`` with a cheap gradient, for training.

    Forward: the value of ``quantize(tf.clip_by_value(x, 0.0, 1.0), k)`` (for k = 32,
    that of ``tf.clip_by_value(x, 0.0, 1.0)``).  Backward: ``dy`` where ``0 <= x <= 1``
    (both ends included) and 0 elsewhere and for NaN, which is the gradient of that
    composition (the straight-through quantizer times the gradient of
    ``tf.clip_by_value``), in one pass instead of the two masks and selects of
    clip_by_value's gradient.

    With :data:`USE_XLA` (the default) this is TensorFlow's fused
    ``QuantizeAndDequantizeV4`` op, unsigned, on the fixed range [0, 1], rounding half
    to even: ``round(clip(x) * n) * float32(1/n)`` with ``n = 2^k - 1``, the product a
    session's graph computes for :func:`quantize`'s ``/ n`` (grappler's constant folding
    turns the division by the constant into it; with constant folding turned off,
    TensorFlow would divide, which differs in the last bit for some codes when k >= 3).
    Its gradient is ``dy * [0 <= x <= 1]``.  Both are one pass over the tensor, and
    equal to the plain-TensorFlow composition as numbers, checked on all 2^32 float32
    inputs for the forward; the bits differ only in the sign of a zero: an input of
    -0.0 or a negative denormal gives -0.0 (clip_by_value: +0.0), and outside [0, 1] a
    negative ``dy`` gives -0.0.  A non-finite ``dy`` outside [0, 1] gives NaN (0 times
    infinity) where the composition gives 0.  Without :data:`USE_XLA` the value and
    gradient come from plain TensorFlow ops, bit for bit those of the composition.
    """
    k = check_width(k, "bit width k")
    n = _levels(k)
    if USE_XLA and k < 32:
        return _unit_range_quantize(x, k)
    gradient = _unit_range_quantizer_gradient if USE_XLA else _in_unit_interval_gradient

    @tf.custom_gradient
    def _quantize_clipped(v):
        if k == 32:
            y = tf.clip_by_value(v, 0.0, 1.0)
        else:
            y = tf.round(tf.clip_by_value(v, 0.0, 1.0) * n) / n
        return y, lambda dy: gradient(v, dy)

    return _quantize_clipped(x)


def _signed_scale(v, E):
    # sign(v) * E with sign(0) = +1, exactly: a select between E and -E, no arithmetic
    return tf.where_v2(v >= 0, E, -E)


_signed_scale_xla = _xla_function(_signed_scale)


def _binary_weights(x):
    # The custom gradient below replaces the whole derivative of sign(W) * E by
    # dy: E is a constant for the gradient and the sign's gradient is passed
    # straight through unscaled, as in the implementation of the published models.
    E = tf.reduce_mean(tf.abs(x))
    use_xla = USE_XLA

    @tf.custom_gradient
    def _sign_times_E(v):
        if use_xla:
            return _signed_scale_xla(v, E), lambda dy: dy
        sign = tf.where(v >= 0, tf.ones_like(v), -tf.ones_like(v))
        return sign * E, lambda dy: dy

    return _sign_times_E(x)


def _dorefa_weights_gradient(dy, s, a, M, dot, maxima):
    # d/dW of 2 * quantize_k(s / M * 0.5 + 0.5) - 1 with s = tanh(W), a = |s|, M = max(a), given
    # dot = sum(dy * s) and the number of maxima: straight through the rounding (2 * 0.5 = 1), the
    # direct path dy / M, the path through M (dM = -dot / M^2, which reduce_max splits equally
    # among its maxima; |s|' = sign(s)), then tanh' = 1 - s^2.
    dM_per_max = -dot / M / M / maxima
    ds = dy / M + tf.where_v2(tf.equal(a, M), tf.sign(s) * dM_per_max, tf.zeros_like(dy))
    return ds * (1.0 - s * s)


_dorefa_weights_gradient_xla = _xla_function(_dorefa_weights_gradient)

_WEIGHTS_FORWARD_XLA = {}


def _weights_forward_xla(k):
    """``2 * quantize_k(s / M * 0.5 + 0.5) - 1`` as one XLA function of ``(s, M)``, bit for bit the
    value of the TensorFlow ops (which a session computes with ``/ n`` as ``* float32(1/n)``)."""
    if k not in _WEIGHTS_FORWARD_XLA:
        n = _levels(k)
        reciprocal = np.float32(1) / np.float32(n)

        def weights_from_tanh(s, M):
            codes = tf.round((s / M * 0.5 + 0.5) * n)
            # maximum(., 0) changes no value (codes >= 0; NaN stays NaN) but keeps XLA from contracting
            # 2 * (codes * reciprocal) - 1 into one fused multiply-add, which rounds once where
            # TensorFlow rounds twice (checked: every code for k = 2..16)
            return 2.0 * tf.maximum(codes * reciprocal, 0.0) - 1.0

        weights_from_tanh.__name__ = "dorefa_weights_{}_bits".format(k)
        _WEIGHTS_FORWARD_XLA[k] = _xla_function(weights_from_tanh)
    return _WEIGHTS_FORWARD_XLA[k]


def _dorefa_weights(x, k):
    if not USE_XLA:
        t = tf.tanh(x)
        # The max is deliberately *not* stop-gradient: the published models were
        # trained with the gradient flowing through the normalisation.
        t = t / tf.reduce_max(tf.abs(t)) * 0.5 + 0.5
        return 2.0 * quantize(t, k) - 1.0

    # The same forward values, tanh and the reductions from TensorFlow and the element-wise rest
    # from XLA; the gradient is that of the code above (through tanh and the max normalisation),
    # its element-wise part fused by XLA.  Fewer ops matter here as much as fewer passes: the
    # weights are small, and each op costs the executor a dispatch.
    @tf.custom_gradient
    def _weights(v):
        s = tf.tanh(v)
        a = tf.abs(s)
        M = tf.reduce_max(a)
        y = _weights_forward_xla(k)(s, M)

        def grad(dy):
            dot = tf.reduce_sum(dy * s)
            maxima = tf.reduce_sum(tf.cast(tf.equal(a, M), dy.dtype))
            return _dorefa_weights_gradient_xla(dy, s, a, M, dot, maxima)

        return y, grad

    return _weights(x)


def _fg_gradient(dy, noise, n, rank):
    """eq. 12 with the given noise ``noise`` ~ Uniform(-0.5/n, 0.5/n), float32, shaped as dy."""
    axes = list(range(1, rank))
    # max(|dy|), without materialising |dy|
    m = tf.maximum(tf.reduce_max(dy, axis=axes, keepdims=True), -tf.reduce_min(dy, axis=axes, keepdims=True))
    # A sample whose incoming gradient is all zero would divide by
    # zero (NaN in the original); its quantized gradient is 0.
    safe_m = tf.where_v2(m > 0, m, tf.ones_like(m))
    u = dy / safe_m * 0.5 + 0.5 + noise
    u = tf.clip_by_value(u, 0.0, 1.0)
    q = tf.round(u * n) / n
    return (q - 0.5) * 2.0 * m


def _uniform_noise(r, n):
    # r in [0, 1) -> [-0.5/n, 0.5/n), as tf.random.uniform(minval, maxval) computes it
    minval, maxval = tf.constant(-0.5 / n, r.dtype), tf.constant(0.5 / n, r.dtype)
    return r * (maxval - minval) + minval


#: Rotation constants of Threefry-2x32 (Salmon et al. 2011; Random123's threefry.h).
_THREEFRY_ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)
#: Rounds of the Threefry-2x32 that draws fg's noise.
FG_NOISE_ROUNDS = 13


def _threefry2x32(key0, key1, x0, x1, rounds):
    """The Threefry-2x32 block function with ``rounds`` rounds on uint32 tensors: key words, counter words.

    Threefry is the counter-based generator of J. K. Salmon, M. A. Moraes, R. O. Dror and D. E. Shaw,
    "Parallel random numbers: as easy as 1, 2, 3", SC '11 (doi:10.1145/2063384.2063405): a reduced
    Threefish block cipher, so each (key, counter) gives an independent-looking 64-bit block.  The paper
    reports Threefry-2x32 with 13 rounds passing TestU01's BigCrush (20 rounds, Random123's and XLA's
    default, add a safety margin); fg uses 13 (:data:`FG_NOISE_ROUNDS`), about a third less work per value.
    Key schedule, rotations and a key injection every 4 rounds as in Random123; tests check Random123's
    known-answer vectors for 13 and 20 rounds.
    """
    def const(v):
        return tf.constant(v, tf.uint32)

    def rotl(x, r):
        return tf.bitwise.bitwise_or(tf.bitwise.left_shift(x, const(r)), tf.bitwise.right_shift(x, const(32 - r)))

    ks = (key0, key1, tf.bitwise.bitwise_xor(tf.bitwise.bitwise_xor(key0, key1), const(0x1BD11BDA)))
    x0 = x0 + ks[0]
    x1 = x1 + ks[1]
    for r in range(rounds):
        x0 = x0 + x1
        x1 = tf.bitwise.bitwise_xor(rotl(x1, _THREEFRY_ROTATIONS[r % 8]), x0)
        if r % 4 == 3:
            i = (r + 1) // 4
            x0 = x0 + ks[i % 3]
            x1 = x1 + ks[(i + 1) % 3] + const(i)
    return x0, x1


def _threefry_blocks(key, blocks):
    # Blocks 0 .. blocks - 1 (counter (j, 0)) under key (uint32 [2]), each as one uint64 (x1 << 32 | x0).
    # Returned whole so that XLA computes each block once: a fused consumer that picked its two
    # words out of it would compute the block once per word.
    counter = tf.bitcast(tf.range(blocks), tf.uint32)
    x0, x1 = _threefry2x32(key[0], key[1], counter, tf.zeros_like(counter), FG_NOISE_ROUNDS)
    high = tf.bitwise.left_shift(tf.cast(x1, tf.uint64), tf.constant(32, tf.uint64))
    return tf.bitwise.bitwise_or(high, tf.cast(x0, tf.uint64))


_threefry_blocks_xla = _xla_function(_threefry_blocks)


#: Random bits per element of fg's noise on the XLA path (:func:`_bits_to_uniform`).
FG_NOISE_BITS = 16


def _threefry_bits(key, size):
    """uint16 ``[4 * ceil(size / 4)]``: Threefry-2x32-13 blocks 0, 1, ... under ``key`` (uint32 [2]), each cut
    into four 16-bit words; on a little-endian machine elements 4j and 4j + 1 are the low and high halves of
    block j's word x0, 4j + 2 and 4j + 3 those of its x1."""
    return tf.reshape(tf.bitcast(_threefry_blocks_xla(key, (size + 3) // 4), tf.uint16), [-1])


def _bits_to_uniform(bits):
    """float32 ``(b + 1/2) / 2^16`` for each uint16 ``b``: Uniform over the centres of 2^16 equal bins of [0, 1).

    :data:`FG_NOISE_BITS` = 16 bits per element are enough for fg: its noise then takes 2^16 equally spaced
    values, symmetric about 0 (mean exactly 0, so the stochastic rounding stays unbiased), and each element's
    probability of rounding up is resolved to 2^-16 of a level.  float32 itself resolves ``u`` near 1 only to
    2^-24, that is n * 2^-24 of a level: about 2^-16 for 8-bit gradients, where more noise bits could not change
    a rounding.  Half the Threefry blocks and half the memory of one 32-bit word per element, which made fg's
    backward pass on an SVHN conv1 gradient (2.65M elements, from memory) about 1 ms faster on the
    2-core CPU of docs/performance.md.  Made as XLA's and TensorFlow's generators make their floats: the bits as the top
    of the mantissa of a float in [1, 2) (``b * 2^-16``, plus the bit worth 2^-17), minus 1, which is exact.
    """
    mantissa = tf.bitwise.bitwise_or(tf.bitwise.left_shift(tf.cast(bits, tf.uint32), tf.constant(7, tf.uint32)),
                                     tf.constant(0x3F800040, tf.uint32))
    return tf.bitcast(mantissa, tf.float32) - 1.0


_FG_XLA_KERNELS = {}


def _fg_gradient_xla(n, rank):
    """The backward pass of fg as one XLA function of ``(dy, bits)``, ``bits`` from :func:`_threefry_bits`."""
    key = (n, rank)
    if key not in _FG_XLA_KERNELS:
        def kernel(dy, bits):
            r = tf.reshape(_bits_to_uniform(bits[:tf.size(dy)]), tf.shape(dy))
            return _fg_gradient(dy, _uniform_noise(r, n), n, rank)

        _FG_XLA_KERNELS[key] = _xla_function(kernel)
    return _FG_XLA_KERNELS[key]


def _gradient_quantizer(k):
    n = _levels(k)

    def fg(x):
        rank = x.get_shape().ndims
        if rank is None or rank < 2:
            raise ValueError(
                "fg needs a tensor of known rank >= 2 whose first axis is the batch, got shape {}"
                .format(x.get_shape()))
        use_xla = USE_XLA

        @tf.custom_gradient
        def _identity(v):
            def grad(dy):
                if use_xla:
                    # A fresh random 64-bit Threefry key per call and step (drawn by a
                    # stateful op, so it follows tf.set_random_seed); 16 bits of Threefry
                    # output per element, counters 0, 1, ... in the key's stream.
                    seed = tf.random.uniform([], minval=tf.int64.min, maxval=tf.int64.max, dtype=tf.int64)
                    bits = _threefry_bits(tf.bitcast(seed, tf.uint32), tf.size(dy))
                    return _fg_gradient_xla(n, rank)(dy, bits)
                r = tf.random.uniform(tf.shape(dy), dtype=dy.dtype)
                return _fg_gradient(dy, _uniform_noise(r, n), n, rank)

            return tf.identity(v), grad

        return _identity(x)

    return fg


def get_dorefa(bitW, bitA, bitG):
    """Return the quantizers ``(fw, fa, fg)`` for weights, activations and gradients.

    ``fw`` (weights, W = k):

    * k = 32: identity.
    * k = 1 (BWN): ``sign(W) * E`` with ``E = mean(|W|)`` over the whole tensor,
      held constant for the gradient, and ``sign(0) = +1``; gradient straight
      through.
    * 1 < k < 32 (DoReFa, arXiv:1606.06160 eq. 9): ``t = tanh(W)``,
      ``t = t / max(|t|) * 0.5 + 0.5``, ``2 * quantize_k(t) - 1``; the gradient
      flows through tanh and the max normalisation.
    * ``'t'``: :func:`ternarize` (TTQ, arXiv:1612.01064), which creates the
      trainable scalars ``Wp`` and ``Wn`` in the current variable scope.

    ``fa`` (activations, A = k): ``quantize_k(x)`` of an input already clipped to
    [0, 1] (eq. 11); identity when k = 32.

    ``fg`` (gradients, G = k): identity in the forward pass; the backward pass
    replaces the incoming gradient ``dy`` (rank >= 2, batch first) by (eq. 12)::

        m   = max(|dy|) over all axes but the first (per sample)
        u   = dy / m * 0.5 + 0.5 + N,  N ~ Uniform(-0.5/n, 0.5/n),  n = 2^k - 1
        dy' = (quantize_k(clip(u, 0, 1)) - 0.5) * 2 * m

    ``N`` is drawn independently per element and step; with :data:`USE_XLA` it takes
    2^16 equally spaced values, the centres of equal bins of the interval (see
    :func:`_bits_to_uniform`).

    Raises ``ValueError`` for invalid widths (see :func:`check_bits`).
    """
    bitW, bitA, bitG = check_bits(bitW, bitA, bitG)

    def fw(x):
        if bitW == 32:
            return tf.identity(x)
        if bitW == TERNARY:
            return ternarize(x)
        if bitW == 1:
            return _binary_weights(x)
        return _dorefa_weights(x, bitW)

    def fa(x):
        return quantize(x, bitA)

    if bitG == 32:
        def fg(x):
            return tf.identity(x)
    else:
        fg = _gradient_quantizer(bitG)
    return fw, fa, fg


def ternarize(x, thresh=0.05):
    """Trained Ternary Quantization of a weight tensor (arXiv:1612.01064).

    With ``d = thresh * max(|W|)`` (stop-gradient) and two trainable scalars
    ``Wp``, ``Wn`` (created here, in the current variable scope, initialised
    to 1.0), the forward value is ``+Wp`` where ``W > d``, ``-Wn`` where
    ``W < -d`` and 0 elsewhere.  Gradients: ``dW = dy * Wp`` where ``W > d``,
    ``dy * Wn`` where ``W < -d``, ``dy`` elsewhere; ``dWp = sum(dy[W > d])``;
    ``dWn = -sum(dy[W < -d])``.  With :data:`USE_XLA` the value and ``dW`` are one XLA
    pass each (the same values; the plain ops below take about a dozen passes).
    """
    d = tf.stop_gradient(tf.reduce_max(tf.abs(x)) * thresh)
    w_p = tf.get_variable("Wp", initializer=1.0, dtype=tf.float32)
    w_n = tf.get_variable("Wn", initializer=1.0, dtype=tf.float32)
    tf.summary.scalar(w_p.op.name + "-summary", w_p)
    tf.summary.scalar(w_n.op.name + "-summary", w_n)

    if USE_XLA:
        return _ternary_fused(x, d, tf.identity(w_p), tf.identity(w_n))

    positive = x > d
    negative = x < -d
    ones = tf.ones_like(x)
    # scale is Wp / Wn on the kept weights and 1 on the zeroed ones, so that
    # dW = dy * scale and dWp, dWn are sums of dy over their masks.
    scale = tf.where(positive, ones * w_p, tf.where(negative, ones * w_n, ones))

    @tf.custom_gradient
    def _ternary_sign(v):
        sign = tf.where(positive, ones, tf.where(negative, -ones, tf.zeros_like(v)))
        return sign, lambda dy: dy

    return _ternary_sign(x) * scale


def _ternary_values(x, d, w_p, w_n):
    # +Wp where x > d, -Wn where x < -d, 0 elsewhere (NaN too): the product sign * scale of
    # ternarize's plain ops, whose factors are 1 or 0, so the same values exactly
    return tf.where_v2(x > d, w_p, tf.where_v2(x < -d, -w_n, tf.zeros_like(x)))


def _ternary_input_gradient(x, d, w_p, w_n, dy):
    return dy * tf.where_v2(x > d, w_p, tf.where_v2(x < -d, w_n, tf.ones_like(x)))


_ternary_values_xla = _xla_function(_ternary_values)
_ternary_input_gradient_xla = _xla_function(_ternary_input_gradient)


def _ternary_fused(x, d, w_p, w_n):
    """TTQ's value and gradients with one XLA pass each way over the weights (AlexNet's fc layers
    have 54M of them) instead of a dozen TensorFlow ops; the masked sums stay TensorFlow's."""
    @tf.custom_gradient
    def _ternary(v, p, n):
        def grad(dy):
            zeros = tf.zeros_like(dy)
            return (_ternary_input_gradient_xla(v, d, p, n, dy),
                    tf.reduce_sum(tf.where_v2(v > d, dy, zeros)),
                    -tf.reduce_sum(tf.where_v2(v < -d, dy, zeros)))

        return _ternary_values_xla(v, d, p, n), grad

    return _ternary(x, w_p, w_n)
