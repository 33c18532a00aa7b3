"""CIFAR-10: the two official file layouts, the project's built-in shapes, and the data source.

:func:`load_cifar10` reads either official version from
https://www.cs.toronto.edu/~kriz/cifar.html, detected from the files present in
``data_dir`` (or in the ``cifar-10-batches-bin/`` or ``cifar-10-batches-py/``
directory the archives extract to):

* the **binary version**: ``data_batch_1.bin`` ... ``data_batch_5.bin`` (train)
  and ``test_batch.bin`` (test), each a sequence of 3073-byte records: one label
  byte 0-9, then the 32x32 red plane, the green plane and the blue plane;
* the **python version**: ``data_batch_1`` ... ``data_batch_5``, ``test_batch``
  (and ``batches.meta``), each a pickled dict whose ``b'data'`` is a uint8
  ``N x 3072`` array of the same RGB planes and whose ``b'labels'`` is a list of
  N ints 0-9.  The pickles are read by a restricted unpickler that builds numpy
  arrays and nothing else: any other global a file names (``os.system``, ...)
  is refused without being imported or called.

Images are returned as BGR uint8 ``N x 32 x 32 x 3`` arrays (the files store
RGB; they are flipped here so that training data, test data and ``--run``
images read with OpenCV share one channel order) and labels as int32 0-9 in
the order of :data:`CLASS_NAMES`.

:func:`synthetic_cifar` is the project's built-in shapes: a 10-class set of
32x32 colour images rendered in memory, so that a quick example needs no
download.  It is *not* CIFAR-10; see :data:`SHAPE_NAMES` for its classes.

:class:`CIFAR10` is the data source ``cifar10-resnet-dorefa.py`` gives the driver: an
in-memory data set (:mod:`dorefanet.image_arrays`) with this reader, the standard
pad-crop-flip augmentation and the ``--run`` resize.  Nothing here imports
TensorFlow or tensorpack.
"""
import io
import os
import pickle

import cv2
import numpy as np

from dorefanet.image_arrays import ImageArrays, render_built_in

__all__ = ["CIFAR10", "CIFAR_URL", "CLASS_NAMES", "SHAPE_NAMES", "CIFARDataError", "load_cifar_bin", "load_cifar_pickle",
           "find_cifar10", "load_cifar10", "render_shape", "synthetic_cifar", "TRAIN_SIZE", "TEST_SIZE"]

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_RECORD = 1 + 32 * 32 * 3
_BIN_FILES = {"train": ["data_batch_{}.bin".format(i) for i in range(1, 6)], "test": ["test_batch.bin"]}
_PY_FILES = {"train": ["data_batch_{}".format(i) for i in range(1, 6)], "test": ["test_batch"]}
_SUBDIRS = {"binary": "cifar-10-batches-bin", "python": "cifar-10-batches-py"}
_BIN_LAYOUT = ("the CIFAR-10 binary version from {} (records of 1 label byte 0-9 + 3072 pixel bytes: "
               "the R, G and B planes of 32x32)".format(CIFAR_URL))
_PY_LAYOUT = ("the CIFAR-10 python version from {} (a pickled dict with b'data' uint8 N x 3072 "
              "and b'labels' of N ints 0-9)".format(CIFAR_URL))
_EXPECTED = ("the CIFAR-10 binary version (data_batch_1.bin ... data_batch_5.bin, test_batch.bin) or the python "
             "version (data_batch_1 ... data_batch_5, test_batch, batches.meta), in the directory itself or in the "
             "{} or {} directory the archive extracts to, from {}".format(
                 _SUBDIRS["binary"] + "/", _SUBDIRS["python"] + "/", CIFAR_URL))


class CIFARDataError(ValueError):
    """A CIFAR-10 data file is missing, unsafe or not in the expected layout (one-line message)."""


def _one_line(text):
    return " ".join(str(text).split())


def _rgb_planes_to_bgr(pixels):
    """``N x 3072`` uint8 rows of R, G, B 32x32 planes -> C-contiguous BGR ``N x 32 x 32 x 3``."""
    return np.ascontiguousarray(pixels.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)[..., ::-1])


def _check_labels(path, labels, layout):
    bad = np.flatnonzero((labels < 0) | (labels > 9))
    if bad.size:
        raise CIFARDataError("{}: image {} has label {}, not 0-9; expected {}".format(
            path, int(bad[0]), int(labels[bad[0]]), layout))
    return labels.astype(np.int32)


