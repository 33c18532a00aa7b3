"""ImageNet (ILSVRC12) files and images, without TensorFlow.

Class names, image decoding and the evaluation preprocessing (shorter side to
256/224 of the input, bicubic, center crop: :func:`eval_sizes`), the ILSVRC12
file lists, and the validation batches (:class:`ValidationBatches`, decoded by
:func:`ordered_map`).  The training augmentation and tensorpack dataflows built
on them are ``imagenet_utils`` (tensorpack imports TensorFlow), which re-exports
this module's names; the scripts' data source is :mod:`dorefanet.imagenet`.
"""
import collections
import multiprocessing
import os
import re
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from dorefanet.image_io import ImageReadError, read_image_bgr  # one exception class for the project

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
#: The shipped class list: 1000 lines ``wnid words``; line i is class i.
CLASS_NAMES_FILE = os.path.join(ROOT, "data", "synset_words.txt")
NUM_CLASSES = 1000
#: Network input size and the shorter side the validation images are resized to.
IMAGE_SIZE = 224
RESIZE_SHORTER = 256
#: Where a flat validation directory's labels may live, relative to the data directory, in
#: the order they are looked for.
VAL_LABEL_FILES = (os.path.join("val", "val.txt"), "val.txt")
#: Files of a class directory that are read as images (compared case-insensitively); the
#: content, not the extension, decides how a file is decoded.
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")

_WNID = re.compile(r"n\d{8}\Z")


class ClassNamesError(ValueError):
    """The class-name list is missing or malformed (one-line message naming the file)."""


class ImageNetDataError(ValueError):
    """The ILSVRC12 directory does not have the expected layout (one-line message saying what was expected)."""


# ---------------------------------------------------------------------------------------------
# class names

def load_class_names(path=None, num_classes=NUM_CLASSES):
    """Read the class list: returns ``[(wnid, words), ...]`` where index i is class i.

    ``path`` defaults to the shipped ``data/synset_words.txt``.  Every line must be
    ``nXXXXXXXX words...``; there must be exactly ``num_classes`` lines (``None``:
    any number) and no duplicate wnid.  Raises :class:`ClassNamesError` otherwise.
    """
    path = CLASS_NAMES_FILE if path is None else os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise ClassNamesError("cannot read the class names file {}: {}; expected {} lines 'wnid words'".format(
            path, err.strerror or err, num_classes or "")) from None
    except UnicodeDecodeError:
        raise ClassNamesError("{} is not a UTF-8 text file of 'wnid words' lines".format(path)) from None
    names, seen = [], {}
    for number, line in enumerate(lines, 1):
        parts = line.strip().split(None, 1)
        if not parts and number == len(lines):
            continue  # a trailing blank line
        if len(parts) != 2 or not _WNID.match(parts[0]):
            raise ClassNamesError("{} line {}: expected 'nXXXXXXXX words', got {!r}".format(path, number, line[:80]))
        if parts[0] in seen:
            raise ClassNamesError("{} line {}: wnid {} already on line {}".format(
                path, number, parts[0], seen[parts[0]]))
        seen[parts[0]] = number
        names.append((parts[0], parts[1].strip()))
    if num_classes is not None and len(names) != num_classes:
        raise ClassNamesError("{} has {} classes, expected {}".format(path, len(names), num_classes))
    return names


def _wnid_to_label(class_names):
    return {wnid: index for index, (wnid, _) in enumerate(class_names)}


# ---------------------------------------------------------------------------------------------
# decoding and single-image / validation preprocessing

def read_image(path):
    """Decode an image file by its content (JPEG, PNG, ... whatever its extension) as BGR uint8 HxWx3.

    Grayscale images are expanded to three channels and an alpha channel is
    dropped.  Raises :class:`ImageReadError` naming the file when it cannot be
    read or decoded.  This is :func:`image_io.read_image_bgr`, the decoder
    ``--run`` uses, so that training, evaluation and single images are decoded
    the same way and raise the same exception class.
    """
    return read_image_bgr(path)


def resize_shorter_side(image, size=RESIZE_SHORTER, interpolation=cv2.INTER_CUBIC):
    """Resize so that the shorter side is ``size``; the longer becomes ``int(long * size / short + 0.5)``.

    Bicubic on the image's own dtype by default (uint8 for decoded images), as the
    published models were evaluated.
    """
    h, w = image.shape[:2]
    short = min(h, w)
    if h <= w:
        new_h, new_w = size, int(w * size / short + 0.5)
    else:
        new_h, new_w = int(h * size / short + 0.5), size
    if (new_h, new_w) == (h, w):
        return image
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    # cv2.resize drops a trailing channel axis of size 1; keep the input's rank.
    return resized.reshape((new_h, new_w) + image.shape[2:])


