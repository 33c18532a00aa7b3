"""ImageNet training data for ``alexnet-dorefa.py`` and ``resnet-dorefa.py``: augmentation and dataflows.

* the fb.resnet.torch training augmentation: :func:`fbresnet_augmentor`;
* ILSVRC12 dataflows (``DIR/train/<wnid>/*``, ``DIR/val/...``) and fake data:
  :func:`get_imagenet_dataflow`, :func:`training_batches` (a function of the seed,
  :mod:`dorefanet.seeded_batches`), :func:`fake_dataflow`.

These are tensorpack dataflows (and tensorpack imports TensorFlow).  Everything
else about ImageNet (class names, decoding, the evaluation preprocessing, file
lists, validation batches) needs no TensorFlow and is :mod:`dorefanet.imagenet_data`,
whose names this module re-exports; the scripts' data source is
:mod:`dorefanet.imagenet`.  Import order: this module imports
:mod:`dorefanet.tf_setup` first, as every module of the project does.
"""
from dorefanet.tf_setup import tf  # noqa: I100  (must come before tensorpack)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
from tensorpack.dataflow import (  # noqa: E402
    BatchData, DataFlow, FakeData, MapData, ProxyDataFlow, imgaug)
from tensorpack.dataflow.imgaug.transform import CropTransform, ResizeTransform, TransformList  # noqa: E402

from dorefanet.image_io import ImageReadError  # noqa: E402  (one exception class for the project)
from dorefanet.seeded_batches import SeededBatches, seed_augmentors  # noqa: E402
from dorefanet.inference import TopKError, evaluate_topk, topk_wrong  # noqa: E402,F401
# the pieces that need no TensorFlow (what the packed engine's --eval / --run use)
from dorefanet.imagenet_data import (  # noqa: E402,F401
    CLASS_NAMES_FILE, IMAGE_EXTENSIONS, IMAGE_SIZE, NUM_CLASSES, RESIZE_SHORTER, VAL_LABEL_FILES, ClassNamesError,
    ImageNetDataError, ValidationBatches, _raise_failures, center_crop, decode_safely, default_parallelism, eval_sizes,
    list_imagenet_files, load_class_names, load_image, ordered_map, preprocess_image, read_image, resize_shorter_side)

__all__ = [
    "CLASS_NAMES_FILE", "NUM_CLASSES", "IMAGE_SIZE", "RESIZE_SHORTER", "VAL_LABEL_FILES",
    "ClassNamesError", "ImageReadError", "ImageNetDataError",
    "load_class_names", "read_image", "resize_shorter_side", "center_crop", "preprocess_image", "load_image",
    "RandomSizedCrop", "fbresnet_augmentor", "list_imagenet_files", "get_imagenet_dataflow", "training_batches",
    "fake_dataflow",
    "TopKError", "evaluate_topk", "topk_wrong", "IMAGE_EXTENSIONS", "default_parallelism", "ValidationBatches",
    "eval_sizes",
]

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
        resize, crop = eval_sizes(size)
        return [imgaug.MapImage(lambda img: preprocess_image(img, resize=resize, crop=crop))]
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

class _FileList(DataFlow):
    """Yields ``[path, label]`` in the given order."""

    def __init__(self, files):
        self.files = list(files)

    def __len__(self):
        return len(self.files)

    def __iter__(self):
        for path, label in self.files:
            yield [path, label]


class _DecodeAugment:
    """Decode ``[path, label]`` and augment the image; a failure travels as data (:func:`decode_safely`)."""

    def __init__(self, augmentors):
        self.augs = imgaug.AugmentorList(augmentors)

    def reset_state(self):
        self.augs.reset_state()

    def __call__(self, dp):
        path, label = dp
        return decode_safely(path, label, self.augs.augment)


class _DecodeAugmentBatch:
    """``(indices, rng)`` -> a training batch ``[uint8 images, int32 labels]`` of ``files``, augmented from ``rng``."""

    def __init__(self, files, augmentors):
        self.files, self.decode = files, _DecodeAugment(augmentors)

    def __call__(self, indices, rng):
        seed_augmentors([self.decode.augs], rng)
        batch = [_raise_failures(self.decode(self.files[i])) for i in indices]
        return [np.stack([image for image, _ in batch]), np.asarray([label for _, label in batch], np.int32)]


def training_batches(datadir, files, batch_size, augmentors, seed, workers):
    """The training batches of ``files`` (``[(path, label)]`` of ``datadir``): shuffled every pass and augmented,
    from ``seed``.

    Batch ``k`` of pass ``p`` depends on ``(seed, p, k)`` only, whichever of the
    ``workers`` processes decodes it (:class:`dorefanet.seeded_batches.SeededBatches`).
    """
    if len(files) < batch_size:   # a pass would have no batch
        raise ImageNetDataError("{}: {} training images, fewer than one batch of {}; use a smaller --batch".format(
            datadir, len(files), batch_size))
    return SeededBatches(len(files), batch_size, _DecodeAugmentBatch(list(files), augmentors), seed, workers=workers)


class _DecodeAugmentData(ProxyDataFlow):
    """In-process decode + augment; owns the augmentor RNG."""

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
    """Decode + augment in a pool of threads, keeping the input order (:func:`ordered_map`).

    Used instead of tensorpack's ``MultiThreadMapData``, which waits up to 5 s per
    flow for its polling threads to shut down and does not keep the order.
    """

    def __init__(self, ds, augmentors, num_threads):
        super().__init__(ds, augmentors)
        self.num_threads = num_threads

    def __iter__(self):
        yield from ordered_map(self.mapper, self.ds, self.num_threads)


def get_imagenet_dataflow(datadir, split, batch_size, augmentors=None, parallel=None, class_names=None,
                          files=None, seed=0):
    """A batched ILSVRC12 dataflow of ``[images uint8 BxHxWx3 BGR, labels int32 B]``.

    * ``split='train'``: :func:`training_batches` of the split's files from ``seed``,
      decoded and augmented (``augmentors``, default ``fbresnet_augmentor(True)``) in
      ``parallel`` worker processes, batches of exactly ``batch_size``, a pass per iteration.
    * ``split='val'``: every image exactly once, in the sorted file order, decoded
      by ``parallel`` threads, with
      ``augmentors`` default ``fbresnet_augmentor(False)``; the last batch may
      be smaller, so that evaluation covers the whole set.

    ``parallel``: number of workers (default :func:`default_parallelism`); 0
    decodes in the calling thread (handy for debugging).
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
    if is_training:
        return ProxyDataFlow(training_batches(datadir, files, batch_size, augmentors, seed, parallel))
    ds = _FileList(files)
    if parallel > 0:
        ds = _ThreadedDecodeAugment(ds, augmentors, parallel)
    else:
        ds = _DecodeAugmentData(ds, augmentors)
    ds = MapData(ds, _raise_failures)
    return BatchData(ds, batch_size, remainder=True, use_list=False)


def fake_dataflow(batch_size, image_size=IMAGE_SIZE, size=100, dtype="uint8", num_classes=NUM_CLASSES):
    """``size`` random batches shaped like ImageNet batches: ``[B,S,S,3]`` images (0..255) and int32 labels.

    The same batch is repeated (``FakeData(random=False)``): it measures speed, not learning.
    """
    return FakeData([[batch_size, image_size, image_size, 3], [batch_size]], size, random=False,
                    dtype=[dtype, "int32"], domain=[(0, 255), (0, num_classes)])
