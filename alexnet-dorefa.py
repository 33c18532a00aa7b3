#!/usr/bin/env python
"""DoReFa-Net AlexNet on ImageNet (arXiv 1606.06160), the network of the published model zoo.

    ./alexnet-dorefa.py --dorefa 1,2,6 --data ILSVRC --gpu 0,1,2,3      # train, the published recipe
    ./alexnet-dorefa.py --dorefa 1,2,6 --load AlexNet-1,2,6.npz --eval --data ILSVRC
    ./alexnet-dorefa.py --dorefa 1,2,6 --load AlexNet-1,2,6.npz --run cat.jpg dog.png [--json]
    ./alexnet-dorefa.py --dorefa 1,2,6 --fake                             # try training without ImageNet
    ./alexnet-dorefa.py --sweep 1,2,6 1,2,32 --data ILSVRC [--seeds 3]    # table + plot

Architecture, names and preprocessing follow ``docs/networks.md``: BGR uint8
224x224 input, mean/std normalisation, five convolutions (two-group conv1,
conv3, conv4), two 4096-wide fully-connected layers and ``fct``; weights
quantized by ``fw`` except in ``conv0`` and ``fct``; ``fg`` after every
quantized layer, before its batch norm.  Recipe: Adam 2e-4 (epsilon 1e-5),
4e-5 after epoch 60, 8e-6 after epoch 75, 90 epochs, total batch 256, L2 5e-6
on ``fc.*/W``.  Published top-1 validation errors (docs/model-zoo.md): (1,2,6) 46.8%,
(1,32,32) BWN 44.3%, (1,1,32) BNN 51.5%, (8,8,8) 42.0%.
"""
import sys

from dorefanet import driver
from dorefanet.imagenet import ImageNetData


def network(net, x):
    """The layers, described once: built by TensorFlow and as the packed program (dorefanet.builder)."""
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


RECIPE = {
    "name": "alexnet", "title": "AlexNet", "default_dorefa": "1,2,6",
    # ImageNet mean / std in BGR order, in 0..255 units (model-zoo.md)
    "input": {"size": 224, "dtype": "uint8", "mean": tuple(v * 255.0 for v in (0.406, 0.456, 0.485)),
              "std": tuple(v * 255.0 for v in (0.225, 0.224, 0.229))},
    "activation_at_32": "relu",
    "optimizer": ("adam", {"epsilon": 1e-5}), "lr": 2e-4, "lr_schedule": [(60, 4e-5), (75, 8e-6)],
    "epochs": 90, "batch": 256,
    "weight_decay": 5e-6, "weight_decay_pattern": "fc.*/W", "histograms": ".*/W",
    # channels_last measured faster on a 2-core CPU (oneDNN): docs/training.md, "On the CPU"
    "cpu_data_format": "channels_last", "min_image_size": 64,
}

DATA = ImageNetData()


def main(argv=None):
    return driver.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
