#!/usr/bin/env python
"""DoReFa-Net on SVHN digits: train, evaluate, run and export at any (W,A,G) bit widths.

    ./svhn-digit-dorefa.py --dorefa 1,2,4 --synthetic --epochs 3     # built-in digits, no download
    ./svhn-digit-dorefa.py --dorefa 1,2,4 --data SVHN_DIR             # the published recipe
    ./svhn-digit-dorefa.py --dorefa 1,2,4 --load LOGDIR --eval --data SVHN_DIR
    ./svhn-digit-dorefa.py --dorefa 1,2,4 --load MODEL --run a.png b.png [--json]
    ./svhn-digit-dorefa.py --dorefa 1,2,4 --load LOGDIR --export model.npz
    ./svhn-digit-dorefa.py --dorefa 1,2,4 --summary [--json]          # per-layer bits, MACs, BOPs, sizes
    ./svhn-digit-dorefa.py --sweep 32,32,32 1,2,4 1,1,4 --synthetic --epochs 3 [--seeds 3]   # table + plot

Network and recipe: docs/networks.md (SVHN digit net); published errors
(1,1,4) 3.1-3.2%, (1,2,4) 3.0-3.1%, (32,32,32) about 2.3%.

The input is a 40x40 BGR image (SVHN's 32x32 digits, resized) divided by 256.
Recipe: Adam 1e-3 (epsilon 1e-5), halved every 100 epochs, 200 epochs of batch
128 (4721 steps: one pass over train + extra), L2 1e-7 on the fully-connected
weights; conv0 and fc1 stay in float.
"""
import sys

from dorefanet import driver
from dorefanet.svhn_data import SVHNDigits


def network(net, x):
    """The layers, described once: built by TensorFlow and as the packed program (dorefanet.builder)."""
    # conv0 and fc1 stay in float (quantized=False), as published
    x = net.conv("conv0", x, 48, 5, padding="VALID", quantized=False, bias=True)
    x = net.activate(net.maxpool("pool0", x, 2, padding="SAME"))
    x = net.activate(net.bn("bn1", net.conv("conv1", x, 64, 3)))
    x = net.bn("bn2", net.conv("conv2", x, 64, 3))
    x = net.activate(net.maxpool("pool1", x, 2, padding="SAME"))
    x = net.activate(net.bn("bn3", net.conv("conv3", x, 128, 3, padding="VALID")))
    x = net.activate(net.bn("bn4", net.conv("conv4", x, 128, 3)))
    x = net.activate(net.bn("bn5", net.conv("conv5", x, 128, 3, padding="VALID")))
    x = net.dropout("drop", x, rate=0.5)
    x = net.nonlin(net.bn("bn6", net.conv("conv6", x, 512, 5, padding="VALID")))
    return net.fc("fc1", x, 10, quantized=False, bias=True)


RECIPE = {
    "name": "svhn-digit", "run_name": "svhn", "title": "SVHN digit net", "default_dorefa": "1,2,4",
    "input": {"size": 40, "dtype": "float32", "mean": (0.0, 0.0, 0.0), "std": 256.0},
    "activation_at_32": "relu",
    "optimizer": ("adam", {"epsilon": 1e-5}), "lr": 1e-3, "lr_schedule": {"halve_every": 100},
    "epochs": 200, "batch": 128,
    "weight_decay": 1e-7, "weight_decay_pattern": r"^fc.*/W$",
    "cpu_data_format": "channels_last",
}

DATA = SVHNDigits(image_size=RECIPE["input"]["size"])


def main(argv=None):
    return driver.main(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
