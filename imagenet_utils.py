"""ImageNet (ILSVRC12) pieces shared by ``alexnet-dorefa.py`` and ``resnet-dorefa.py``.

* class names (``data/synset_words.txt``, line i = class i): :func:`load_class_names`;
* image decoding and the single-image / validation preprocessing of
  ``docs/model-zoo.md`` (shorter side to 256 bicubic, center crop 224):
  :func:`read_image`, :func:`preprocess_image`, :func:`load_image`;
* the fb.resnet.torch training augmentation: :func:`fbresnet_augmentor`;
* ILSVRC12 dataflows (``DIR/train/<wnid>/*``, ``DIR/val/...``) and fake data:
  :func:`get_imagenet_dataflow`, :func:`fake_dataflow`;
* the tensorpack ``ModelDesc`` base class of both models: :class:`ImageNetModel`;
* the command line of both scripts (train, ``--eval``, ``--run``, ``--export``): :func:`imagenet_main`.

Import order: this module imports :mod:`tf_setup` first, as every module of the
project does.
"""
import argparse
import collections
import functools
import multiprocessing
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

from dorefanet.tf_setup import tf  # noqa: I100  (must come before tensorpack)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from tensorpack import ModelDesc  # noqa: E402
from tensorpack.dataflow import (  # noqa: E402
    BatchData, DataFlow, FakeData, MapData, MultiProcessRunnerZMQ, ProxyDataFlow, imgaug)
from tensorpack.dataflow.imgaug.transform import CropTransform, ResizeTransform, TransformList  # noqa: E402
from tensorpack.tfutils.summary import add_moving_summary  # noqa: E402
from tensorpack.models import regularize_cost  # noqa: E402
from tensorpack.utils.utils import get_rng  # noqa: E402

from dorefanet import cli  # noqa: E402
from dorefanet import distributed  # noqa: E402
from dorefa import check_bits  # noqa: E402
from dorefanet.image_io import ImageReadError, read_image_bgr  # noqa: E402  (one exception class for the project)
from dorefanet.inference import (EvaluationError, TopKError, evaluate_topk, load_predictor, make_predictor,  # noqa: E402,F401
                       results_only_on_stdout, run_images, topk_wrong)
from dorefanet.checkpoints import (ModelLoadError, StrictInit, build_inference_graph, export_weights,  # noqa: E402,F401
                      latest_checkpoint, read_weights)
from dorefanet.packed.export import PackedExportError, export_packed  # noqa: E402
from dorefanet.training import TrainingSetupError, available_gpus, launch, plan_run, select_trainer  # noqa: E402

__all__ = [
    "CLASS_NAMES_FILE", "NUM_CLASSES", "IMAGE_SIZE", "RESIZE_SHORTER", "VAL_LABEL_FILES",
    "ClassNamesError", "ImageReadError", "ImageNetDataError",
    "load_class_names", "read_image", "resize_shorter_side", "center_crop", "preprocess_image", "load_image",
    "RandomSizedCrop", "fbresnet_augmentor", "list_imagenet_files", "get_imagenet_dataflow", "fake_dataflow",
    "ImageNetModel", "build_inference_graph", "TopKError", "evaluate_topk", "topk_wrong", "normalize_data_format",
    "IMAGE_EXTENSIONS", "default_parallelism",
    "ILSVRC12_TRAIN_IMAGES", "make_imagenet_parser", "parse_imagenet_args", "imagenet_main",
]

ROOT = os.path.dirname(os.path.abspath(__file__))
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


def preprocess_image(image, resize=RESIZE_SHORTER, crop=IMAGE_SIZE):
    """Single-image and validation preprocessing: shorter side to ``resize`` (bicubic), center crop ``crop``."""
    return center_crop(resize_shorter_side(image, resize), crop)


def load_image(path, resize=RESIZE_SHORTER, crop=IMAGE_SIZE):
    """:func:`read_image` then :func:`preprocess_image`: a BGR uint8 ``crop`` x ``crop`` x 3 array."""
    return preprocess_image(read_image(path), resize, crop)


# ---------------------------------------------------------------------------------------------
# training augmentation (fb.resnet.torch)

