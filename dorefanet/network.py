"""The TensorFlow builder of a network description (:mod:`dorefanet.builder`): tensorpack's layers, each at its bits.

``network(net, x)`` built with :class:`GraphBuilder` is the graph of training,
``--eval`` and ``--run``; the same description built by
:class:`dorefanet.packed.program.ProgramBuilder` is the packed program, and the
exactness tests (``tests/test_packed_engine.py``) run both on the same weights.
"""
from dorefanet.tf_setup import tf

from tensorpack.models import (AvgPooling, BatchNorm, Conv2D, Dropout, FullyConnected,  # noqa: E402
                               GlobalAvgPooling, MaxPooling)
from tensorpack.tfutils.argscope import argscope  # noqa: E402
from tensorpack.tfutils.tower import get_current_tower_context  # noqa: E402
from tensorpack.tfutils.varreplace import remap_variables  # noqa: E402

from dorefa import get_dorefa, quantize, quantize_clipped  # noqa: E402
from dorefanet.builder import Builder  # noqa: E402

__all__ = ["BN_MOMENTUM", "BN_EPSILON", "ACTIVATIONS_AT_32", "GraphBuilder"]

#: The batch norm of all three published networks (docs/networks.md).
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-4
#: What ``activate`` / ``nonlin`` are when A = 32.
ACTIVATIONS_AT_32 = ("relu", "clip")


def _identity(v):
    return v


class GraphBuilder(Builder):
    """Builds a network description with tensorpack's layers, each layer at the bit widths of ``plan``.

    ``plan`` is the model's :class:`dorefanet.bits.LayerPlan` (from
    ``--dorefa`` and ``--layer-bits``).  Call :meth:`build` rather than the
    description directly: it sets the layouts and batch-norm constants every
    layer shares.
    """

    def __init__(self, plan, data_format="channels_last", activation_at_32="relu"):
        if activation_at_32 not in ACTIVATIONS_AT_32:
            raise ValueError("activation_at_32 must be one of {}, got {!r}".format(ACTIVATIONS_AT_32,
                                                                                   activation_at_32))
        super().__init__(plan)
        self.data_format = data_format
        self.activation_at_32 = activation_at_32
        self._quantizers = {}

    def build(self, network, x):
        """``network(self, x)`` inside the layouts and constants its layers share; returns its result."""
        with argscope([Conv2D, BatchNorm, MaxPooling, AvgPooling, GlobalAvgPooling], data_format=self.data_format), \
                argscope(BatchNorm, momentum=BN_MOMENTUM, epsilon=BN_EPSILON):
            return network(self, x)

    # ------------------------------------------------------------ layers with weights
    def _layer_quantizers(self, name):
        """``(remap, fg)`` of layer ``name``: ``fw`` on its kernel and ``fg`` on its output, or identities."""
        name = self._name(name)
        if not self.plan.quantized(name):
            return _identity, _identity
        bits = self.plan.layers[name]
        if bits not in self._quantizers:
            self._quantizers[bits] = get_dorefa(*bits)
        fw, _, fg = self._quantizers[bits]

        def remap(v):
            # only the kernel: biases, and TTQ's Wp / Wn that fw itself creates, stay as they are
            return fw(v) if v.op.name.endswith("/W") else v

        return remap, fg

    def conv(self, name, x, out, kernel, stride=1, padding="SAME", groups=1, quantized=True, bias=False):
        remap, fg = self._layer_quantizers(name)
        with remap_variables(remap):
            y = Conv2D(name, x, out, kernel, strides=stride, padding=padding, split=groups, use_bias=bias)
        return fg(y)

    def fc(self, name, x, out, quantized=True, bias=False, flatten="hwc"):
        """``flatten``: the order (``hwc`` or ``chw``) in which the weight rows expect a map's values."""
        spatial = x.shape.as_list()[2:] if self.data_format == "channels_first" else x.shape.as_list()[1:3]
        if x.shape.ndims == 4 and spatial != [1, 1]:
            if flatten == "chw" and self.data_format == "channels_last":
                x = tf.transpose(x, [0, 3, 1, 2], name="to_chw")
            elif flatten == "hwc" and self.data_format == "channels_first":
                x = tf.transpose(x, [0, 2, 3, 1], name="to_hwc")
        remap, fg = self._layer_quantizers(name)
        with remap_variables(remap):
            y = FullyConnected(name, x, out, use_bias=bias)
        return fg(y)

    def bn(self, name, x):
        return BatchNorm(name, x)

    # ------------------------------------------------------------ activations
    def _float_activation(self, x):
        if self.plan.float_activation(self.activation_at_32) == "relu":
            return tf.nn.relu(x)
        return tf.clip_by_value(x, 0.0, 1.0)

    def nonlin(self, x):
        bits = self._next_activation_bits()
        if bits == 32:
            return self._float_activation(x)
        return quantize_clipped(x, bits)

    def activate(self, x):
        bits = self._next_activation_bits()
        if bits == 32:
            return quantize(self._float_activation(x), 32)
        # the value of fa(clip(x, 0, 1)) bit for bit, in one fused op with a one-pass gradient
        return quantize_clipped(x, bits)

    # ------------------------------------------------------------ the rest
    def maxpool(self, name, x, size, stride=None, padding="VALID"):
        return MaxPooling(name, x, size, strides=stride or size, padding=padding)

    def avgpool(self, name, x, size, stride=None, padding="VALID"):
        return AvgPooling(name, x, size, strides=stride or size, padding=padding)

    def gap(self, name, x):
        return GlobalAvgPooling(name, x)

    def pad(self, x, before, after, mode="constant"):
        """Pad height and width only, whatever the layout; ``mode``: ``constant`` (zeros) or ``symmetric``."""
        hw = [[before, after], [before, after]]
        paddings = [[0, 0], [0, 0]] + hw if self.data_format == "channels_first" else [[0, 0]] + hw + [[0, 0]]
        return tf.pad(x, paddings, mode=mode.upper())

    def dropout(self, name, x, rate):
        return Dropout(name, x, rate=rate if get_current_tower_context().is_training else 0.0)

    def scale(self, x, by):
        return x * by

    def add(self, a, b):
        return a + b

    def _scope_context(self, name):
        return tf.variable_scope(name)