# ------------------------------------------------------------------ the binary version
def load_cifar_bin(path):
    """Read one file of the binary version; return ``(images BGR uint8 N x 32 x 32 x 3, labels int32)``."""
    if not os.path.isfile(path):
        raise CIFARDataError("{}: file not found; expected {}".format(path, _BIN_LAYOUT))
    size = os.path.getsize(path)
    if size == 0 or size % _RECORD:
        raise CIFARDataError("{}: {} bytes is not a whole number of {}-byte records (1 label byte + 3072 pixel "
                             "bytes); the file may be truncated; expected {}".format(path, size, _RECORD, _BIN_LAYOUT))
    records = np.fromfile(path, np.uint8)
    if records.size != size:   # the file changed while it was read
        raise CIFARDataError("{}: read {} of {} bytes; expected {}".format(path, records.size, size, _BIN_LAYOUT))
    records = records.reshape(-1, _RECORD)
    labels = _check_labels(path, records[:, 0].astype(np.int64), _BIN_LAYOUT)
    return _rgb_planes_to_bgr(records[:, 1:]), labels


# ------------------------------------------------------------------ the python version
def _numpy_globals():
    """The globals a pickled numpy array may name, under numpy 1's and numpy 2's module names."""
    try:   # numpy 2
        from numpy._core import multiarray, numeric
    except ImportError:   # older numpy 1
        from numpy.core import multiarray, numeric
    found = {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar}
    if hasattr(numeric, "_frombuffer"):
        found["_frombuffer"] = numeric._frombuffer
    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):
        for name in ("_reconstruct", "scalar"):
            table[(core + ".multiarray", name)] = found[name]
        if "_frombuffer" in found:
            table[(core + ".numeric", "_frombuffer")] = found["_frombuffer"]
    return table


_NUMPY_GLOBALS = _numpy_globals()


def _latin1_encode(text, encoding="latin1", errors="strict"):
    """``_codecs.encode`` as Python 3 writes ``bytes`` at pickle protocol 2, and only for that."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError("_codecs.encode is only admitted for a str in 'latin1', got {} and {!r}".format(
            type(text).__name__, encoding))
    return text.encode("latin1")


def _empty_bytes(*args):
    """``bytes()``, as Python 3 writes ``b''`` at pickle protocol 2, and only that (no size, no iterable)."""
    if args:
        raise pickle.UnpicklingError("bytes is only admitted without arguments, got {} of them".format(len(args)))
    return b""


_PROTOCOL2_GLOBALS = {("_codecs", "encode"): _latin1_encode, ("__builtin__", "bytes"): _empty_bytes,
                      ("builtins", "bytes"): _empty_bytes}


class _BatchUnpickler(pickle.Unpickler):
    """Admits the globals of a pickled numpy array (and of bytes written by Python 3 at protocol 2), nothing else.

    ``find_class`` maps the admitted names to objects taken from the already
    imported numpy; any other name is refused before anything is imported.
    """

    def __init__(self, file, path):
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module, name):
        found = _NUMPY_GLOBALS.get((module, name)) or _PROTOCOL2_GLOBALS.get((module, name))
        if found is not None:
            return found
        raise CIFARDataError("{}: refused to load the global {}.{} (a CIFAR-10 batch holds only numpy arrays, "
                             "lists, bytes and numbers); the file is not a CIFAR-10 batch and may be malicious; "
                             "expected {}".format(self.path, _one_line(module), _one_line(name), _PY_LAYOUT))

    def persistent_load(self, pid):
        raise CIFARDataError("{}: refused a persistent id (a CIFAR-10 batch has none); expected {}".format(
            self.path, _PY_LAYOUT))


def _field(batch, key):
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    return None


def load_cifar_pickle(path):
    """Read one file of the python version; return ``(images BGR uint8 N x 32 x 32 x 3, labels int32)``.

    The file is read by a restricted unpickler: only numpy array reconstruction
    is admitted, so a planted file cannot run code.
    """
    if not os.path.isfile(path):
        raise CIFARDataError("{}: file not found; expected {}".format(path, _PY_LAYOUT))
    with open(path, "rb") as f:
        raw = f.read()
    try:
        batch = _BatchUnpickler(io.BytesIO(raw), path).load()
    except CIFARDataError:
        raise
    except Exception as err:  # pickle raises many types for truncated or foreign files
        raise CIFARDataError("{}: cannot be unpickled ({}: {}); the file may be truncated or not a CIFAR-10 batch; "
                             "expected {}".format(path, type(err).__name__, _one_line(err)[:200], _PY_LAYOUT)) from None
    if not isinstance(batch, dict):
        raise CIFARDataError("{}: holds a {}, not a dict; expected {}".format(path, type(batch).__name__, _PY_LAYOUT))
    data, labels = _field(batch, "data"), _field(batch, "labels")
    if data is None or labels is None:
        keys = sorted(repr(k) for k in batch)
        hint = " (CIFAR-100 files have fine_labels; this reads CIFAR-10)" if _field(batch, "fine_labels") is not None \
            else ""
        raise CIFARDataError("{}: has keys {} but needs b'data' and b'labels'{}; expected {}".format(
            path, ", ".join(keys) or "none", hint, _PY_LAYOUT))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 \
            or data.shape[0] == 0:
        what = "{} of shape {}".format(data.dtype, data.shape) if isinstance(data, np.ndarray) else type(data).__name__
        raise CIFARDataError("{}: b'data' is {}, not uint8 N x 3072 with N > 0; expected {}".format(
            path, what, _PY_LAYOUT))
    try:
        labels = np.asarray(labels)
    except Exception:  # e.g. a ragged list
        labels = np.asarray([None])
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise CIFARDataError("{}: b'labels' is not a list of ints (got {} {}); expected {}".format(
            path, labels.dtype, labels.shape, _PY_LAYOUT))
    if len(labels) != len(data):
        raise CIFARDataError("{}: {} labels for {} images; expected {}".format(path, len(labels), len(data),
                                                                                _PY_LAYOUT))
    labels = _check_labels(path, labels.astype(np.int64), _PY_LAYOUT)
    return _rgb_planes_to_bgr(data), labels


# ------------------------------------------------------------------ the directory
def _layout_in(directory):
    """``'binary'``, ``'python'`` or None: which version's files ``directory`` holds (binary first)."""
    if not os.path.isdir(directory):
        return None
    names = set(os.listdir(directory))
    if names & set(_BIN_FILES["train"] + _BIN_FILES["test"]):
        return "binary"
    if names & set(_PY_FILES["train"] + _PY_FILES["test"] + ["batches.meta"]):
        return "python"
    return None


