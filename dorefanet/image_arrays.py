"""The data source of a small data set held in memory: ``--data DIR`` or its built-in ``--synthetic`` set.

SVHN (:mod:`dorefanet.svhn_data`) and CIFAR-10 (:mod:`dorefanet.cifar_data`) are
both a few hundred megabytes of 32x32 BGR uint8 images with labels, read whole;
:class:`ImageArrays` is what the driver (:mod:`dorefanet.driver`) asks of them,
written once.  A data set subclasses it with its names, its reader
(:meth:`ImageArrays.load`), its training augmentation (:meth:`ImageArrays.augment`)
and its ``--run`` resize.  Training batches are a function of ``--seed``
(:mod:`dorefanet.seeded_batches`); test batches are the test split in its order.
"""
import os

import cv2
import numpy as np

__all__ = ["ImageArrays", "TestBatches", "render_built_in"]


def _render_range(render, job):
    # Runs in a forked child.  It must not touch OpenCV's thread pool (e.g.
    # cv2.setNumThreads): the pool's threads do not survive the fork and the
    # call deadlocks; the 32-64 px images of the built-in sets never use it.
    seed, part, start, stop = job
    pairs = [render(seed, part, i) for i in range(start, stop)]
    return np.stack([p[0] for p in pairs]), np.array([p[1] for p in pairs], np.int32)


def render_built_in(render, split, seed, size, workers, sizes):
    """A built-in set: images ``0 .. size - 1`` of ``render(seed, part, index) -> (BGR uint8 image, label)``.

    ``split`` ``'train'`` or ``'test'`` is ``part`` 0 or 1 (disjoint random streams
    when ``render`` seeds each image from all three); ``size`` defaults to
    ``sizes[split]``.  The images are rendered once, in ``workers`` forked
    processes (default: one per core): image ``i`` is the same whatever ``size``
    and ``workers``.  Returns ``(uint8 N x H x W x 3, int32 N)``.
    """
    import functools

    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test', got {!r}".format(split))
    part = 0 if split == "train" else 1
    size = int(size if size is not None else sizes[split])
    if size < 1:
        raise ValueError("size must be >= 1, got {}".format(size))
    workers = max(1, int(workers if workers is not None else (os.cpu_count() or 1)))
    step = 512
    jobs = [(int(seed), part, start, min(start + step, size)) for start in range(0, size, step)]
    work = functools.partial(_render_range, render)
    if workers == 1 or len(jobs) == 1:
        parts = [work(job) for job in jobs]
    else:
        import multiprocessing

        # fork: the children only need the renderer's module, and start instantly
        with multiprocessing.get_context("fork").Pool(min(workers, len(jobs))) as pool:
            parts = pool.map(work, jobs)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


class TestBatches:
    """The test split in batches of ``batch``, in order (the last one possibly smaller), resized to ``size``.

    What ``--eval`` (either engine) and the evaluation after every training epoch read.
    """

    def __init__(self, images, labels, batch, size):
        self.images, self.labels, self.batch, self.size = images, labels, batch, size

    def __len__(self):
        return -(-len(self.labels) // self.batch)

    def reset_state(self):
        pass

    def __iter__(self):
        for start in range(0, len(self.labels), self.batch):
            images = self.images[start:start + self.batch]
            if images.shape[1:3] != (self.size, self.size):   # tensorpack's imgaug.Resize: bilinear
                images = np.asarray([cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_LINEAR)
                                     for image in images])
            yield [images, np.asarray(self.labels[start:start + self.batch], np.int32)]


class _Batch:
    """``(indices, rng)`` -> a training batch ``[uint8 images, int32 labels]`` through the data set's augmentation."""

    def __init__(self, source, images, labels):
        self.source, self.images, self.labels = source, images, labels

    def __call__(self, indices, rng):
        return [self.source.augment(self.images[indices], rng), np.asarray(self.labels[indices], np.int32)]


