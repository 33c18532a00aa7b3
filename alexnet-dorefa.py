#!/usr/bin/env python
"""DoReFa-Net AlexNet on ImageNet (arXiv 1606.06160), the network of the published model zoo.

    ./alexnet-dorefa.py --dorefa 1,2,6 --data ILSVRC --gpu 0,1,2,3      # train, the published recipe
    ./alexnet-dorefa.py --dorefa 1,2,6 --load AlexNet-1,2,6.npz --eval --data ILSVRC
    ./alexnet-dorefa.py --dorefa 1,2,6 --load AlexNet-1,2,6.npz --run cat.jpg dog.png [--json]
    ./alexnet-dorefa.py --dorefa 1,2,6 --fake                             # try training without ImageNet

Architecture, names and preprocessing follow ``docs/model-zoo.md``: BGR uint8
224x224 input, mean/std normalisation, five convolutions (two-group conv1,
conv3, conv4), two 4096-wide fully-connected layers and ``fct``; weights
quantized by ``fw`` except in ``conv0`` and ``fct``; ``fg`` after every
quantized layer, before its batch norm.  Recipe: Adam 2e-4 (epsilon 1e-5),
4e-5 after epoch 60, 8e-6 after epoch 75, 90 epochs, total batch 256, L2 5e-6
on ``fc.*/W``.  Everything else (flags, data, training, evaluation) is
``imagenet_utils.imagenet_main``.
"""
import sys

from dorefanet.tf_setup import tf  # noqa: I100  (must come before tensorpack)

from tensorpack.models import BatchNorm, Conv2D, FullyConnected, MaxPooling  # noqa: E402
from tensorpack.tfutils.argscope import argscope  # noqa: E402
from tensorpack.tfutils.summary import add_param_summary  # noqa: E402
from tensorpack.tfutils.varreplace import remap_variables  # noqa: E402

from dorefanet import cli  # noqa: E402,F401  (tests reach cli.Bits through the script)
from dorefa import get_dorefa, quantize_clipped  # noqa: E402
from imagenet_utils import ImageNetModel, imagenet_main  # noqa: E402

DEFAULT_DOREFA = "1,2,6"

__all__ = ["AlexNetModel", "DEFAULT_DOREFA", "main"]