def find_cifar10(data_dir):
    """``(directory, layout)``: where in ``data_dir`` the CIFAR-10 files are and which version they are.

    ``data_dir`` itself is looked at first, then ``cifar-10-batches-bin/`` and
    ``cifar-10-batches-py/`` under it.  A directory holding both versions is
    read as the binary version.
    """
    if not data_dir or not os.path.isdir(data_dir):
        raise CIFARDataError("--data {!r}: not a directory; expected one holding {}".format(data_dir, _EXPECTED))
    for directory in (data_dir, os.path.join(data_dir, _SUBDIRS["binary"]), os.path.join(data_dir, _SUBDIRS["python"])):
        layout = _layout_in(directory)
        if layout:
            return directory, layout
    raise CIFARDataError("{}: holds no CIFAR-10 files; expected {}".format(data_dir, _EXPECTED))


def load_cifar10(data_dir, split):
    """Load the ``'train'`` (batches 1-5 in order) or ``'test'`` split of CIFAR-10 from ``data_dir``.

    Either official version is read, found as :func:`find_cifar10` says (the
    binary version when a directory holds both).  Returns ``(images BGR uint8
    N x 32 x 32 x 3, labels int32 0-9)``.
    """
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test', got {!r}".format(split))
    directory, layout = find_cifar10(data_dir)
    files, load = (_BIN_FILES, load_cifar_bin) if layout == "binary" else (_PY_FILES, load_cifar_pickle)
    paths = [os.path.join(directory, name) for name in files[split]]
    for path in paths:
        if not os.path.isfile(path):
            raise CIFARDataError("{}: file not found (the directory holds the CIFAR-10 {} version, whose {} split is "
                                 "{}); expected {}".format(path, layout, split, ", ".join(files[split]), _EXPECTED))
    parts = [load(path) for path in paths]
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ------------------------------------------------------------------ the built-in shapes
SHAPE_NAMES = ("disc", "ring", "square", "triangle", "cross", "horizontal stripes", "vertical stripes",
               "diagonal stripes", "checkerboard", "two blobs")

_S = 32
_Y, _X = (np.mgrid[0:_S, 0:_S].astype(np.float32) + np.float32(0.5))
_TRIANGLE = np.array([[np.cos(a), np.sin(a)] for a in np.pi / 2 + np.arange(3) * 2 * np.pi / 3], np.float32)


