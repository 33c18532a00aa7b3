#!/usr/bin/env python
"""DoReFa-Net AlexNet on ImageNet (arXiv 1606.06160), the network of the published model zoo.

    ./alexnet-dorefa.py --dorefa 1,2,6 --data ILSVRC --gpu 0,1,2,3      # train, the published recipe
    ./alexnet-dorefa.py --dorefa 1,2,6 --load AlexNet-1,2,6.npz --eval --data ILSVRC
    ./alexnet-dorefa.py --dorefa 1,2,6 --load AlexNet-1,2,6.npz --run cat.jpg dog.png [--json]
    ./alexnet-dorefa.py --dorefa 1,2,6 --fake                             # try training without ImageNet

Architecture, names and preprocessing follow ``docs/networks.md``: BGR uint8
224x224 input, mean/std normalisation, five convolutions (two-group conv1,
conv3, conv4), two 4096-wide fully-connected layers and ``fct``; weights
quantized by ``fw`` except in ``conv0`` and ``fct``; ``fg`` after every
quantized layer, before its batch norm.  Recipe: Adam 2e-4 (epsilon 1e-5),
4e-5 after epoch 60, 8e-6 after epoch 75, 90 epochs, total batch 256, L2 5e-6
on ``fc.*/W``.  Everything else (flags, data, training, evaluation) is
``dorefanet.imagenet_cli.imagenet_main``.
"""
import os
import sys

# TensorFlow and tensorpack only where used (AlexNetModel): --engine packed --eval / --run run without
from dorefanet.imagenet_cli import imagenet_main
from dorefanet.imagenet_data import ImageNetNetwork, module_getattr, tensorflow_class

DEFAULT_DOREFA = "1,2,6"

__all__ = ["AlexNetModel", "AlexNet", "DEFAULT_DOREFA", "main"]


class AlexNet(ImageNetNetwork):
    """DoReFa AlexNet without TensorFlow: the layers, bit widths and recipe of :class:`AlexNetModel`
    (what the packed engine's ``--eval`` / ``--run`` need); ``AlexNet.with_tensorflow()`` is ``AlexNetModel``.
    """

    # ImageNet mean / std in BGR order, in 0..255 units (model-zoo.md).
    image_mean = tuple(v * 255.0 for v in (0.406, 0.456, 0.485))
    image_std = tuple(v * 255.0 for v in (0.225, 0.224, 0.229))
    activation_at_32 = "relu"
    weight_decay = 5e-6
    weight_decay_pattern = "fc.*/W"
    # Adam 2e-4 (epsilon 1e-5), 4e-5 from epoch 60, 8e-6 from epoch 75, 90 epochs of total batch 256.
    base_lr = 2e-4
    lr_schedule = ((60, 4e-5), (75, 8e-6))
    max_epoch = 90
    total_batch_size = 256
    model_name = "alexnet"
    # channels_last measured faster on a 2-core CPU (oneDNN), e.g. 2.17 s vs 2.48 s per training step and
    # 0.66 s vs 0.69 s per forward pass of 32 images at 224 (docs/training.md, "On the CPU")
    cpu_data_format = "channels_last"
    min_image_size = 64

    def network(self, net, x):
        """The layers, described once: built by TensorFlow (``net`` a GraphBuilder) and as the packed program."""
        # conv0 and fct stay in float (quantized=False), as published
        x = net.conv("conv0", x, 96, 12, stride=4, padding="VALID", quantized=False, bias=True)
        x = net.activate(x)
        x = net.bn("bn1", net.conv("conv1", x, 256, 5, groups=2))
        x = net.activate(net.maxpool("pool1", x, 3, stride=2, padding="SAME"))

        x = net.bn("bn2", net.conv("conv2", x, 384, 3))
        x = net.activate(net.maxpool("pool2", x, 3, stride=2, padding="SAME"))

        x = net.activate(net.bn("bn3", net.conv("conv3", x, 384, 3, groups=2)))

        x = net.bn("bn4", net.conv("conv4", x, 256, 3, groups=2))
        x = net.activate(net.maxpool("pool4", x, 3, stride=2, padding="VALID"))

        # The published fc0 weights expect the map flattened as (c, h, w).
        x = net.activate(net.bn("bnfc0", net.fc("fc0", x, 4096, bias=True, flatten="chw")))
        x = net.nonlin(net.bn("bnfc1", net.fc("fc1", x, 4096)))
        return net.fc("fct", x, 1000, quantized=False, bias=True)


def _define_model():
    """``AlexNetModel``: the network with its TensorFlow graph and training recipe."""
    from dorefanet.tf_setup import tf  # noqa: I100  (must come before tensorpack)
    from tensorpack.tfutils.summary import add_param_summary
    from imagenet_utils import ImageNetModel

    class AlexNetModel(AlexNet, ImageNetModel):
        """DoReFa AlexNet: ``AlexNetModel(bits=(1, 2, 6), data_format='channels_first', image_size=224)``.

        ``bits`` is ``(W, A, G)`` (a :class:`dorefanet.cli.Bits` works), W may be ``'t'`` (TTQ).
        Other ``image_size`` values change only the shape of ``fc0/W`` (the flattened
        final map), which is useful for small tests; the published weights need 224.
        """

        image_dtype = tf.uint8

        def get_logits(self, image):
            logits = self.network_logits(image)
            add_param_summary((".*/W", ["histogram", "rms"]))
            return logits

        def optimizer(self):
            return tf.train.AdamOptimizer(self.learning_rate(), epsilon=1e-5)

    return AlexNetModel


AlexNet.with_tensorflow = tensorflow_class(_define_model)
# AlexNetModel is a module attribute as before, made when first asked for
__getattr__ = module_getattr(__name__, "AlexNetModel", AlexNet.with_tensorflow)


def main(argv=None):
    """Train, evaluate, classify or export; see ``dorefanet.imagenet_cli.imagenet_main``."""
    # --help shows the title and the usage examples, not the developer notes after them.
    return imagenet_main(AlexNet, argv, description="\n\n".join(__doc__.split("\n\n")[:2]),
                         default_dorefa=DEFAULT_DOREFA, script="./" + os.path.basename(__file__))


if __name__ == "__main__":
    sys.exit(main())
