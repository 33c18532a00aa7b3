#!/usr/bin/env python
"""DoReFa-Net ResNet-18 on ImageNet (arXiv 1606.06160), the network of the published model zoo.

    ./resnet-dorefa.py --load ResNet-18-14f.npz --run cat.jpg [--json]  # default --dorefa 1,4,32
    ./resnet-dorefa.py --load ResNet-18-14f.npz --eval --data ILSVRC
    ./resnet-dorefa.py --dorefa 1,4,32 --data ILSVRC --gpu 0,1           # train
    ./resnet-dorefa.py --fake --steps-per-epoch 20 --epochs 1            # try training without ImageNet

Architecture, names and preprocessing follow ``docs/networks.md``: BGR
224x224 input fed as float 0..255 and divided by 256, the asymmetric paddings,
pre-activation blocks (with the ``conv2blk1`` quirk), ``lastbn`` -> global
average pool -> x49 -> ``fct``; weights quantized by ``fw`` except in
``conv1`` and ``fct``; activations always clipped to [0, 1].  Everything else
(flags, data, training, evaluation) is ``dorefanet.imagenet_cli.imagenet_main``.
"""
import os
import sys

# TensorFlow and tensorpack only where used (ResNet18Model): --engine packed --eval / --run run without
from dorefanet.imagenet_cli import imagenet_main
from dorefanet.imagenet_data import ImageNetNetwork, module_getattr, tensorflow_class

DEFAULT_DOREFA = "1,4,32"

__all__ = ["ResNet18Model", "ResNet18", "DEFAULT_DOREFA", "main"]


class ResNet18(ImageNetNetwork):
    """DoReFa ResNet-18 without TensorFlow: the layers, bit widths and recipe of :class:`ResNet18Model`
    (what the packed engine's ``--eval`` / ``--run`` need); ``ResNet18.with_tensorflow()`` is ``ResNet18Model``.
    """

    image_mean = (0.0, 0.0, 0.0)
    image_std = 256.0
    activation_at_32 = "clip"   # the published model clips its activations to [0, 1] at every A
    weight_decay = 1e-4
    weight_decay_pattern = r"/W$"
    base_lr = 0.1
    lr_schedule = ((30, 1e-2), (60, 1e-3), (85, 1e-4))
    max_epoch = 90
    total_batch_size = 256
    model_name = "resnet18"
    # channels_last measured faster on a 2-core CPU (oneDNN), e.g. 1.89 s vs 2.25 s per training step and
    # 0.58 s vs 0.66 s per forward pass of 32 images at 224 (docs/training.md, "On the CPU")
    cpu_data_format = "channels_last"
    min_image_size = 64

    def network(self, net, x):
        """The layers, described once: built by TensorFlow (``net`` a GraphBuilder) and as the packed program."""

        def block(x, channels, first, stride):
            def stem(x):
                x = net.conv("c3x3a", x, channels, 3)
                x = net.activate(net.bn("stembn", x))
                return net.conv("c3x3b", x, channels, 3)

            if first:
                if stride != 1:
                    x = net.avgpool("pool", x, stride, stride=stride)
                x = net.activate(net.bn("bn", x))
                # conv2blk1 also takes this path (a 1x1 shortcut that neither downsamples nor
                # widens): a quirk of the released model.
                shortcut = net.conv("shortcut", x, channels, 1)
            else:
                shortcut = x
                x = net.activate(net.bn("bn", x))
            return net.add(shortcut, stem(x))

        def group(x, name, channels, count, stride):
            for i in range(1, count + 1):
                with net.scope("{}blk{}".format(name, i)):
                    x = block(x, channels, first=i == 1, stride=stride)
            return x

        # The explicit asymmetric / mirror paddings reproduce the framework the model was trained in.
        x = net.pad(x, 3, 2)
        # conv1 and fct stay in float (quantized=False), as published
        x = net.conv("conv1", x, 64, 7, stride=2, padding="VALID", quantized=False, bias=True)
        x = net.pad(x, 1, 1, mode="symmetric")
        x = net.maxpool("pool1", x, 3, stride=2, padding="VALID")
        x = group(x, "conv2", 64, 2, stride=1)
        x = group(x, "conv3", 128, 2, stride=2)
        x = group(x, "conv4", 256, 2, stride=2)
        x = group(x, "conv5", 512, 2, stride=2)
        x = net.nonlin(net.bn("lastbn", x))
        x = net.gap("gap", x)
        # x49 (the 7x7 map's sum instead of its mean): a quirk of the released model.
        x = net.scale(x, 49.0)
        return net.fc("fct", x, 1000, quantized=False, bias=True)


def _define_model():
    """``ResNet18Model``: the network with its TensorFlow graph and training recipe."""
    from dorefanet.tf_setup import tf
    from imagenet_utils import ImageNetModel

    class ResNet18Model(ResNet18, ImageNetModel):
        """DoReFa ResNet-18: ``ResNet18Model(bits=(1, 4, 32), data_format='channels_first', image_size=224)``.

        ``bits`` is ``(W, A, G)`` (a :class:`dorefanet.cli.Bits` works).  The variable shapes
        do not depend on ``image_size`` (global pooling), so small sizes (>= 33)
        are fine for tests.

        No training recipe was published for this model; the optimizer defaults
        (SGD with Nesterov momentum 0.9, lr 0.1, L2 1e-4 on every ``W``) are
        fb.resnet.torch's and untested for the quantized network.
        """

        image_dtype = tf.float32

    return ResNet18Model


ResNet18.with_tensorflow = tensorflow_class(_define_model)
# ResNet18Model is a module attribute as before, made when first asked for
__getattr__ = module_getattr(__name__, "ResNet18Model", ResNet18.with_tensorflow)


def main(argv=None):
    """Train, evaluate, classify or export; see ``dorefanet.imagenet_cli.imagenet_main``."""
    # --help shows the title and the usage examples, not the developer notes after them.
    return imagenet_main(ResNet18, argv, description="\n\n".join(__doc__.split("\n\n")[:2]),
                         default_dorefa=DEFAULT_DOREFA, script="./" + os.path.basename(__file__))


if __name__ == "__main__":
    sys.exit(main())
