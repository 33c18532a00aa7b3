"""The builder interface a network is described against: ``network(net, x)`` calls these words on ``net``.

Three builders implement it, each a :class:`Builder`:

* :class:`dorefanet.network.GraphBuilder`: tensorpack's layers and the quantizers of
  :mod:`dorefa`, for training, ``--eval`` and ``--run``;
* :class:`dorefanet.packed.program.ProgramBuilder`: the op list the packed engine
  interprets (``--export-packed``, ``--summary``);
* :class:`Recorder` (here): which op reads which, for the per-layer bit table
  (:class:`dorefanet.bits.LayerPlan`).

The words, in all three:

* ``conv`` / ``fc`` with ``quantized=True``: the layer's ``W`` goes through ``fw`` and
  the gradient flowing into its output through ``fg``; with ``quantized=False`` (the
  first and the last layer) both stay float unless ``--layer-bits`` says otherwise;
* ``activate(x)``: the activation the next layer reads: ``clip(x, 0, 1)`` quantized to
  that layer's A bits, or at A = 32 the float activation;
* ``nonlin(x)``: the same where the next layer is float by default (the last layer
  reads it): the float activation unless that layer is given A < 32;
* ``bn``, ``maxpool``, ``avgpool``, ``gap`` (global average), ``pad`` (height and
  width; ``constant`` or ``symmetric``), ``dropout``, ``scale``, ``add``, and ``scope``
  (a name prefix for the layers inside).

The float activation is ``relu`` where the model's ``activation_at_32`` is ``"relu"``
and ``--dorefa`` has A = 32, otherwise ``clip(x, 0, 1)``, as published.
"""
import contextlib
from typing import Protocol

__all__ = ["NetworkBuilder", "Builder", "Recorder", "Node"]


class NetworkBuilder(Protocol):
    """What a network description may call; the signatures every builder keeps."""

    def conv(self, name, x, out, kernel, stride=1, padding="SAME", groups=1, quantized=True, bias=False): ...

    def fc(self, name, x, out, quantized=True, bias=False, flatten="hwc"): ...

    def bn(self, name, x): ...

    def activate(self, x): ...

    def nonlin(self, x): ...

    def maxpool(self, name, x, size, stride=None, padding="VALID"): ...

    def avgpool(self, name, x, size, stride=None, padding="VALID"): ...

    def gap(self, name, x): ...

    def pad(self, x, before, after, mode="constant"): ...

    def dropout(self, name, x, rate): ...

    def scale(self, x, by): ...

    def add(self, a, b): ...

    def scope(self, name): ...


class Builder:
    """What every builder shares: the stack of ``scope`` names and the count of activations read so far.

    ``plan`` (a :class:`dorefanet.bits.LayerPlan`) gives each activation its bits, in
    the order the description reads them; the :class:`Recorder` that makes the
    plan has none.
    """

    def __init__(self, plan=None):
        self.plan = plan
        self._scopes = []
        self._activations = 0

    def _name(self, name):
        """``name`` inside the current scopes: ``conv2blk1/c3x3a``."""
        return "/".join(self._scopes + [name])

    def _next_activation(self):
        """The index of the activation being described (0 for the first ``activate`` / ``nonlin``)."""
        index = self._activations
        self._activations += 1
        return index

    def _next_activation_bits(self):
        return self.plan.activation_bits[self._next_activation()]

    def _scope_context(self, name):
        """What else entering scope ``name`` means to this builder (TensorFlow: a variable scope)."""
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def scope(self, name):
        with self._scope_context(name):
            self._scopes.append(name)
            try:
                yield
            finally:
                self._scopes.pop()


class Node:
    """One recorded op: its kind, the nodes it reads, and for a layer ``(name, kind, quantized)``."""

    def __init__(self, kind, inputs=(), layer=None, index=None):
        self.kind, self.inputs, self.layer, self.index = kind, inputs, layer, index


class Recorder(Builder):
    """The builder that only records which op reads which (what :class:`dorefanet.bits.LayerPlan` resolves)."""

    def __init__(self):
        super().__init__()
        self.nodes, self.activations = [], []

    def _node(self, kind, *inputs, layer=None):
        node = Node(kind, inputs, layer)
        self.nodes.append(node)
        return node

    def _layer(self, kind, name, x, quantized):
        return self._node(kind, x, layer=(self._name(name), kind, bool(quantized)))

    def conv(self, name, x, out, kernel, stride=1, padding="SAME", groups=1, quantized=True, bias=False):
        return self._layer("conv", name, x, quantized)

    def fc(self, name, x, out, quantized=True, bias=False, flatten="hwc"):
        return self._layer("fc", name, x, quantized)

    def _activation(self, kind, x):
        node = self._node(kind, x)
        node.index = self._next_activation()
        self.activations.append(node)
        return node

    def activate(self, x):
        return self._activation("activate", x)

    def nonlin(self, x):
        return self._activation("nonlin", x)

    def bn(self, name, x):
        return self._node("bn", x)

    def maxpool(self, name, x, size, stride=None, padding="VALID"):
        return self._node("maxpool", x)

    def avgpool(self, name, x, size, stride=None, padding="VALID"):
        return self._node("avgpool", x)

    def gap(self, name, x):
        return self._node("gap", x)

    def pad(self, x, before, after, mode="constant"):
        return self._node("pad", x)

    def dropout(self, name, x, rate):
        return x

    def scale(self, x, by):
        return self._node("scale", x)

    def add(self, a, b):
        return self._node("add", a, b)