def _colour_pair(rng):
    """A background and a shape colour, each any colour, with enough luminance contrast to be seen."""
    while True:   # a batch of candidates at a time: one random draw, not one per rejection
        pairs = rng.integers(0, 256, size=(16, 2, 3)).astype(np.float32)
        contrast = np.abs(pairs[:, 0].mean(axis=1) - pairs[:, 1].mean(axis=1))
        ok = np.flatnonzero(contrast > rng.uniform(45, 90, size=16))
        if ok.size:
            return pairs[ok[0], 0], pairs[ok[0], 1]


def _period_distance(t, period):
    """Distance (pixels) from ``t`` to the nearest multiple of ``period``."""
    return np.abs(t / period - np.round(t / period)) * period


def _shape_distance(rng, label):
    """A signed distance in pixels (negative inside) to a randomly placed shape of class ``label``."""
    r = rng.uniform(7, 13)                          # the shape's radius
    cx, cy = _S / 2 + rng.uniform(-1, 1, size=2) * (_S / 2 - 0.75 * r)
    if label == 5:     # horizontal stripes: the stripes' direction within 20 degrees of the class's
        angle = rng.uniform(-20, 20)
    elif label == 6:   # vertical
        angle = 90 + rng.uniform(-20, 20)
    elif label == 7:   # diagonal, either way
        angle = 90 * rng.integers(2) - 45 + rng.uniform(-15, 15)
    else:
        angle = rng.uniform(0, 360)
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    dx, dy = _X - cx, _Y - cy
    u, v = c * dx + s * dy, c * dy - s * dx
    if label in (0, 1, 5, 6, 7, 8):
        rho = np.sqrt(u * u + v * v)
    if label == 0:
        return rho - r
    if label == 1:
        return np.abs(rho - 0.72 * r) - rng.uniform(0.14, 0.26) * r
    if label == 2:
        return np.maximum(np.abs(u), np.abs(v)) - 0.78 * r
    if label == 3:
        return np.maximum(np.maximum(_TRIANGLE[0, 0] * u + _TRIANGLE[0, 1] * v, _TRIANGLE[1, 0] * u
                                     + _TRIANGLE[1, 1] * v), _TRIANGLE[2, 0] * u + _TRIANGLE[2, 1] * v) - 0.5 * r
    if label == 4:
        w, au, av = rng.uniform(0.2, 0.3) * r, np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au - r, av - w), np.maximum(au - w, av - r))
    if label in (5, 6, 7):   # stripes across a round patch, half a period wide each
        period = rng.uniform(4, 7)
        stripes = _period_distance(v + rng.uniform(0, period), period) - period / 4
        return np.maximum(rho - r, stripes)
    if label == 8:            # a checkerboard in a round patch
        cell = rng.uniform(3.5, 6)
        u, v = u + rng.uniform(0, cell), v + rng.uniform(0, cell)
        parity = (np.floor(u / cell) + np.floor(v / cell)) % 2
        edge = np.minimum(_period_distance(u, cell), _period_distance(v, cell))
        return np.maximum(rho - r, np.where(parity == 0, -edge, edge))
    # two blobs of one size side by side
    rb = rng.uniform(0.35, 0.5) * r
    off = r - rb
    return np.sqrt(np.minimum((u - off) ** 2, (u + off) ** 2) + v * v) - rb


def _blur(image):
    """A 3x3 binomial blur (edges repeated), in numpy."""
    p = np.pad(image, ((1, 1), (1, 1), (0, 0)), mode="edge")
    p = p[:-2] * 0.25 + p[1:-1] * 0.5 + p[2:] * 0.25
    return p[:, :-2] * 0.25 + p[:, 1:-1] * 0.5 + p[:, 2:] * 0.25


def _render_one(rng, label):
    bg, fg = _colour_pair(rng)
    # each colour shaded: a linear gradient, and for the background a low-frequency wave as texture
    gx, gy = rng.uniform(-30, 30, size=2) / _S
    ramp = ((_X - _S / 2) * gx + (_Y - _S / 2) * gy)[:, :, None]
    fx, fy, phase = rng.uniform(-0.6, 0.6, size=2).tolist() + [rng.uniform(0, 2 * np.pi)]
    wave = (rng.uniform(0, 14) * np.sin(_X * fx + _Y * fy + phase))[:, :, None]
    back = bg + ramp + wave
    front = fg + ramp * rng.uniform(-0.5, 0.5)
    cover = np.clip(0.5 - _shape_distance(rng, label), 0, 1)[:, :, None]   # one pixel of anti-aliasing
    image = back + (front - back) * cover
    if rng.random() < 0.4:   # a speck of a third colour, smaller than any blob
        sx, sy = rng.uniform(0, _S, size=2)
        speck = np.clip(rng.uniform(1, 1.8) + 0.5 - np.sqrt((_X - sx) ** 2 + (_Y - sy) ** 2), 0, 1)[:, :, None]
        image = image + (rng.integers(0, 256, size=3).astype(np.float32) - image) * speck
    if rng.random() < 0.5:
        image = _blur(image)
    image = image + rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(2, 12))
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)


