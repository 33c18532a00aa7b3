"""SVHN cropped digits: the ``.mat`` files, the project's built-in synthetic digits, and the data source.

:class:`SVHNDigits` is what ``svhn-digit-dorefa.py`` gives the driver
(:mod:`dorefanet.driver`): an in-memory data set (:mod:`dorefanet.image_arrays`)
with SVHN's reader, augmentation and ``--run`` resize.  Nothing here imports TensorFlow, except the tensorpack
training flow when it is asked for.

Images are returned as BGR uint8 ``N x 32 x 32 x 3`` arrays (the ``.mat`` files
store RGB; they are flipped here so that training data, test data and
``--run`` images read with OpenCV share one channel order) and labels as int32
digits 0-9 (SVHN's label 10 means digit 0).
"""
import os

import cv2
import numpy as np

from dorefanet.image_arrays import ImageArrays, render_built_in

__all__ = ["SVHN_URL", "SVHNDataError", "load_svhn_mat", "load_svhn", "render_digit", "synthetic_digits", "SVHNDigits"]

SVHN_URL = "http://ufldl.stanford.edu/housenumbers/"
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}
_LAYOUT = ("a MATLAB v5 .mat file with 'X' uint8 of shape 32x32x3xN and 'y' of shape Nx1 "
           "with labels 1-10 (SVHN format 2, cropped digits, from {})".format(SVHN_URL))


class SVHNDataError(ValueError):
    """An SVHN data file is missing or not in the expected layout (one-line message)."""


def load_svhn_mat(path):
    """Read one SVHN ``*_32x32.mat`` file; return ``(images BGR uint8 NHWC, labels int32)``."""
    from scipy.io import loadmat

    if not os.path.isfile(path):
        raise SVHNDataError("{}: file not found; expected {}".format(path, _LAYOUT))
    try:
        data = loadmat(path)
    except NotImplementedError:
        raise SVHNDataError("{}: MATLAB v7.3 (HDF5) files are not supported; expected {}".format(
            path, _LAYOUT)) from None
    except Exception as err:  # scipy raises several types for truncated/corrupt files
        raise SVHNDataError("{}: cannot be read ({}: {}); the file may be truncated or corrupt; expected {}"
                            .format(path, type(err).__name__, err, _LAYOUT)) from None
    X, y = data.get("X"), data.get("y")
    if X is None or y is None:
        raise SVHNDataError("{}: has variables {} but needs 'X' and 'y'; expected {}".format(
            path, sorted(k for k in data if not k.startswith("__")), _LAYOUT))
    if X.ndim != 4 or X.shape[:3] != (32, 32, 3) or X.dtype != np.uint8:
        raise SVHNDataError("{}: 'X' is {} of shape {}; expected {}".format(path, X.dtype, X.shape, _LAYOUT))
    n = X.shape[3]
    if y.size != n or y.ndim != 2:
        raise SVHNDataError("{}: 'y' has shape {} for {} images; expected {}".format(path, y.shape, n, _LAYOUT))
    y = y.reshape(-1).astype(np.int64)
    if n == 0 or y.min() < 1 or y.max() > 10:
        raise SVHNDataError("{}: labels must be 1-10 ({} images, labels {}..{}); expected {}".format(
            path, n, y.min() if n else "-", y.max() if n else "-", _LAYOUT))
    images = np.ascontiguousarray(X.transpose(3, 0, 1, 2)[..., ::-1])
    return images, (y % 10).astype(np.int32)


def load_svhn(data_dir, split):
    """Load ``'train'`` (train plus extra when ``extra_32x32.mat`` is present) or ``'test'``."""
    if not data_dir or not os.path.isdir(data_dir):
        raise SVHNDataError("--data {!r}: not a directory; expected one holding {} and {} (and optionally {}), "
                            "downloaded from {}".format(data_dir, SVHN_FILES["train"], SVHN_FILES["test"],
                                                        SVHN_FILES["extra"], SVHN_URL))
    parts = [load_svhn_mat(os.path.join(data_dir, SVHN_FILES[split]))]
    extra = os.path.join(data_dir, SVHN_FILES["extra"])
    if split == "train" and os.path.exists(extra):
        parts.append(load_svhn_mat(extra))
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ------------------------------------------------------------------ built-in digits
_FONTS = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX,
          cv2.FONT_HERSHEY_TRIPLEX, cv2.FONT_HERSHEY_PLAIN, cv2.FONT_HERSHEY_COMPLEX_SMALL,
          cv2.FONT_HERSHEY_SCRIPT_SIMPLEX]
_CANVAS = 64


def _colour_pair(rng):
    """A background and a digit colour with enough luminance contrast to be readable."""
    while True:
        bg, fg = rng.randint(0, 256, size=(2, 3))
        if abs(int(bg.mean()) - int(fg.mean())) > 60:
            return bg.astype(np.float32), fg.astype(np.float32)