class AlexNetModel(ImageNetModel):
    """DoReFa AlexNet: ``AlexNetModel(bits=(1, 2, 6), data_format='channels_first', image_size=224)``.

    ``bits`` is ``(W, A, G)`` (a :class:`cli.Bits` works), W may be ``'t'`` (TTQ).
    Other ``image_size`` values change only the shape of ``fc0/W`` (the flattened
    final map), which is useful for small tests; the published weights need 224.
    """

    image_dtype = tf.uint8
    # ImageNet mean / std in BGR order, in 0..255 units (model-zoo.md).
    image_mean = tuple(v * 255.0 for v in (0.406, 0.456, 0.485))
    image_std = tuple(v * 255.0 for v in (0.225, 0.224, 0.229))
    first_layer = "conv0"
    last_layer = "fct"
    weight_decay = 5e-6
    weight_decay_pattern = "fc.*/W"
    # Adam 2e-4 (epsilon 1e-5), 4e-5 from epoch 60, 8e-6 from epoch 75, 90 epochs of total batch 256.
    base_lr = 2e-4
    lr_schedule = ((60, 4e-5), (75, 8e-6))
    max_epoch = 90
    total_batch_size = 256
    model_name = "alexnet"
    # channels_last measured faster on a 2-core CPU (oneDNN), e.g. 2.17 s vs 2.48 s per training step and
    # 0.66 s vs 0.69 s per forward pass of 32 images at 224 (README, "On the CPU")
    cpu_data_format = "channels_last"
    min_image_size = 64

    def get_logits(self, image):
        bit_w, bit_a, _ = self.bits
        fw, fa, fg = get_dorefa(*self.bits)

        def nonlin(x):
            # Full-precision activations keep relu; quantized ones need the [0, 1] range.
            if bit_a == 32:
                return tf.nn.relu(x)
            return tf.clip_by_value(x, 0.0, 1.0)

        def activate(x):
            # quantize_clipped(x, A) is fa(clip(x, 0, 1)) bit for bit, with a one-pass gradient
            return fa(nonlin(x)) if bit_a == 32 else quantize_clipped(x, bit_a)

        with remap_variables(self.quantize_weight(fw)), \
                argscope([Conv2D, BatchNorm, MaxPooling], data_format=self.data_format), \
                argscope(BatchNorm, momentum=0.9, epsilon=1e-4), \
                argscope(Conv2D, use_bias=False):
            x = Conv2D("conv0", image, 96, 12, strides=4, padding="VALID", use_bias=True)
            x = activate(x)
            x = Conv2D("conv1", x, 256, 5, padding="SAME", split=2)
            x = BatchNorm("bn1", fg(x))
            x = activate(MaxPooling("pool1", x, 3, strides=2, padding="SAME"))

            x = Conv2D("conv2", x, 384, 3)
            x = BatchNorm("bn2", fg(x))
            x = activate(MaxPooling("pool2", x, 3, strides=2, padding="SAME"))

            x = Conv2D("conv3", x, 384, 3, split=2)
            x = activate(BatchNorm("bn3", fg(x)))

            x = Conv2D("conv4", x, 256, 3, split=2)
            x = BatchNorm("bn4", fg(x))
            x = activate(MaxPooling("pool4", x, 3, strides=2, padding="VALID"))

            # The published fc0 weights expect the map flattened as (c, h, w).
            if self.data_format == "channels_last":
                x = tf.transpose(x, [0, 3, 1, 2], name="to_chw")
            x = FullyConnected("fc0", x, 4096, use_bias=True)
            x = activate(BatchNorm("bnfc0", fg(x)))

            x = FullyConnected("fc1", x, 4096, use_bias=False)
            x = nonlin(BatchNorm("bnfc1", fg(x)))
            logits = FullyConnected("fct", x, 1000, use_bias=True)
        add_param_summary((".*/W", ["histogram", "rms"]))
        return logits

    def packed_program(self):
        """The network of :meth:`get_logits` as a program of the packed engine (``--export-packed``)."""
        from dorefanet.packed import program as P

        bit_a = self.bits[1]

        def nonlin():
            return P.nonlin_relu_at_32(bit_a)

        def activate():
            return P.activate_relu_at_32(bit_a)

        return [
            P.normalize(self.image_mean, self.image_std),
            P.conv("conv0", 96, 12, stride=4, padding="VALID", quantized=False, bias=True), activate(),
            P.conv("conv1", 256, 5, groups=2, bn="bn1"), P.maxpool(3, 2, "SAME"), activate(),
            P.conv("conv2", 384, 3, bn="bn2"), P.maxpool(3, 2, "SAME"), activate(),
            P.conv("conv3", 384, 3, groups=2, bn="bn3"), activate(),
            P.conv("conv4", 256, 3, groups=2, bn="bn4"), P.maxpool(3, 2, "VALID"), activate(),
            P.fc("fc0", 4096, bias=True, bn="bnfc0", flatten="chw"), activate(),
            P.fc("fc1", 4096, bn="bnfc1"), nonlin(),
            P.fc("fct", 1000, quantized=False, bias=True),
            P.softmax(),
        ]

    def optimizer(self):
        return tf.train.AdamOptimizer(self.learning_rate(), epsilon=1e-5)


def main(argv=None):
    """Train, evaluate, classify or export; see ``imagenet_utils.imagenet_main``."""
    # --help shows the title and the usage examples, not the developer notes after them.
    return imagenet_main(AlexNetModel, argv, description="\n\n".join(__doc__.split("\n\n")[:2]),
                         default_dorefa=DEFAULT_DOREFA)


if __name__ == "__main__":
    sys.exit(main())
