"""ImageNet (ILSVRC12) pieces shared by ``alexnet-dorefa.py`` and ``resnet-dorefa.py``.

* class names (``data/synset_words.txt``, line i = class i): :func:`load_class_names`;
* image decoding and the single-image / validation preprocessing of
  ``docs/networks.md`` (shorter side to 256 bicubic, center crop 224):
  :func:`read_image`, :func:`preprocess_image`, :func:`load_image`;
* the fb.resnet.torch training augmentation: :func:`fbresnet_augmentor`;
* ILSVRC12 dataflows (``DIR/train/<wnid>/*``, ``DIR/val/...``) and fake data:
  :func:`get_imagenet_dataflow`, :func:`fake_dataflow`;
* the tensorpack ``ModelDesc`` base class of both models: :class:`ImageNetModel`;
* top-1 / top-5 evaluation: :func:`evaluate_topk` (from :mod:`dorefanet.inference`).

The command line of both scripts (train, ``--eval``, ``--run``, ``--export``) is
:mod:`dorefanet.imagenet_cli`.  Import order: this module imports
:mod:`dorefanet.tf_setup` first, as every module of the project does.
"""
import collections
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

from dorefanet.image_io import ImageReadError  # noqa: E402  (one exception class for the project)
from dorefanet.checkpoints import build_inference_graph  # noqa: E402,F401
from dorefanet.inference import TopKError, evaluate_topk, topk_wrong  # noqa: E402,F401
# the pieces that need no TensorFlow (what the packed engine's --eval / --run use)
from dorefanet.imagenet_data import (  # noqa: E402,F401
    CLASS_NAMES_FILE, IMAGE_EXTENSIONS, IMAGE_SIZE, NUM_CLASSES, RESIZE_SHORTER, ROOT, VAL_LABEL_FILES, _WNID,
    ClassNamesError, ImageNetDataError, ImageNetNetwork, ValidationBatches, _is_image_file, _list_class_dirs,
    _raise_failures, _read_label_file, _wnid_to_label, center_crop, default_parallelism, list_imagenet_files,
    load_class_names, load_image, normalize_data_format, preprocess_image, read_image, resize_shorter_side)

__all__ = [
    "CLASS_NAMES_FILE", "NUM_CLASSES", "IMAGE_SIZE", "RESIZE_SHORTER", "VAL_LABEL_FILES",
    "ClassNamesError", "ImageReadError", "ImageNetDataError",
    "load_class_names", "read_image", "resize_shorter_side", "center_crop", "preprocess_image", "load_image",
    "RandomSizedCrop", "fbresnet_augmentor", "list_imagenet_files", "get_imagenet_dataflow", "fake_dataflow",
    "ImageNetModel", "build_inference_graph", "TopKError", "evaluate_topk", "topk_wrong", "normalize_data_format",
    "IMAGE_EXTENSIONS", "default_parallelism", "ImageNetNetwork", "ValidationBatches",
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
    if is_training and len(files) < batch_size:
        # tensorpack's BatchData would stop on a bare assertion
        raise ImageNetDataError("{}: {} training images, fewer than one batch of {}; use a smaller --batch".format(
            datadir, len(files), batch_size))
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

def _prediction_incorrect(logits, label, k, name):
    # tensorpack convention: a float 0/1 vector per sample, 1 where the label is not in the top k.
    with tf.name_scope(name + "_internals"):
        wrong = tf.logical_not(tf.nn.in_top_k(logits, label, k))
    return tf.cast(wrong, tf.float32, name=name)


class ImageNetModel(ImageNetNetwork, ModelDesc):
    """Shared inputs, preprocessing, loss, errors and optimizer of the ImageNet models.

    Subclasses set the class attributes and describe their layers in
    ``network(net, x)`` (:class:`dorefanet.network.DescribedNetwork`):

    * ``image_dtype``: dtype of the ``input`` placeholder (uint8 or float32 BGR 0..255);
    * ``image_mean`` / ``image_std``: BGR, in 0..255 units; ``image_std`` may be a
      scalar (ResNet: 256);
    * ``activation_at_32``: what ``activate`` is at A = 32 (:mod:`dorefanet.network`);
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

    def get_logits(self, image):
        """The network on a preprocessed float batch in ``self.data_format``; returns the logits."""
        return self.network_logits(image)

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