def _render_one(rng, digit):
    bg, fg = _colour_pair(rng)
    # background: a smooth colour gradient plus texture noise, like a wall or a plate
    ramp = np.linspace(-1, 1, _CANVAS, dtype=np.float32)
    gx, gy = rng.uniform(-25, 25, size=2)
    canvas = bg + (ramp[None, :, None] * gx + ramp[:, None, None] * gy)
    canvas = np.broadcast_to(canvas, (_CANVAS, _CANVAS, 3)).copy()

    font = _FONTS[rng.randint(len(_FONTS))]
    thickness = int(rng.randint(1, 5))
    # scale chosen so the digit is 18-30 px tall on the 64 px canvas (crop is ~40 px wide)
    (_, h0), _ = cv2.getTextSize("8", font, 1.0, thickness)
    scale = rng.uniform(18, 30) / max(h0, 1)
    (w, h), _ = cv2.getTextSize(str(digit), font, scale, thickness)
    gap = int(rng.randint(-1, 5))
    x = (_CANVAS - w) // 2 + int(rng.randint(-2, 3))
    y = (_CANVAS + h) // 2 + int(rng.randint(-2, 3))
    # text is drawn as an anti-aliased coverage mask, then blended in the digit colour
    ink = np.zeros((_CANVAS, _CANVAS), np.uint8)
    cv2.putText(ink, str(digit), (x, y), font, scale, 255, thickness, cv2.LINE_AA)
    # neighbours of a house number, partly cut off by the crop
    for side in (-1, 1):
        if rng.rand() < 0.7:
            other = str(rng.randint(10))
            (wo, _), _ = cv2.getTextSize(other, font, scale, thickness)
            xo = x + w + gap if side > 0 else x - gap - wo
            cv2.putText(ink, other, (xo, y), font, scale, 255, thickness, cv2.LINE_AA)
    alpha = (ink.astype(np.float32) / 255.0)[:, :, None]
    canvas = canvas * (1 - alpha) + fg * alpha

    # a small rotation/shear, then the crop around the centre digit
    angle = rng.uniform(-12, 12)
    M = cv2.getRotationMatrix2D((_CANVAS / 2, _CANVAS / 2), angle, 1.0)
    M[0, 1] += rng.uniform(-0.15, 0.15)
    canvas = cv2.warpAffine(canvas, M, (_CANVAS, _CANVAS), borderMode=cv2.BORDER_REFLECT)
    half = int(rng.randint(h // 2 + 3, h // 2 + 9))
    cx, cy = x + w // 2, y - h // 2
    crop = canvas[max(cy - half, 0):cy + half, max(cx - half, 0):cx + half]
    crop = cv2.resize(crop, (32, 32), interpolation=cv2.INTER_AREA)
    if rng.rand() < 0.5:
        k = 2 * int(rng.randint(0, 2)) + 1
        crop = cv2.GaussianBlur(crop, (k, k), rng.uniform(0.3, 1.2))
    crop = crop + rng.normal(0, rng.uniform(0, 10), size=crop.shape).astype(np.float32)
    return np.clip(crop, 0, 255).astype(np.uint8)


def render_digit(seed, part, index):
    """Render image ``index`` of the built-in set ``part`` (0 train, 1 test) for ``seed``.

    Every image has its own random stream, so any image can be drawn alone,
    in any order and in any worker process, and is always the same.
    Returns ``(image BGR uint8 32x32x3, label int)``.
    """
    state = np.random.SeedSequence([int(seed), int(part), int(index)]).generate_state(1)[0]
    rng = np.random.RandomState(int(state))
    label = int(rng.randint(10))
    return _render_one(rng, label), label


TRAIN_SIZE = 20480
TEST_SIZE = 2048


def synthetic_digits(split, seed=0, size=None, workers=None):
    """The built-in digits of ``split`` (``'train'`` or ``'test'``) as ``(uint8 N x 32 x 32 x 3, int32 N)``.

    Train and test come from disjoint random streams (``part`` 0 and 1 of the
    seed); image ``i`` is always the same for a seed.  The set is rendered once,
    in ``workers`` processes (default: one per core), and then augmented in
    memory like the real data, so rendering never slows training down.
    """
    return render_built_in(render_digit, split, seed, size, workers, {"train": TRAIN_SIZE, "test": TEST_SIZE})


# ------------------------------------------------------------------ the data source of the SVHN script
class SVHNDigits(ImageArrays):
    """SVHN (``--data DIR``) or the built-in digits (``--synthetic``), fed at ``image_size`` (the SVHN net: 40)."""

    name, synthetic_name, errors, error_class = "SVHN", "built-in digits", (SVHNDataError,), SVHNDataError
    data_help = "SVHN_DIR (with train_32x32.mat and test_32x32.mat)"

    def __init__(self, image_size=40):
        super().__init__(image_size)
        self._augmentors = None

    def load(self, args, split):
        if args.synthetic:
            return synthetic_digits(split, seed=args.seed)
        return load_svhn(args.data, split)

    def augment(self, images, rng):
        """Resized to the input (bilinear), then brightness +-30 and contrast x[0.5, 1.5] (tensorpack's), in uint8."""
        from dorefanet.seeded_batches import seed_augmentors

        if self._augmentors is None:
            from tensorpack.dataflow import imgaug

            self._augmentors = imgaug.AugmentorList([imgaug.Resize((self.image_size, self.image_size)),
                                                     imgaug.Brightness(30), imgaug.Contrast((0.5, 1.5))])
        seed_augmentors([self._augmentors], rng)
        return np.stack([self._augmentors.augment(image) for image in images])

    def resize(self, image):
        """``--run``: any BGR image -> the network's float input, through SVHN's 32x32 crop size."""
        if image.shape[:2] != (32, 32):
            shrink = image.shape[0] > 32 or image.shape[1] > 32
            image = cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        size = (self.image_size, self.image_size)
        return cv2.resize(image, size, interpolation=cv2.INTER_LINEAR).astype(np.float32)
