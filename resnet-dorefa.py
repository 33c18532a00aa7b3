#!/usr/bin/env python
"""DoReFa-Net ResNet-18 on ImageNet (arXiv 1606.06160), the network of the published model zoo.

    ./resnet-dorefa.py --load ResNet-18-14f.npz --run cat.jpg [--json]  # default --dorefa 1,4,32
    ./resnet-dorefa.py --load ResNet-18-14f.npz --eval --data ILSVRC
    ./resnet-dorefa.py --dorefa 1,4,32 --data ILSVRC --gpu 0,1           # train
    ./resnet-dorefa.py --fake --steps-per-epoch 20 --epochs 1            # try training without ImageNet

Architecture, names and preprocessing follow ``docs/model-zoo.md``: BGR
224x224 input fed as float 0..255 and divided by 256, the asymmetric paddings,
pre-activation blocks (with the ``conv2blk1`` quirk), ``lastbn`` -> global
average pool -> x49 -> ``fct``; weights quantized by ``fw`` except in
``conv1`` and ``fct``; activations always clipped to [0, 1].  Everything else
(flags, data, training, evaluation) is ``imagenet_utils.imagenet_main``.
"""
import sys

from dorefanet.tf_setup import tf  # noqa: I100  (must come before tensorpack)

from tensorpack.models import AvgPooling, BatchNorm, Conv2D, FullyConnected, GlobalAvgPooling, MaxPooling  # noqa: E402
from tensorpack.tfutils.argscope import argscope  # noqa: E402
from tensorpack.tfutils.varreplace import remap_variables  # noqa: E402

from dorefa import get_dorefa, quantize_clipped  # noqa: E402
from imagenet_utils import ImageNetModel, imagenet_main  # noqa: E402

DEFAULT_DOREFA = "1,4,32"

__all__ = ["ResNet18Model", "DEFAULT_DOREFA", "main"]