class ImageArrays:
    """A data set read whole into memory: the flags, batches and reports every in-memory data set shares.

    A subclass sets ``name`` (``CIFAR-10``), ``synthetic_name`` (``built-in shapes``),
    ``data_help`` (what ``--data`` holds), ``errors`` (its data error classes) and
    implements :meth:`load`, :meth:`augment` and :meth:`resize`; ``image_size`` is the
    network's input side.
    """

    head = "digits"              # the graph's loss and error names (dorefanet.tf_model)
    error_key, error_name = "test-error", "test error"
    eval_pattern = r"test error: ([0-9.]+)"
    # what the run's evaluation after every epoch records in stats.json
    validation_scalars, validation_errors = ("cost",), (("wrong-top1", "test-error"),)
    name, synthetic_name, data_help, errors, error_class = "", "", "", (), ValueError

    def __init__(self, image_size):
        self.image_size = image_size

    # ---------------------------------------------------------------- what a data set defines
    def load(self, args, split):
        """``(BGR uint8 N x H x W x 3, int32 N)`` of ``split`` (``train``/``test``) of ``--data`` or ``--synthetic``."""
        raise NotImplementedError

    def augment(self, images, rng):
        """A training batch of uint8 images at the input size, augmented with draws from ``rng`` only."""
        raise NotImplementedError

    def resize(self, image):
        """``--run``: any BGR uint8 image -> the network's float32 input."""
        raise NotImplementedError

    def class_describer(self):
        """``--run``'s extra fields of a class (none: the class number says it)."""
        return lambda label: {}

    # ---------------------------------------------------------------- what the driver asks
    def add_flags(self, group):
        group.add_argument("--synthetic", action="store_true",
                           help="use the {} instead of --data (nothing to download)".format(self.synthetic_name))
        group.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                           help="data loading processes for training (0: in the training process); the "
                                "batches do not depend on it")

    def check_flags(self, parser, args, needs_data):
        if args.synthetic and args.data:
            parser.error("--synthetic and --data cannot be combined; choose one data source")
        if needs_data and not (args.synthetic or args.data):
            parser.error("give --data {} or --synthetic".format(self.data_help))

    def data_flags(self, args, sweep=False):
        """The flags that give the same data to another command (the evaluate command, a sweep's runs)."""
        if not args.synthetic:
            return ["--data", os.path.abspath(args.data)]
        # the built-in set depends on --seed; a sweep gives each run its own
        return ["--synthetic"] + (["--seed", str(args.seed)] if args.seed and not sweep else [])

    def describe(self, args):
        """What ``config.json`` says the data is."""
        return "synthetic" if args.synthetic else os.path.abspath(args.data)

    def kind(self, args):
        """What the workers of a cluster must agree on (their paths to the data may differ)."""
        return "synthetic" if args.synthetic else self.name.lower()

    def resume_fields(self, args):
        return {}

    def title(self, args):
        return self.synthetic_name if args.synthetic else "{} {}".format(self.name, os.path.abspath(args.data))

    def training_data(self, args, batch):
        """``(train batches of batch, test batches for the run's evaluations, config fields)``."""
        from dorefanet.seeded_batches import SeededBatches

        images, labels = self.load(args, "train")
        test = self.evaluation_data(args, args.batch)
        if len(labels) < batch:
            raise self.error_class("{}: {} training images, fewer than one batch of {}; use a smaller --batch".format(
                "--synthetic" if args.synthetic else args.data, len(labels), batch))
        flow = SeededBatches(len(labels), batch, _Batch(self, images, labels), args.seed, workers=args.workers)
        return flow, test, {"train_images": len(labels), "test_images": len(test.labels)}

    def evaluation_data(self, args, batch):
        """The whole test split in batches of ``batch`` (no tensorpack: the packed engine's ``--eval`` too)."""
        images, labels = self.load(args, "test")
        return TestBatches(images, labels, batch, self.image_size)

    def report(self, result):
        print("test error: {:.4f}".format(result.top1))

    def preprocess(self, args):
        return self.resize
