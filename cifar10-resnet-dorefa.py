#!/usr/bin/env python
"""DoReFa-Net ResNet-20 on CIFAR-10 (He et al., arXiv 1512.03385): the literature's small benchmark.

    ./cifar10-resnet-dorefa.py --dorefa 2,2,32 --synthetic --epochs 3   # built-in shapes, no download
    ./cifar10-resnet-dorefa.py --dorefa 2,2,32 --data CIFAR_DIR         # the recipe below, 200 epochs
    ./cifar10-resnet-dorefa.py --load LOGDIR --eval --data CIFAR_DIR
    ./cifar10-resnet-dorefa.py --load MODEL --run a.png b.png [--json]
    ./cifar10-resnet-dorefa.py --sweep 32,32,32 1,2,32 2,2,32 --data CIFAR_DIR [--seeds 3]   # table + plot

CIFAR_DIR holds either version of CIFAR-10 (binary or Python), found from its files.
ResNet-20: a 3x3 conv of 16 channels, then 3 stages of 3 basic blocks (two 3x3
convs each) of 16, 32 and 64 channels, the first block of stages 2 and 3 with
stride 2 and a projection shortcut (1x1 conv + batch norm, He et al.'s option B;
identity shortcuts elsewhere), global average pooling and a 10-way fc.  Post-
activation blocks: conv-bn-act-conv-bn, add, act.  conv0 and fc stay in float.
Recipe: SGD momentum 0.9, lr 0.1 divided by 10 at 50% and 75% of the epochs,
L2 1e-4 on every weight, batch 128, 200 epochs; 4-pixel zero pad, random 32x32
crop, horizontal flip; per-channel (x - mean) / std with CIFAR-10's training-set
mean (B, G, R) 113.87, 122.95, 125.31 and std 66.70, 62.09, 62.99.
Published top-1 accuracy (docs/networks.md): float 91.6-92.1%; W2/A2 DoReFa 88.2%,
PACT 89.7%; W4/A4 DoReFa 90.5%, PACT 91.7%.
"""
import sys

from dorefanet import driver
from dorefanet.cifar_data import CIFAR10


def network(net, x):
    """The layers, described once: built by TensorFlow and as the packed program (dorefanet.builder)."""

    def block(x, channels, stride):
        y = net.activate(net.bn("bn1", net.conv("conv1", x, channels, 3, stride=stride)))
        y = net.bn("bn2", net.conv("conv2", y, channels, 3))
        # option B: a projection where the shape changes, identity elsewhere
        shortcut = net.bn("shortcutbn", net.conv("shortcut", x, channels, 1, stride=stride)) if stride != 1 else x
        return net.add(shortcut, y)

    # conv0 and fc stay in float (quantized=False), as in the papers that report this network
    x = net.activate(net.bn("bn0", net.conv("conv0", x, 16, 3, quantized=False)))
    for stage, channels in enumerate((16, 32, 64), start=1):
        for i in range(1, 4):
            with net.scope("stage{}blk{}".format(stage, i)):
                x = block(x, channels, stride=2 if stage > 1 and i == 1 else 1)
            # the last block's output is read by the float fc (through the average pool)
            x = net.nonlin(x) if (stage, i) == (3, 3) else net.activate(x)
    x = net.gap("gap", x)
    return net.fc("fc", x, 10, quantized=False, bias=True)


RECIPE = {
    "name": "resnet20", "run_name": "cifar10-resnet20", "title": "CIFAR-10 ResNet-20", "default_dorefa": "2,2,32",
    "input": {"size": 32, "dtype": "float32", "mean": (113.87, 122.95, 125.31), "std": (66.70, 62.09, 62.99)},
    "activation_at_32": "relu",
    "optimizer": ("momentum", {"momentum": 0.9}), "lr": 0.1,
    "lr_schedule": {"at_fractions": [(0.5, 0.01), (0.75, 0.001)]},
    "epochs": 200, "batch": 128, "weight_decay": 1e-4, "weight_decay_pattern": r"/W$",
    "cpu_data_format": "channels_last",
}

DATA = CIFAR10(image_size=RECIPE["input"]["size"])


def main(argv=None):
    return driver.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
