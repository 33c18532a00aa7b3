"""The scripts' models' one description of their layers, without TensorFlow (:class:`DescribedNetwork`).

Built in TensorFlow by :class:`dorefanet.network.GraphBuilder` (which re-exports this class) and
as a packed-engine program; the packed engine's ``--eval`` / ``--run`` need only this module.
"""
from dorefanet.layer_bits import LayerPlan

__all__ = ["DescribedNetwork"]


class DescribedNetwork:
    """Mixin of the scripts' models: ``network(net, x)`` is the one description of the layers.

    The model provides ``bits``, ``data_format``, ``image_mean`` / ``image_std``
    (the input normalisation, BGR in 0..255 units) and ``activation_at_32``,
    and its constructor calls :meth:`plan_layers` (``--layer-bits``).
    """

    activation_at_32 = "relu"

    def network(self, net, x):
        """Describe the layers on the normalised input ``x``; return the logits."""
        raise NotImplementedError("{} does not describe its network".format(type(self).__name__))

    def plan_layers(self, layer_bits=()):
        """Resolve the bit widths of every layer (``--dorefa`` for all, then ``layer_bits``); see layer_bits."""
        self.layer_plan = LayerPlan(self.network, self.bits, layer_bits)
        return self.layer_plan

    def network_logits(self, x):
        """The logits of :meth:`network` built in TensorFlow on the normalised batch ``x``."""
        from dorefanet.network import GraphBuilder

        return GraphBuilder(self.layer_plan, self.data_format, self.activation_at_32).build(self.network, x)

    def packed_program(self):
        """The same network as a program of the packed engine (``--export-packed``)."""
        from dorefanet.packed.program import ProgramBuilder

        net = ProgramBuilder(self.layer_plan, self.activation_at_32)
        return net.program(self.network, self.image_mean, self.image_std)