def render_shape(seed, part, index):
    """Render image ``index`` of the built-in shapes' ``part`` (0 train, 1 test) for ``seed``.

    Every image has its own random stream, seeded by ``(seed, part, index)``, so
    any image can be drawn alone, in any order and in any worker process, and is
    always the same.  Returns ``(image BGR uint8 32x32x3, label int 0-9)``; the
    label indexes :data:`SHAPE_NAMES`.
    """
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(part), int(index)])))
    label = int(rng.integers(10))
    return _render_one(rng, label), label


TRAIN_SIZE = 10000
TEST_SIZE = 2000


def synthetic_cifar(split, seed=0, size=None, workers=None):
    """The built-in shapes of ``split`` (``'train'`` or ``'test'``) as ``(BGR uint8 N x 32 x 32 x 3, int32 N)``.

    Not CIFAR-10: ten classes of shapes and patterns (:data:`SHAPE_NAMES`:
    disc, ring, square, triangle, cross, horizontal, vertical and diagonal
    stripes, checkerboard, two blobs), each in random colours on a shaded,
    textured background, at a random position, size and rotation, with pixel
    noise, sometimes blurred and sometimes with a small speck of a third colour.
    The colours are drawn independently of the class.

    ``size`` defaults to :data:`TRAIN_SIZE` or :data:`TEST_SIZE`.  Train and test
    come from disjoint random streams (``part`` 0 and 1 of the seed); image ``i``
    is always the same for a seed, whatever ``size`` and ``workers`` (default:
    one forked process per core).  The defaults (10000 + 2000 images) render
    in about 1.7 s on 2 cores (2.8 s in one process), measured.
    """
    return render_built_in(render_shape, split, seed, size, workers, {"train": TRAIN_SIZE, "test": TEST_SIZE})


# ------------------------------------------------------------------ the data source of the CIFAR-10 script


class CIFAR10(ImageArrays):
    """CIFAR-10 (``--data DIR``, either layout) or the built-in shapes (``--synthetic``), fed at 32x32."""

    # the loss names and the per-channel (x - mean) / std of the ImageNet scripts (dorefanet.tf_model)
    head = "imagenet"
    validation_scalars, validation_errors = ("xentropy-loss",), (("wrong-top1", "test-error"),)
    name, synthetic_name, errors, error_class = "CIFAR-10", "built-in shapes", (CIFARDataError,), CIFARDataError
    data_help = "CIFAR_DIR (the binary or the Python version of CIFAR-10)"

    def __init__(self, image_size=32, pad=4):
        super().__init__(image_size)
        self.pad = pad

    def load(self, args, split):
        if args.synthetic:
            return synthetic_cifar(split, seed=args.seed)
        return load_cifar10(args.data, split)

    def augment(self, images, rng):
        """Zero-pad ``pad`` pixels on each side, take a random crop of the input size, flip half of them."""
        n, h, w, _ = images.shape
        p = self.pad
        padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
        tops = rng.randint(0, h + 2 * p - self.image_size + 1, size=n)
        lefts = rng.randint(0, w + 2 * p - self.image_size + 1, size=n)
        flips = rng.rand(n) < 0.5
        out = np.empty((n, self.image_size, self.image_size, 3), np.uint8)
        for i in range(n):
            crop = padded[i, tops[i]:tops[i] + self.image_size, lefts[i]:lefts[i] + self.image_size]
            out[i] = crop[:, ::-1] if flips[i] else crop
        return out

    def resize(self, image):
        """``--run``: any BGR image -> 32x32 (area-averaged when it shrinks), float32 0..255."""
        if image.shape[:2] != (self.image_size, self.image_size):
            shrink = image.shape[0] > self.image_size or image.shape[1] > self.image_size
            image = cv2.resize(image, (self.image_size, self.image_size),
                               interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        return image.astype(np.float32)

    def class_describer(self):
        """``--run``'s extra field of a class: its CIFAR-10 name (a model of the built-in shapes: SHAPE_NAMES)."""
        return lambda label: {"name": CLASS_NAMES[label]}