class ResNet18Model(ImageNetModel):
    """DoReFa ResNet-18: ``ResNet18Model(bits=(1, 4, 32), data_format='channels_first', image_size=224)``.

    ``bits`` is ``(W, A, G)`` (a :class:`cli.Bits` works).  The variable shapes
    do not depend on ``image_size`` (global pooling), so small sizes (>= 33)
    are fine for tests.

    No training recipe was published for this model; the optimizer defaults
    (SGD with Nesterov momentum 0.9, lr 0.1, L2 1e-4 on every ``W``) are
    fb.resnet.torch's and untested for the quantized network.
    """

    image_dtype = tf.float32
    image_mean = (0.0, 0.0, 0.0)
    image_std = 256.0
    first_layer = "conv1"
    last_layer = "fct"
    weight_decay = 1e-4
    weight_decay_pattern = r"/W$"
    base_lr = 0.1
    lr_schedule = ((30, 1e-2), (60, 1e-3), (85, 1e-4))
    max_epoch = 90
    total_batch_size = 256
    model_name = "resnet18"
    # channels_last measured faster on a 2-core CPU (oneDNN), e.g. 1.89 s vs 2.25 s per training step and
    # 0.58 s vs 0.66 s per forward pass of 32 images at 224 (README, "On the CPU")
    cpu_data_format = "channels_last"
    min_image_size = 64

    def _pad_hw(self, x, before, after, mode="CONSTANT"):
        """Pad height and width only, whatever the layout."""
        hw = [[before, after], [before, after]]
        paddings = [[0, 0], [0, 0]] + hw if self.data_format == "channels_first" else [[0, 0]] + hw + [[0, 0]]
        return tf.pad(x, paddings, mode=mode)

    def get_logits(self, image):
        fw, fa, fg = get_dorefa(*self.bits)
        bit_a = self.bits[1]

        def nonlin(x):
            return tf.clip_by_value(x, 0.0, 1.0)

        def activate(x):
            # quantize_clipped(x, A) is fa(clip(x, 0, 1)) bit for bit, with a one-pass gradient
            return fa(nonlin(x)) if bit_a == 32 else quantize_clipped(x, bit_a)

        def conv(name, x, channels, kernel):
            # Every conv here but conv1 is quantized; fg quantizes the gradient flowing into it
            # (identity for G = 32, the published setting).
            return fg(Conv2D(name, x, channels, kernel))

        def block(x, channels, first, stride):
            def stem(x):
                x = conv("c3x3a", x, channels, 3)
                x = activate(BatchNorm("stembn", x))
                return conv("c3x3b", x, channels, 3)

            if first:
                if stride != 1:
                    x = AvgPooling("pool", x, stride, strides=stride)
                x = activate(BatchNorm("bn", x))
                # conv2blk1 also takes this path (a 1x1 shortcut that neither downsamples nor
                # widens): a quirk of the released model.
                shortcut = conv("shortcut", x, channels, 1)
            else:
                shortcut = x
                x = activate(BatchNorm("bn", x))
            return shortcut + stem(x)

        def group(x, name, channels, count, stride):
            for i in range(1, count + 1):
                with tf.variable_scope("{}blk{}".format(name, i)):
                    x = block(x, channels, first=i == 1, stride=stride)
            return x

        with remap_variables(self.quantize_weight(fw)), \
                argscope([Conv2D, BatchNorm, MaxPooling, AvgPooling, GlobalAvgPooling], data_format=self.data_format), \
                argscope(BatchNorm, momentum=0.9, epsilon=1e-4), \
                argscope(Conv2D, use_bias=False):
            # The explicit asymmetric / mirror paddings reproduce the framework the model was trained in.
            x = self._pad_hw(image, 3, 2)
            x = Conv2D("conv1", x, 64, 7, strides=2, padding="VALID", use_bias=True)
            x = self._pad_hw(x, 1, 1, mode="SYMMETRIC")
            x = MaxPooling("pool1", x, 3, strides=2, padding="VALID")
            x = group(x, "conv2", 64, 2, stride=1)
            x = group(x, "conv3", 128, 2, stride=2)
            x = group(x, "conv4", 256, 2, stride=2)
            x = group(x, "conv5", 512, 2, stride=2)
            x = nonlin(BatchNorm("lastbn", x))
            x = GlobalAvgPooling("gap", x)
            # x49 (the 7x7 map's sum instead of its mean): a quirk of the released model.
            x = x * 49.0
            return FullyConnected("fct", x, 1000, use_bias=True)


    def packed_program(self):
        """The network of :meth:`get_logits` as a program of the packed engine (``--export-packed``)."""
        from dorefanet.packed import program as P

        bit_a = self.bits[1]   # ResNet-18 always clips, so A = 32 is activate(32): a clip
        ops = [P.normalize(self.image_mean, self.image_std),
               P.pad(3, 2), P.conv("conv1", 64, 7, stride=2, padding="VALID", quantized=False, bias=True),
               P.pad(1, 1, mode="symmetric"), P.maxpool(3, 2, "VALID")]
        for group, channels, stride in (("conv2", 64, 1), ("conv3", 128, 2), ("conv4", 256, 2), ("conv5", 512, 2)):
            for i in (1, 2):
                scope = "{}blk{}".format(group, i)
                if i == 1:
                    # x = activate(bn(pool(x))); shortcut = 1x1 conv of it; the stem continues from x
                    if stride != 1:
                        ops.append(P.avgpool(stride, stride))
                    ops += [P.affine(scope + "/bn"), P.activate(bit_a),
                            P.conv(scope + "/shortcut", channels, 1, src="x", dst="short")]
                    stem, shortcut = "x", "short"
                else:
                    # x itself is the shortcut; the stem starts from activate(bn(x)) in its own register
                    ops += [P.affine(scope + "/bn", dst="stem"), P.activate(bit_a, src="stem", dst="stem")]
                    stem, shortcut = "stem", "x"
                ops += [P.conv(scope + "/c3x3a", channels, 3, bn=scope + "/stembn", src=stem, dst=stem),
                        P.activate(bit_a, src=stem, dst=stem),
                        P.conv(scope + "/c3x3b", channels, 3, src=stem, dst=stem),
                        P.add(shortcut, stem, dst="x")]
        return ops + [P.affine("lastbn"), P.clip(), P.gap(), P.scale(49.0),
                      P.fc("fct", 1000, quantized=False, bias=True), P.softmax()]


def main(argv=None):
    """Train, evaluate, classify or export; see ``imagenet_utils.imagenet_main``."""
    # --help shows the title and the usage examples, not the developer notes after them.
    return imagenet_main(ResNet18Model, argv, description="\n\n".join(__doc__.split("\n\n")[:2]),
                         default_dorefa=DEFAULT_DOREFA)


if __name__ == "__main__":
    sys.exit(main())
