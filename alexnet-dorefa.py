#!/usr/bin/env python
"""DoReFa-Net AlexNet on ImageNet (arXiv 1606.06160), the network of the published model zoo.

Architecture, names and preprocessing follow ``docs/model-zoo.md``: BGR uint8
224x224 input, mean/std normalisation, five convolutions (two-group conv1,
conv3, conv4), two 4096-wide fully-connected layers and ``fct``; weights
quantized by ``fw`` except in ``conv0`` and ``fct``; ``fg`` after every
quantized layer, before its batch norm.

For now only the model and a graph-building ``main`` exist; training,
evaluation and ``--run`` are wired to the shared modules separately.
"""
import sys

from tf_setup import tf  # noqa: I100  (must come before tensorpack)

from tensorpack.models import BatchNorm, Conv2D, FullyConnected, MaxPooling  # noqa: E402
from tensorpack.tfutils.argscope import argscope  # noqa: E402
from tensorpack.tfutils.summary import add_param_summary  # noqa: E402
from tensorpack.tfutils.varreplace import remap_variables  # noqa: E402

import cli  # noqa: E402
from dorefa import get_dorefa  # noqa: E402
from imagenet_utils import IMAGE_SIZE, ImageNetModel, build_inference_graph  # noqa: E402

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

    def get_logits(self, image):
        bit_w, bit_a, _ = self.bits
        fw, fa, fg = get_dorefa(*self.bits)

        def nonlin(x):
            # Full-precision activations keep relu; quantized ones need the [0, 1] range.
            if bit_a == 32:
                return tf.nn.relu(x)
            return tf.clip_by_value(x, 0.0, 1.0)

        def activate(x):
            return fa(nonlin(x))

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

    def optimizer(self):
        return tf.train.AdamOptimizer(self.learning_rate(), epsilon=1e-5)


def make_parser():
    """The command line: the shared flags plus ``--data-format``."""
    parser, groups = cli.make_parser(__doc__.splitlines()[0], DEFAULT_DOREFA)
    groups["model"].add_argument(
        "--data-format", choices=("channels_first", "channels_last"), default="channels_first",
        help="layout of the feature maps inside the network (NCHW is faster on GPUs; both work on the CPU)")
    return parser


def main(argv=None):
    """Parse the command line and build the graph (training/evaluation wiring comes separately)."""
    parser = make_parser()
    args = cli.check_modes(parser, parser.parse_args(argv))
    if args.load or args.eval or args.run or args.data:
        parser.error("--load/--eval/--run/--data are not available yet in this version of the script")
    model = AlexNetModel(args.dorefa, args.data_format, IMAGE_SIZE)
    with tf.Graph().as_default():
        build_inference_graph(model)
        count = sum(int(v.shape.num_elements()) for v in tf.global_variables())
        print("AlexNet {} ({}): {} variables, {} parameters".format(
            args.dorefa, args.data_format, len(tf.global_variables()), count))
    return 0


if __name__ == "__main__":
    sys.exit(main())
