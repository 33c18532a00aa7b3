"""Bit-packed DoReFa-Net models and an inference engine that runs them with bit operations.

Reading and running need only numpy and numba (no TensorFlow)::

    from dorefanet.packed import load_packed
    model = load_packed("svhn-1,2,4.packed.npz")
    probs = model.predict(images)        # [B, H, W, 3] BGR, as the script feeds its graph

Files are written by the scripts' ``--export-packed`` (:mod:`dorefanet.packed.export`,
which needs TensorFlow); the format is :mod:`dorefanet.packed.format`.
"""
from .engine import PackedModel, load_packed
from .format import FORMAT, VERSION, PackedFormatError, is_packed_file, read_packed

__all__ = ["PackedModel", "load_packed", "PackedFormatError", "read_packed", "is_packed_file", "FORMAT", "VERSION"]
