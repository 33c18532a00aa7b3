"""The packed model file (format version 1): reading, checking and writing, with numpy only.

A packed file is an uncompressed ``.npz`` (a zip of ``.npy`` arrays, read with
``allow_pickle=False``).  Its entry ``__packed__`` is a 0-d unicode array
holding a JSON header; every other entry is an array named ``<layer>/<field>``.
docs/packed-format.md documents it for readers in other tools.

Header fields: ``format`` (``"dorefa-packed"``), ``version`` (1), ``model``,
``bits`` (``"W,A,G"``), ``input`` (``height``, ``width``, ``channels``, ``dtype``
of the images the program takes), ``classes``, ``layers`` (``{layer: {"kind",
"shape", "bits"}}``) and ``program`` (see :mod:`dorefanet.packed.program`); ``source``
and ``exported_by`` are informative.

Weights by ``kind`` (``shape`` is the TensorFlow variable's: conv
``[kh, kw, in/groups, out]``, fully connected ``[in, out]``):

* ``float``: ``<layer>/W``, float32 (or float16 when exported so);
* ``binary`` (W = 1, BWN): ``<layer>/planes`` uint8 ``[1, ceil(n/8)]`` holds
  ``b = (w > 0)`` and ``<layer>/E`` (float32 scalar); ``w = E * (2b - 1)``;
* ``dorefa`` (1 < W < 32): ``<layer>/planes`` uint8 ``[W, ceil(n/8)]``, plane i
  holding bit i of the code ``q`` in ``0 .. 2^W - 1``; ``w = 2 q / (2^W - 1) - 1``;
* ``ternary`` (TTQ): ``<layer>/planes`` uint8 ``[2, ceil(n/8)]``, the masks of
  ``w > 0`` and ``w < 0``, with ``<layer>/Wp`` and ``<layer>/Wn`` (float32
  scalars); ``w = Wp`` on the first mask, ``-Wn`` on the second, 0 elsewhere.

A plane is ``numpy.packbits(bits.reshape(-1), bitorder="little")`` of the n
weights in C order of ``shape``.  ``<layer>/scale`` and ``<layer>/shift``
(float32, one per output channel) are the bias and batch norm folded after
the layer: ``y = z * scale + shift`` (either may be absent: 1 and 0).
"""
import json
import math
import os
import zipfile

import numpy as np

__all__ = ["FORMAT", "VERSION", "KINDS", "PackedFormatError", "read_packed", "write_packed", "pack_weight_planes",
           "unpack_weight_planes", "is_packed_file"]

FORMAT = "dorefa-packed"
VERSION = 1
HEADER = "__packed__"
KINDS = ("float", "binary", "dorefa", "ternary")


class PackedFormatError(ValueError):
    """A packed model file is unreadable or inconsistent (one-line message naming the file)."""


def pack_weight_planes(planes):
    """``[p, ...]`` 0/1 array -> ``[p, ceil(n/8)]`` uint8, little bit order, C order within a plane."""
    planes = np.asarray(planes).astype(bool)
    return np.packbits(planes.reshape(planes.shape[0], -1), axis=1, bitorder="little")


def unpack_weight_planes(packed, shape):
    """The inverse of :func:`pack_weight_planes`: ``[p, *shape]`` uint8 of 0/1."""
    n = int(np.prod(shape))
    bits = np.unpackbits(packed, axis=1, count=n, bitorder="little")
    return bits.reshape((packed.shape[0],) + tuple(shape))


def is_packed_file(path):
    """True if ``path`` is a zip whose entries include the packed header (cheap: reads the zip index)."""
    try:
        with zipfile.ZipFile(path) as z:
            return HEADER + ".npy" in z.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def write_packed(path, header, arrays):
    """Write ``header`` (a JSON-able dict) and ``arrays`` to ``path`` atomically."""
    from dorefanet.atomic_file import atomic_open

    header = dict(header, format=FORMAT, version=VERSION)
    entries = {HEADER: np.array(json.dumps(header, sort_keys=True))}
    entries.update({name: np.asarray(value) for name, value in sorted(arrays.items())})
    with atomic_open(path, "wb") as f:
        np.savez(f, **entries)