def center_crop(image, size=IMAGE_SIZE):
    """Crop the central ``size`` x ``size`` window, offsets ``(dim - size) // 2``."""
    h, w = image.shape[:2]
    if h < size or w < size:
        raise ValueError("cannot center-crop {0}x{0} from a {1}x{2} image".format(size, h, w))
    top, left = (h - size) // 2, (w - size) // 2
    return image[top:top + size, left:left + size]


def eval_sizes(image_size=IMAGE_SIZE):
    """(shorter side, crop) of the evaluation preprocessing for a network input of ``image_size``: 256/224 of it."""
    return image_size * RESIZE_SHORTER // IMAGE_SIZE, image_size


def preprocess_image(image, resize=RESIZE_SHORTER, crop=IMAGE_SIZE):
    """Single-image and validation preprocessing: shorter side to ``resize`` (bicubic), center crop ``crop``."""
    return center_crop(resize_shorter_side(image, resize), crop)


def load_image(path, resize=RESIZE_SHORTER, crop=IMAGE_SIZE):
    """:func:`read_image` then :func:`preprocess_image`: a BGR uint8 ``crop`` x ``crop`` x 3 array."""
    return preprocess_image(read_image(path), resize, crop)


def _is_image_file(path):
    name = os.path.basename(path)
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(path)


def _list_class_dirs(directory, wnid_to_label, what):
    """``[(path, label)]`` of the images in ``directory/<wnid>/``; errors name the offending directory."""
    files = []
    for entry in sorted(os.listdir(directory)):
        sub = os.path.join(directory, entry)
        if entry.startswith(".") or not os.path.isdir(sub):
            continue
        if entry not in wnid_to_label:
            raise ImageNetDataError("{} directory {} is not a class: expected directories named by the wnids "
                                    "of {}".format(what, sub, CLASS_NAMES_FILE))
        label = wnid_to_label[entry]
        files.extend((os.path.join(sub, name), label) for name in sorted(os.listdir(sub))
                     if _is_image_file(os.path.join(sub, name)))
    return files


