#!/usr/bin/env python
"""DoReFa-Net ResNet-18 on ImageNet (arXiv 1606.06160), the network of the published model zoo.

    ./resnet-dorefa.py --load ResNet-18-14f.npz --run cat.jpg [--json]  # default --dorefa 1,4,32
    ./resnet-dorefa.py --load ResNet-18-14f.npz --eval --data ILSVRC
    ./resnet-dorefa.py --dorefa 1,4,32 --data ILSVRC --gpu 0,1           # train
    ./resnet-dorefa.py --fake --steps-per-epoch 20 --epochs 1            # try training without ImageNet
    ./resnet-dorefa.py --sweep 1,4,32 2,4,32 --data ILSVRC [--seeds 3]   # table + plot

Architecture, names and preprocessing follow ``docs/networks.md``: BGR
224x224 input fed as float 0..255 and divided by 256, the asymmetric paddings,
pre-activation blocks (with the ``conv2blk1`` quirk), ``lastbn`` -> global
average pool -> x49 -> ``fct``; weights quantized by ``fw`` except in
``conv1`` and ``fct``; activations always clipped to [0, 1].  No training
recipe was published for this model: the defaults (SGD with Nesterov momentum
0.9, lr 0.1, L2 1e-4 on every ``W``) are fb.resnet.torch's and untested for the
quantized network.  Published: (1,4,32) 59.2% top-1 validation accuracy (docs/model-zoo.md).
"""
import sys

from dorefanet import driver
from dorefanet.imagenet import ImageNetData


def network(net, x):
    """The layers, described once: built by TensorFlow and as the packed program (dorefanet.builder)."""

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


RECIPE = {
    "name": "resnet18", "title": "ResNet-18", "default_dorefa": "1,4,32",
    "input": {"size": 224, "dtype": "float32", "mean": (0.0, 0.0, 0.0), "std": 256.0},
    "activation_at_32": "clip",   # the published model clips its activations to [0, 1] at every A
    "optimizer": ("momentum", {"momentum": 0.9, "use_nesterov": True}), "lr": 0.1,
    "lr_schedule": [(30, 1e-2), (60, 1e-3), (85, 1e-4)],
    "epochs": 90, "batch": 256, "weight_decay": 1e-4, "weight_decay_pattern": r"/W$",
    # channels_last measured faster on a 2-core CPU (oneDNN): docs/training.md, "On the CPU"
    "cpu_data_format": "channels_last", "min_image_size": 64,
}

DATA = ImageNetData()


def main(argv=None):
    return driver.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