def _expect(condition, path, message, *args):
    if not condition:
        raise PackedFormatError("{}: {}".format(path, message.format(*args)))


def _check_layer(path, name, spec, arrays):
    kind = spec.get("kind")
    _expect(kind in KINDS, path, "layer {} has kind {!r}; expected one of {}", name, kind, ", ".join(KINDS))
    shape = spec.get("shape")
    _expect(isinstance(shape, list) and len(shape) in (2, 4) and all(isinstance(d, int) and d > 0 for d in shape),
            path, "layer {} has shape {!r}; expected 2 or 4 positive sizes", name, shape)
    n = int(np.prod(shape))

    def need(field, dtypes, field_shape):
        key = "{}/{}".format(name, field)
        _expect(key in arrays, path, "layer {} ({}) lacks the array {}", name, kind, key)
        value = arrays[key]
        _expect(value.dtype in dtypes and tuple(value.shape) == tuple(field_shape), path,
                "{} is {} {}; expected {} {}", key, value.dtype, tuple(value.shape),
                "/".join(np.dtype(d).name for d in dtypes), tuple(field_shape))

    if kind == "float":
        need("W", (np.float32, np.float16), shape)
        return
    planes = {"binary": 1, "ternary": 2}.get(kind)
    if kind == "dorefa":
        planes = spec.get("bits")
        _expect(isinstance(planes, int) and 2 <= planes <= 31, path,
                "layer {} (dorefa) has bits {!r}; expected 2..31", name, planes)
    need("planes", (np.uint8,), (planes, math.ceil(n / 8)))
    for field in {"binary": ("E",), "ternary": ("Wp", "Wn")}.get(kind, ()):
        need(field, (np.float32,), ())


def read_packed(path):
    """Read and check a packed file; return ``(header, arrays)``.

    Raises :class:`PackedFormatError` with a one-line message for anything that
    is not a consistent version-1 packed file.
    """
    if not os.path.isfile(path):
        raise PackedFormatError("{}: file not found".format(path))
    try:
        with np.load(path, allow_pickle=False) as data:
            _expect(HEADER in data.files, path, "not a packed model (no {} entry); write one with --export-packed",
                    HEADER)
            try:
                header = json.loads(str(data[HEADER][()]))
            except (ValueError, TypeError) as err:
                raise PackedFormatError("{}: the {} header is not JSON ({})".format(path, HEADER, err)) from None
            arrays = {name: data[name] for name in data.files if name != HEADER}
    except PackedFormatError:
        raise
    except ValueError as err:
        raise PackedFormatError("{}: holds Python objects (pickle) or damaged arrays ({}); a packed model is plain "
                                "arrays".format(path, err)) from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise PackedFormatError("{}: not a readable packed model ({})".format(path, err)) from None
    _expect(isinstance(header, dict) and header.get("format") == FORMAT, path,
            "the header's format is not {!r}", FORMAT)
    _expect(header.get("version") == VERSION, path, "format version {!r}; this engine reads version {}",
            header.get("version"), VERSION)
    for field in ("model", "bits", "input", "classes", "layers", "program"):
        _expect(field in header, path, "the header lacks {!r}", field)
    _expect(isinstance(header["layers"], dict), path, "'layers' must map layer names to specs")
    for name, spec in header["layers"].items():
        _expect(isinstance(spec, dict), path, "layer {} must be an object", name)
        _check_layer(path, name, spec, arrays)
    for key, value in arrays.items():
        if key.endswith("/scale") or key.endswith("/shift"):
            _expect(value.dtype == np.float32 and value.ndim == 1, path, "{} must be a float32 vector", key)
    from .program import validate_program

    try:
        validate_program(header["program"], path)
    except ValueError as err:
        raise PackedFormatError(str(err)) from None
    return header, arrays