def _read_label_file(label_file, image_dir, wnid_to_label):
    """``[(path, label)]`` from ``filename label`` lines (label: class index or wnid)."""
    num_classes = len(wnid_to_label)
    files = []
    try:
        with open(label_file, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ImageNetDataError("cannot read the validation label file {}: {}".format(label_file, err)) from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.split()
        where = "{} line {}".format(label_file, number)
        if len(parts) != 2:
            raise ImageNetDataError("{}: expected 'filename label', got {!r}".format(where, line[:80]))
        name, label = parts
        if label in wnid_to_label:
            label = wnid_to_label[label]
        else:
            try:
                label = int(label)
            except ValueError:
                label = -1
            if not 0 <= label < num_classes:
                raise ImageNetDataError("{}: label {!r} is neither a class index 0..{} nor a known wnid".format(
                    where, parts[1], num_classes - 1))
        path = os.path.join(image_dir, name)
        if not os.path.isfile(path):
            raise ImageNetDataError("{}: image {} does not exist".format(where, path))
        files.append((path, label))
    return files


def list_imagenet_files(datadir, split, class_names=None):
    """List ``(path, label)`` pairs of an ILSVRC12 split (``'train'`` or ``'val'``), sorted.

    Accepted layouts (``DIR`` = ``datadir``):

    * train: ``DIR/train/<wnid>/<image>``;
    * val: a label file ``DIR/val/val.txt`` or, failing that, ``DIR/val.txt``, of
      ``filename label`` lines (filename relative to ``DIR/val``; label a class
      index 0..999 or a wnid), for a flat ``DIR/val/`` -- the label file is used
      whenever it exists; otherwise ``DIR/val/<wnid>/<image>``.

    Class directories are matched to labels through the class list
    (``class_names``, default :func:`load_class_names`); images are the files
    whose extension is one of :data:`IMAGE_EXTENSIONS` (decoded by content).
    Raises :class:`ImageNetDataError` naming what is missing or wrong.
    """
    if split not in ("train", "val"):
        raise ValueError("unknown ImageNet split {!r}; expected 'train' or 'val'".format(split))
    if datadir is None:
        raise ImageNetDataError("no ImageNet directory given (--data DIR, with DIR/train and DIR/val)")
    datadir = os.fspath(datadir)
    if not os.path.isdir(datadir):
        raise ImageNetDataError("ImageNet directory {} does not exist".format(datadir))
    class_names = load_class_names() if class_names is None else class_names
    wnid_to_label = _wnid_to_label(class_names)
    split_dir = os.path.join(datadir, split)
    if split == "train":
        if not os.path.isdir(split_dir):
            raise ImageNetDataError("{} does not exist; expected the training images in {}/<wnid>/".format(
                split_dir, split_dir))
        files = _list_class_dirs(split_dir, wnid_to_label, "training")
    else:
        label_files = [os.path.join(datadir, name) for name in VAL_LABEL_FILES]
        label_file = next((name for name in label_files if os.path.isfile(name)), None)
        if not os.path.isdir(split_dir):
            raise ImageNetDataError("{} does not exist; expected the validation images in {}/<wnid>/ or a "
                                    "flat {} with a label file {}".format(split_dir, split_dir, split_dir,
                                                                          " or ".join(label_files)))
        if label_file is not None:
            files = _read_label_file(label_file, split_dir, wnid_to_label)
        else:
            has_dirs = any(os.path.isdir(os.path.join(split_dir, e)) for e in os.listdir(split_dir)
                           if not e.startswith("."))
            if not has_dirs:
                raise ImageNetDataError("{} has no <wnid>/ class directories and there is no label file {}".format(
                    split_dir, " or ".join(label_files)))
            files = _list_class_dirs(split_dir, wnid_to_label, "validation")
    if not files:
        raise ImageNetDataError("no images found in {} (extensions {})".format(split_dir, ", ".join(IMAGE_EXTENSIONS)))
    return files


def _raise_failures(dp):
    image = dp[0]
    if isinstance(image, dict):
        if image["error"] == "read":
            raise ImageReadError(image["message"])
        raise ImageNetDataError("{} {}".format(image["error"], image["message"]))
    return dp


def decode_safely(path, label, transform):
    """``[transform(read_image(path)), label]``, or ``[{'error':..., 'message':...}, label]`` if that fails.

    Worker threads / processes that raise die silently and leave tensorpack's
    parallel dataflows waiting forever, so failures travel as data (a dict
    serialises through ZMQ) and :func:`_raise_failures` re-raises them in the
    consumer, naming the file.
    """
    try:
        return [transform(read_image(path)), label]
    except ImageReadError as err:
        return [{"error": "read", "message": str(err)}, label]
    except Exception as err:  # noqa: BLE001 - re-raised by _raise_failures with the file name
        return [{"error": type(err).__name__, "message": "while preparing {}: {}".format(path, err)}, label]


def ordered_map(function, items, threads):
    """``function(item)`` of each item, in the items' order, computed by ``threads`` threads (0: in this one).

    A pool of futures keeps the order (evaluation is reproducible) and hands a
    worker's exception to the consumer; OpenCV releases the GIL while decoding and
    resizing, so the threads do run in parallel.  At most ``4 * threads`` results are
    computed ahead of the consumer.
    """
    if threads == 0:
        for item in items:
            yield function(item)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="imagenet-decode") as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= 4 * threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def default_parallelism():
    """Decoding workers by default: half the CPUs (hyper-threading), at least 1, at most 40."""
    return max(1, min(40, multiprocessing.cpu_count() // 2))


# ---------------------------------------------------------------------------------------------
# validation batches without tensorpack

class ValidationBatches:
    """The batches of ``get_imagenet_dataflow(datadir, 'val', batch_size, fbresnet_augmentor(False, image_size),
    parallel)``, without tensorpack: ``[images uint8 BxSxSx3 BGR, labels int32 B]``, every image once in
    the sorted file order, the last batch possibly smaller, decoded by ``parallel`` threads (0: in the
    calling thread).  A failing file raises the same error as there, when its batch is drawn.
    """

    def __init__(self, datadir, batch_size, image_size=IMAGE_SIZE, parallel=None, files=None):
        if batch_size < 1:
            raise ValueError("batch size must be >= 1, got {}".format(batch_size))
        self.files = list(list_imagenet_files(datadir, "val") if files is None else files)
        self.batch_size = batch_size
        self.parallel = default_parallelism() if parallel is None else int(parallel)
        if self.parallel < 0:
            raise ValueError("parallel must be >= 0, got {}".format(self.parallel))
        self.resize, self.crop = eval_sizes(image_size)

    def reset_state(self):
        pass

    def __len__(self):
        return -(-len(self.files) // self.batch_size)

    def _prepare(self, item):
        path, label = item
        return decode_safely(path, label, lambda image: preprocess_image(image, resize=self.resize, crop=self.crop))

    def _samples(self):
        for sample in ordered_map(self._prepare, self.files, self.parallel):
            yield _raise_failures(sample)

    def __iter__(self):
        holder = []
        for sample in self._samples():
            holder.append(sample)
            if len(holder) == self.batch_size:
                yield _batch(holder)
                holder = []
        if holder:
            yield _batch(holder)


def _batch(samples):
    """tensorpack's ``BatchData.aggregate_batch`` of ``[image, label]`` samples (arrays keep their dtype, ints int32)."""
    result = []
    for k in range(2):
        values = [s[k] for s in samples]
        first = values[0]
        dtype = "int32" if isinstance(first, int) and not isinstance(first, bool) else getattr(first, "dtype", None)
        result.append(np.asarray(values, dtype=dtype))
    return result