class RandomSizedCrop(imgaug.ImageAugmentor):
    """Random-sized crop (Szegedy et al. 2015, as in fb.resnet.torch), resized to ``size`` x ``size``.

    Up to ``attempts`` times, draw an area fraction in ``area`` and an aspect
    ratio (width / height) in ``aspect``, swap width and height with
    probability 1/2, and take the crop at a uniformly random position if it
    fits.  If no draw fits, fall back to shorter side -> ``size`` and a center
    crop.
    """

    def __init__(self, size=IMAGE_SIZE, area=(0.08, 1.0), aspect=(3.0 / 4.0, 4.0 / 3.0), attempts=10,
                 interp=cv2.INTER_CUBIC):
        super().__init__()
        self._init(locals())

    def get_transform(self, img):
        h, w = img.shape[:2]
        for _ in range(self.attempts):
            target = self.rng.uniform(*self.area) * h * w
            ratio = self.rng.uniform(*self.aspect)
            crop_w = int(np.sqrt(target * ratio) + 0.5)
            crop_h = int(np.sqrt(target / ratio) + 0.5)
            if self.rng.uniform() < 0.5:
                crop_w, crop_h = crop_h, crop_w
            if 0 < crop_h <= h and 0 < crop_w <= w:
                top = self.rng.randint(0, h - crop_h + 1)
                left = self.rng.randint(0, w - crop_w + 1)
                return TransformList([CropTransform(top, left, crop_h, crop_w),
                                      ResizeTransform(crop_h, crop_w, self.size, self.size, self.interp)])
        short = min(h, w)
        new_h, new_w = (self.size, int(w * self.size / short + 0.5)) if h <= w else \
            (int(h * self.size / short + 0.5), self.size)
        return TransformList([ResizeTransform(h, w, new_h, new_w, self.interp),
                              CropTransform((new_h - self.size) // 2, (new_w - self.size) // 2, self.size, self.size)])


# fb.resnet.torch's PCA lighting constants are for RGB; reversed here for BGR images.
_EIGVAL_BGR = np.asarray([0.2175, 0.0188, 0.0045][::-1], dtype=np.float32) * 255.0
_EIGVEC_BGR = np.asarray([[-0.5675, 0.7192, 0.4009],
                          [-0.5808, -0.0045, -0.8140],
                          [-0.5836, -0.6948, 0.4203]], dtype=np.float32)[::-1, ::-1]


def fbresnet_augmentor(is_training, size=IMAGE_SIZE, interp=cv2.INTER_CUBIC):
    """The augmentors of fb.resnet.torch for BGR uint8 images, as a list of tensorpack augmentors.

    Training: random-sized crop (8%-100% area, aspect 3/4..4/3) resized to
    ``size`` (``interp``: bicubic by default, ``cv2.INTER_LINEAR`` is faster),
    then in random order brightness x[0.6, 1.4], contrast x[0.6, 1.4],
    saturation 1 +- 0.4 and PCA lighting (std 0.1), computed in float32, back
    to uint8, and a random horizontal flip.  Evaluation: :func:`preprocess_image`
    (shorter side 256 bicubic, center crop 224).
    """
    if not is_training:
        return [imgaug.MapImage(lambda img: preprocess_image(img, resize=size * RESIZE_SHORTER // IMAGE_SIZE,
                                                             crop=size))]
    return [
        RandomSizedCrop(size, interp=interp),
        imgaug.ToFloat32(),  # the colour jitter below would otherwise round to uint8 at every step
        imgaug.RandomOrderAug([
            imgaug.BrightnessScale((0.6, 1.4)),
            imgaug.Contrast((0.6, 1.4), rgb=False),
            imgaug.Saturation(0.4, rgb=False),
            imgaug.Lighting(0.1, eigval=_EIGVAL_BGR, eigvec=_EIGVEC_BGR),
        ]),
        imgaug.ToUint8(),
        imgaug.Flip(horiz=True),
    ]


# ---------------------------------------------------------------------------------------------
# ILSVRC12 file lists and dataflows

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


class _FileList(DataFlow):
    """Yields ``[path, label]``, optionally reshuffled at every pass."""

    def __init__(self, files, shuffle):
        self.files = list(files)
        self.shuffle = shuffle
        self.rng = None

    def reset_state(self):
        # get_rng seeds from the pid and the time, so forked workers shuffle differently.
        self.rng = get_rng(self)

    def __len__(self):
        return len(self.files)

    def __iter__(self):
        order = np.arange(len(self.files))
        if self.shuffle:
            self.rng.shuffle(order)
        for index in order:
            yield list(self.files[index])


class _DecodeAugment:
    """Decode ``[path, label]`` and augment the image; errors become ``[{'error':..., 'message':...}, label]``.

    Worker threads / processes that raise die silently and leave tensorpack's
    parallel dataflows waiting forever, so failures travel as data (a dict
    serialises through ZMQ) and :func:`_raise_failures` re-raises them in the
    consumer.
    """

    def __init__(self, augmentors):
        self.augs = imgaug.AugmentorList(augmentors)

    def reset_state(self):
        self.augs.reset_state()

    def __call__(self, dp):
        path, label = dp
        try:
            return [self.augs.augment(read_image(path)), label]
        except ImageReadError as err:
            return [{"error": "read", "message": str(err)}, label]
        except Exception as err:  # noqa: BLE001 - re-raised by _raise_failures with the file name
            return [{"error": type(err).__name__, "message": "while preparing {}: {}".format(path, err)}, label]


def _raise_failures(dp):
    image = dp[0]
    if isinstance(image, dict):
        if image["error"] == "read":
            raise ImageReadError(image["message"])
        raise ImageNetDataError("{} {}".format(image["error"], image["message"]))
    return dp


class _DecodeAugmentData(ProxyDataFlow):
    """In-process decode + augment (also what each training worker process runs); owns the augmentor RNG."""

    def __init__(self, ds, augmentors):
        super().__init__(ds)
        self.mapper = _DecodeAugment(augmentors)

    def reset_state(self):
        super().reset_state()
        self.mapper.reset_state()

    def __iter__(self):
        for dp in self.ds:
            yield self.mapper(dp)


class _ThreadedDecodeAugment(_DecodeAugmentData):
    """Decode + augment in a pool of threads, keeping the input order.

    Used instead of tensorpack's ``MultiThreadMapData`` because a pool of
    futures keeps the order (evaluation is reproducible), hands a worker's
    exception to the consumer, and shuts down at once (``MultiThreadMapData``
    waits up to 5 s per flow for its polling threads).  OpenCV releases the GIL
    while decoding and resizing, so threads do run in parallel.
    """

    def __init__(self, ds, augmentors, num_threads):
        super().__init__(ds, augmentors)
        self.num_threads = num_threads

    def __iter__(self):
        window = 4 * self.num_threads  # decoded images kept ahead of the consumer
        with ThreadPoolExecutor(self.num_threads, thread_name_prefix="imagenet-decode") as pool:
            pending = collections.deque()
            for dp in self.ds:
                pending.append(pool.submit(self.mapper, dp))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()


def default_parallelism():
    """Decoding workers by default: half the CPUs (hyper-threading), at least 1, at most 40."""
    return max(1, min(40, multiprocessing.cpu_count() // 2))


def get_imagenet_dataflow(datadir, split, batch_size, augmentors=None, parallel=None, class_names=None,
                          files=None):
    """A batched ILSVRC12 dataflow of ``[images uint8 BxHxWx3 BGR, labels int32 B]``.

    * ``split='train'``: files reshuffled every pass, decoded and augmented
      (``augmentors``, default ``fbresnet_augmentor(True)``) in ``parallel``
      worker processes (``MultiProcessRunnerZMQ``; each worker draws its own
      shuffled stream, so the flow never ends), batches of exactly ``batch_size``.
    * ``split='val'``: every image exactly once, in the sorted file order, decoded
      by ``parallel`` threads, with
      ``augmentors`` default ``fbresnet_augmentor(False)``; the last batch may
      be smaller, so that evaluation covers the whole set.

    ``parallel``: number of workers (default :func:`default_parallelism`); 0
    decodes in the calling thread (deterministic order; handy for debugging).
    A file that cannot be decoded raises :class:`ImageReadError` naming it when
    its batch is drawn.  See :func:`list_imagenet_files` for the accepted layouts.
    ``files``: the ``(path, label)`` list of the split when the caller has
    already listed it (listing 1.28M training files takes a while).
    """
    if batch_size < 1:
        raise ValueError("batch size must be >= 1, got {}".format(batch_size))
    is_training = split == "train"
    if files is None:
        files = list_imagenet_files(datadir, split, class_names)
    parallel = default_parallelism() if parallel is None else int(parallel)
    if parallel < 0:
        raise ValueError("parallel must be >= 0, got {}".format(parallel))
    augmentors = fbresnet_augmentor(is_training) if augmentors is None else augmentors
    ds = _FileList(files, shuffle=is_training)
    if is_training:
        ds = _DecodeAugmentData(ds, augmentors)
        if parallel > 0:
            ds = MultiProcessRunnerZMQ(ds, parallel)
    elif parallel > 0:
        ds = _ThreadedDecodeAugment(ds, augmentors, parallel)
    else:
        ds = _DecodeAugmentData(ds, augmentors)
    ds = MapData(ds, _raise_failures)
    return BatchData(ds, batch_size, remainder=not is_training, use_list=False)


def fake_dataflow(batch_size, image_size=IMAGE_SIZE, size=100, dtype="uint8", num_classes=NUM_CLASSES):
    """``size`` random batches shaped like ImageNet batches: ``[B,S,S,3]`` images (0..255) and int32 labels.

    The same batch is repeated (``FakeData(random=False)``): it measures speed, not learning.
    """
    return FakeData([[batch_size, image_size, image_size, 3], [batch_size]], size, random=False,
                    dtype=[dtype, "int32"], domain=[(0, 255), (0, num_classes)])


# ---------------------------------------------------------------------------------------------
# the model base class

def normalize_data_format(data_format):
    """Accept ``'channels_first'``/``'NCHW'`` or ``'channels_last'``/``'NHWC'``; return the ``channels_*`` name."""
    value = {"nchw": "channels_first", "channels_first": "channels_first",
             "nhwc": "channels_last", "channels_last": "channels_last"}.get(str(data_format).lower())
    if value is None:
        raise ValueError("invalid data_format {!r}; expected 'channels_first' (NCHW) or 'channels_last' "
                         "(NHWC)".format(data_format))
    return value


def _prediction_incorrect(logits, label, k, name):
    # tensorpack convention: a float 0/1 vector per sample, 1 where the label is not in the top k.
    with tf.name_scope(name + "_internals"):
        wrong = tf.logical_not(tf.nn.in_top_k(logits, label, k))
    return tf.cast(wrong, tf.float32, name=name)


class ImageNetModel(ModelDesc):
    """Shared inputs, preprocessing, loss, errors and optimizer of the ImageNet models.

    Subclasses set the class attributes and implement :meth:`get_logits`:

    * ``image_dtype``: dtype of the ``input`` placeholder (uint8 or float32 BGR 0..255);
    * ``image_mean`` / ``image_std``: BGR, in 0..255 units; ``image_std`` may be a
      scalar (ResNet: 256);
    * ``first_layer`` / ``last_layer``: scopes whose ``W`` is never quantized;
    * ``weight_decay`` / ``weight_decay_pattern``: L2 on trainable variables whose
      name matches the regex (``re.search``);
    * ``base_lr`` and :meth:`optimizer`; ``lr_schedule`` ``[(epoch, lr), ...]`` (the lr
      from the end of that epoch on, as ``ScheduledHyperParamSetter`` applies it),
      ``max_epoch`` and ``total_batch_size``: the training recipe :func:`imagenet_main` runs;
    * ``model_name``: used in the default logdir (``train_log/<model_name>-dorefa-W,A,G``);
    * ``cpu_data_format``: the default layout on machines without a GPU (the faster
      one measured on the CPU; GPUs always default to ``channels_first``);
    * ``min_image_size``: the smallest input the network accepts (for ``--image-size``).

    Graph: ``input`` (NHWC BGR, ``image_dtype``) and ``label`` (int32) placeholders;
    the image is preprocessed in NHWC and transposed to NCHW for
    ``channels_first``; the softmax is ``output``; ``wrong-top1`` /
    ``wrong-top5`` are per-sample 0/1 floats; the cost (``cost``) is the mean
    cross-entropy (``xentropy-loss``) plus the weight decay.
    """

    image_dtype = tf.uint8
    image_mean = (0.0, 0.0, 0.0)
    image_std = (1.0, 1.0, 1.0)
    first_layer = None
    last_layer = None
    weight_decay = 0.0
    weight_decay_pattern = r"/W$"
    base_lr = 0.1
    lr_schedule = ()
    max_epoch = None
    total_batch_size = 256
    model_name = "imagenet"
    cpu_data_format = "channels_last"
    min_image_size = 64

    def __init__(self, bits=(32, 32, 32), data_format="channels_first", image_size=IMAGE_SIZE):
        super().__init__()
        self.bits = tuple(check_bits(*bits))
        self.data_format = normalize_data_format(data_format)
        if int(image_size) < 1:
            raise ValueError("invalid image size {!r}".format(image_size))
        self.image_size = int(image_size)

    @property
    def channel_axis(self):
        """The channel axis of the network's feature maps (1 for NCHW, 3 for NHWC)."""
        return 1 if self.data_format == "channels_first" else 3

    def inputs(self):
        return [tf.TensorSpec([None, self.image_size, self.image_size, 3], self.image_dtype, "input"),
                tf.TensorSpec([None], tf.int32, "label")]

    def image_preprocess(self, image):
        """``(float(image) - image_mean) / image_std`` on the NHWC BGR batch."""
        with tf.name_scope("image_preprocess"):
            image = tf.cast(image, tf.float32)
            mean = np.asarray(self.image_mean, dtype=np.float32)
            if np.any(mean != 0):
                image = image - tf.constant(mean)
            return image / tf.constant(np.asarray(self.image_std, dtype=np.float32))

    def quantize_weight(self, fw):
        """A ``remap_variables`` function applying ``fw`` to every variable whose name ends in ``W``.

        Variables of the first and last layer (``first_layer`` / ``last_layer``
        anywhere in the name's scopes) are left in full precision.
        """
        skip = {self.first_layer, self.last_layer}

        def remap(v):
            name = v.op.name
            scopes = name.split("/")
            if not name.endswith("W") or skip.intersection(scopes):
                return v
            return fw(v)

        return remap

    def get_logits(self, image):
        """Build the network on a preprocessed float batch in ``self.data_format``; return the logits."""
        raise NotImplementedError

    def build_graph(self, image, label):
        image = self.image_preprocess(image)
        if self.data_format == "channels_first":
            image = tf.transpose(image, [0, 3, 1, 2])
        logits = self.get_logits(image)
        tf.nn.softmax(logits, name="output")

        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(logits=logits, labels=label),
                              name="xentropy-loss")
        wrong1 = _prediction_incorrect(logits, label, 1, "wrong-top1")
        wrong5 = _prediction_incorrect(logits, label, 5, "wrong-top5")
        add_moving_summary(tf.reduce_mean(wrong1, name="train-error-top1"),
                           tf.reduce_mean(wrong5, name="train-error-top5"))
        if self.weight_decay > 0:
            # wd * sum(w^2) / 2 per variable (tf.nn.l2_loss), the form of the tensorpack versions
            # that trained the published models (tf.contrib l2_regularizer).
            wd_loss = regularize_cost(self.weight_decay_pattern, lambda w: self.weight_decay * tf.nn.l2_loss(w),
                                      name="l2_regularize_loss")
            add_moving_summary(loss, wd_loss)
            return tf.add_n([loss, wd_loss], name="cost")
        cost = tf.identity(loss, name="cost")
        add_moving_summary(cost)
        return cost

    def learning_rate(self):
        """The non-trainable ``learning_rate`` variable (for ``ScheduledHyperParamSetter``)."""
        lr = tf.get_variable("learning_rate", initializer=float(self.base_lr), trainable=False)
        tf.summary.scalar("learning_rate-summary", lr)
        return lr

    def optimizer(self):
        return tf.train.MomentumOptimizer(self.learning_rate(), 0.9, use_nesterov=True)


# ---------------------------------------------------------------------------------------------
# the command line of alexnet-dorefa.py and resnet-dorefa.py: train, --eval, --run, --export

#: Images in the ILSVRC12 training set; an epoch of ``--fake`` data pretends to be one pass over them.
ILSVRC12_TRAIN_IMAGES = 1281167
#: Batches of random images validated per epoch by ``--fake`` training and evaluated by ``--eval --fake``.
FAKE_EVAL_BATCHES = 2
#: replicated: the towers of one process; collective: one process per machine (--cluster or TF_CONFIG).
TRAINERS = ("replicated", "collective")


def make_imagenet_parser(model_class, description, default_dorefa, epilog=None):
    """The command line of an ImageNet script: :func:`cli.make_parser` plus the ImageNet flags.

    Defaults come from ``model_class`` (its recipe: ``max_epoch``,
    ``total_batch_size``; its CPU layout).
    """
    parser, groups = cli.make_parser(description, default_dorefa, epilog=epilog)
    data = groups["data"]
    data.add_argument("--fake", action="store_true",
                      help="random ImageNet-shaped images instead of --data, to try or benchmark training "
                           "(or --eval) without the dataset")
    data.add_argument("--workers", type=int, default=None,
                      help="parallel data loading: processes that decode and augment training images and "
                           "threads that decode validation images; 0 loads in the main process. By default half "
                           "the CPUs ({})".format(
                               default_parallelism()))
    t = groups["training"]
    t.add_argument("--epochs", type=int, default=model_class.max_epoch, help="epochs to train; the recipe by default")
    t.add_argument("--steps-per-epoch", type=int, default=None,
                   help="training steps per epoch; by default one pass over the training images "
                        "(ILSVRC12: {} // --batch)".format(ILSVRC12_TRAIN_IMAGES))
    t.add_argument("--batch", type=int, default=model_class.total_batch_size,
                   help="total batch size, split evenly over the towers (--gpu) of every worker (--cluster); "
                        "also the batch of --eval")
    t.add_argument("--overwrite", action="store_true",
                   help="start over even if --logdir holds a finished run (it is moved aside, not deleted)")
    t.add_argument("--trainer", choices=TRAINERS, default=None,
                   help="replicated: synchronous data-parallel training in one process, one tower per --gpu "
                        "(tensorpack SyncMultiGPUTrainerReplicated); collective: the same on several machines, "
                        "one process per machine, gradients all-reduced between them over gRPC (docs/distributed.md). "
                        "Default: collective with --cluster or TF_CONFIG, else replicated")
    # -- several machines (dorefanet/distributed.py, docs/distributed.md) --
    t.add_argument("--cluster", metavar="HOST:PORT,...",
                   help="train on several machines: every worker's address, the same list on each (or TF_CONFIG)")
    t.add_argument("--task", type=int, metavar="I", help="with --cluster: this machine's index in it (0 = the chief)")
    t.add_argument("--worker-timeout", type=float, default=distributed.DEFAULT_TIMEOUT, metavar="SECONDS",
                   help="with --cluster: how long a worker waits for the others at start-up and in each all-reduce "
                        "before it stops with an error; must exceed the chief's validation and checkpoint time")
    t.add_argument("--data-format", choices=("channels_first", "channels_last"), default=None,
                   help="layout of the feature maps inside the network; by default channels_first when a GPU "
                        "is visible, {} on the CPU (measured faster there). Checkpoints work in either "
                        "layout".format(model_class.cpu_data_format))
    # A developer flag for fast tests: the published weights need 224 (AlexNet's fc0 depends on it).
    t.add_argument("--image-size", type=int, default=IMAGE_SIZE, help=argparse.SUPPRESS)
    groups["model"].add_argument("--export", metavar="OUT.npz",
                                 help="write the loaded model's variables (no optimizer state) to an .npz")
    return parser


def parse_imagenet_args(parser, model_class, argv=None):
    """Parse and check the flags that need no TensorFlow device query; conflicts end in ``parser.error``."""
    args = cli.check_modes(parser, parser.parse_args(argv))
    training = not (args.eval or args.run or args.export or args.export_packed)
    if args.fake and args.data:
        parser.error("--fake and --data cannot be combined; choose one data source")
    if (training or args.eval) and not (args.fake or args.data):
        parser.error("give --data ILSVRC_DIR (with train/<wnid>/ and val/) or --fake (random images) to {}".format(
            "evaluate" if args.eval else "train"))
    if args.run and (args.fake or args.data):
        parser.error("--run classifies the given image files; --data and --fake do not apply")
    for flag in ("epochs", "batch", "steps_per_epoch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error("--{} must be a positive integer, got {}".format(flag.replace("_", "-"), value))
    if args.workers is not None and args.workers < 0:
        parser.error("--workers must be >= 0, got {}".format(args.workers))
    if args.image_size < model_class.min_image_size:
        parser.error("--image-size must be at least {}, got {}".format(model_class.min_image_size, args.image_size))
    _parse_cluster(parser, args, training)
    args.training = training
    return args


def _parse_cluster(parser, args, training):
    """``args.cluster``: the :class:`distributed.Cluster` of --cluster/--task or TF_CONFIG, or None."""
    try:
        cluster = distributed.resolve_cluster(args)
    except ValueError as err:
        parser.error(str(err))
    if cluster is not None and cluster.size == 1:
        cluster = None  # a cluster of one machine is the ordinary training
    if cluster is not None and not training:
        parser.error("--cluster/TF_CONFIG is for training; --eval, --run and --export run in one process")
    if args.trainer == "collective" and cluster is None and training:
        parser.error("--trainer collective needs the workers: --cluster HOST:PORT,... --task I, or TF_CONFIG")
    if args.trainer == "replicated" and cluster is not None:
        parser.error("--trainer replicated trains in one process; --cluster/TF_CONFIG needs --trainer collective")
    if not args.worker_timeout > 0:
        parser.error("--worker-timeout must be a positive number of seconds, got {:g}".format(args.worker_timeout))
    args.cluster = cluster
    args.trainer = "collective" if cluster is not None else "replicated"


def _resolve_devices(parser, model_class, args):
    """Towers and the default layout; called once ``CUDA_VISIBLE_DEVICES`` reflects ``--gpu``."""
    gpus = available_gpus()
    # On a machine without GPUs, --gpu 0,1 still builds two towers (tensorpack places them on the
    # CPU through soft placement), which is how multi-tower training is tested here.
    args.towers = len(args.gpu.split(",")) if args.gpu else max(gpus, 1)
    replicas = args.towers * (args.cluster.size if args.cluster else 1)
    if args.training and args.batch % replicas:
        where = " ({} workers x {})".format(args.cluster.size, args.towers) if args.cluster else ""
        parser.error("--batch {} cannot be split evenly over {} towers{}; use a multiple of {}".format(
            args.batch, replicas, where, replicas))
    if args.data_format is None:
        args.data_format = "channels_first" if gpus else model_class.cpu_data_format


def _single_image_sizes(image_size):
    """(shorter side, crop) of the evaluation preprocessing for a network input of ``image_size``."""
    return image_size * RESIZE_SHORTER // IMAGE_SIZE, image_size


def _preprocess_for_run(image, image_size):
    resize, crop = _single_image_sizes(image_size)
    return preprocess_image(image, resize=resize, crop=crop)


def _describe_class(class_names, label):
    wnid, words = class_names[label]
    return {"wnid": wnid, "name": words}


def _validation_flow(args, batch_size, parallel):
    """The validation batches of ``--data`` (whole set, partial last batch) or a few ``--fake`` batches."""
    if args.fake:
        return fake_dataflow(batch_size, args.image_size, size=FAKE_EVAL_BATCHES)
    return get_imagenet_dataflow(args.data, "val", batch_size, augmentors=fbresnet_augmentor(False, args.image_size),
                                 parallel=parallel)


def _evaluate(model, args):
    workers = default_parallelism() if args.workers is None else args.workers
    # The data directory is checked before the (slow) weights loading, so that a typo fails at once.
    dataflow = _validation_flow(args, args.batch, workers)
    predict = load_predictor(args, model)
    result = evaluate_topk(predict, dataflow)
    print("evaluated {} images".format(result.count), file=sys.stderr)
    print("top-1 error: {:.4f}".format(result.top1))
    print("top-5 error: {:.4f}".format(result.top5))
    return 0


def _run(model, args):
    class_names = load_class_names()
    predict = load_predictor(args, model)
    failed = run_images(args.run, functools.partial(_preprocess_for_run, image_size=args.image_size), predict,
                        functools.partial(_describe_class, class_names), k=5, as_json=args.json)
    return 1 if failed else 0


def _make_trainer(args):
    """The tensorpack trainer and, on a cluster, this process's :class:`distributed.Worker` (else None)."""
    if args.cluster is None:
        return select_trainer(args.towers), None
    worker = distributed.Worker(args.cluster, args.worker_timeout)
    return distributed.CollectiveTrainer(args.towers, worker), worker


def _handshake(worker, args, config, plan_chief):
    """Agree with the other workers before building the graph; returns this worker's :class:`RunPlan`.

    The chief plans the run (resume or fresh) and tells the others its step;
    every worker compares the configuration that must be equal everywhere and
    stops with the same one-line error when it is not.
    """
    key = config["resume_key"]
    record = dict(key, towers=args.towers, data="fake" if args.fake else "imagenet", epochs=args.epochs,
                  cluster=",".join(args.cluster.workers), step=0, error=None)
    plan = None
    if args.cluster.is_chief:
        try:
            plan = plan_chief()
            record["step"] = plan.step
        except TrainingSetupError as err:
            record["error"] = str(err)
    records = worker.handshake(record)
    if records[0]["error"]:
        raise TrainingSetupError(records[0]["error"] if args.cluster.is_chief else
                                 "the chief (worker 0) cannot start: {}".format(records[0]["error"]))
    distributed.check_agreement(records, ("cluster", "model", "dorefa", "batch", "image_size", "steps_per_epoch",
                                          "epochs", "towers", "data"))
    if plan is None:
        plan = distributed.follower_plan(config["logdir"], args.cluster.index, records[0]["step"],
                                         key["steps_per_epoch"])
    return plan


def _train(model, args):
    from tensorpack import (ClassificationError, EstimatedTimeLeft, InferenceRunner, ScalarStats,
                            ScheduledHyperParamSetter)

    model_class = type(model)
    trainer, worker = _make_trainer(args)
    cluster = args.cluster
    replicas = args.towers * (cluster.size if cluster else 1)
    batch_per_replica = args.batch // replicas
    workers = default_parallelism() if args.workers is None else args.workers
    size = args.image_size
    if args.fake:
        # seeded, the same batch on every tower of every worker: the multi-machine test compares a cluster
        # with one process (distributed.fake_train_flow says why not one batch per tower)
        train_flow = distributed.fake_train_flow(batch_per_replica, size, args.seed)
        train_images = ILSVRC12_TRAIN_IMAGES
    else:
        files = list_imagenet_files(args.data, "train")
        train_flow = get_imagenet_dataflow(args.data, "train", batch_per_replica,
                                           augmentors=fbresnet_augmentor(True, size), parallel=workers, files=files)
        train_images = len(files)
    val_flow = _validation_flow(args, batch_per_replica, workers)
    steps = args.steps_per_epoch or max(train_images // args.batch, 1)

    logdir = args.logdir or os.path.join("train_log", "{}-dorefa-{}".format(model_class.model_name, args.dorefa))
    config = {"resume_key": {"model": model_class.model_name, "dorefa": str(args.dorefa), "batch": args.batch,
                             "steps_per_epoch": steps, "image_size": size},
              "model": model_class.model_name, "dorefa": str(args.dorefa),
              "data": "fake" if args.fake else os.path.abspath(args.data), "train_images": train_images,
              "seed": args.seed, "epochs": args.epochs, "steps_per_epoch": steps, "batch": args.batch,
              "trainer": args.trainer, "replicas": replicas, "data_format": args.data_format,
              "image_size": size, "workers": workers,
              "recipe": {"base_lr": model_class.base_lr, "lr_schedule": list(model_class.lr_schedule),
                         "weight_decay": model_class.weight_decay,
                         "weight_decay_pattern": model_class.weight_decay_pattern}}
    if cluster is None:
        plan = plan_run(logdir, config, steps, args.epochs, overwrite=args.overwrite)
    else:
        plan = _handshake(worker, args, dict(config, logdir=logdir),
                          lambda: plan_run(logdir, config, steps, args.epochs, overwrite=args.overwrite))
    chief = cluster is None or cluster.is_chief
    init = None
    if args.load and not plan.resumed and chief:
        init = StrictInit(read_weights(args.load), args.load)

    np.random.seed(args.seed)
    # Other workers draw other fg noise (as the towers of one process do); their initial values do not
    # matter: the chief broadcasts its variables at the start.
    tf.set_random_seed(args.seed + (1000 * cluster.index if cluster else 0))
    if not chief:
        # validation, checkpoints and stats.json are the chief's
        callbacks = [ScheduledHyperParamSetter("learning_rate", list(model_class.lr_schedule))]
        return _launch_distributed(model, train_flow, plan, steps, args, callbacks, trainer, init, chief)
    callbacks = [
        # Keyed on epochs: a resumed run starts at the epoch after its checkpoint, and the
        # learning_rate variable itself is restored from the checkpoint.
        ScheduledHyperParamSetter("learning_rate", list(model_class.lr_schedule)),
        InferenceRunner(val_flow, [ScalarStats("xentropy-loss"),
                                   ClassificationError("wrong-top1", "val-error-top1"),
                                   ClassificationError("wrong-top5", "val-error-top5")]),
        EstimatedTimeLeft(),
    ]
    if cluster is not None:
        return _launch_distributed(model, train_flow, plan, steps, args, callbacks, trainer, init, chief)
    launch(model, train_flow, plan, steps, args.epochs, callbacks, trainer, session_init=init)
    return 0


def _launch_distributed(model, train_flow, plan, steps, args, callbacks, trainer, init, chief):
    """:func:`launch` on a cluster; a collective op that fails or times out becomes a one-line error."""
    try:
        launch(model, train_flow, plan, steps, args.epochs, callbacks, trainer, session_init=init, chief=chief)
    except (tf.errors.DeadlineExceededError, tf.errors.UnavailableError, tf.errors.CancelledError,
            tf.errors.AbortedError, tf.errors.InternalError) as err:
        raise distributed.translate_runtime_error(err, args.cluster, args.worker_timeout) from None
    return 0


def imagenet_main(model_class, argv=None, description=None, default_dorefa="1,2,6", epilog=None):
    """Everything an ImageNet script does besides defining its network; returns the exit status.

    * training (the default): ``--data DIR`` or ``--fake``, the model's recipe,
      ``--gpu`` towers with tensorpack's replicated trainer, on several machines
      with ``--cluster``/``TF_CONFIG`` (docs/distributed.md), a checkpoint every epoch in ``--logdir``, resumed when the same
      command runs again, validation top-1/top-5 error every epoch;
    * ``--load PATH --eval``: top-1 / top-5 error over the whole validation set;
    * ``--load PATH --run IMAGE...``: the top 5 classes of each image (``--json``: one object per line);
    * ``--load PATH --export OUT.npz``.

    0: success; 1: some ``--run`` images could not be read; 2: bad flags or
    input, reported as one ``error: ...`` line.
    """
    parser = make_imagenet_parser(model_class, description or model_class.__doc__, default_dorefa, epilog)
    args = parse_imagenet_args(parser, model_class, argv)
    _resolve_devices(parser, model_class, args)
    model = model_class(args.dorefa, args.data_format, args.image_size)

    def act():
        if args.training:
            with tf.Graph().as_default():
                return _train(model, args)
        with results_only_on_stdout():
            if args.export:
                export_weights(model, args.load, args.export)
                return 0
            if args.export_packed:
                export_packed(model, args.load, args.export_packed, args.first_last_dtype)
                return 0
            with tf.Graph().as_default():
                return _evaluate(model, args) if args.eval else _run(model, args)

    return cli.run_reporting_errors(
        act, (ModelLoadError, ImageNetDataError, ClassNamesError, ImageReadError, TrainingSetupError,
              EvaluationError, PackedExportError, distributed.DistributedError), args.training)
