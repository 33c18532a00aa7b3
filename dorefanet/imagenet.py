"""The data source of ``alexnet-dorefa.py`` and ``resnet-dorefa.py``: ILSVRC12 (``--data``) or ``--fake``.

What the driver (:mod:`dorefanet.driver`) asks a data source for: its flags and their
checks, the training and validation flows, the evaluation batches, ``--run``'s
preprocessing and class names, and how its errors are named and reported.  It reads
with :mod:`dorefanet.imagenet_data` (no TensorFlow, what the packed engine's
``--eval`` / ``--run`` use) and trains with ``imagenet_utils``' tensorpack dataflows.
"""
import argparse
import functools
import os
import sys

from dorefanet.imagenet_data import (IMAGE_SIZE, ClassNamesError, ImageNetDataError, ValidationBatches,
                                     default_parallelism, eval_sizes, list_imagenet_files, load_class_names,
                                     preprocess_image)

__all__ = ["ImageNetData", "ILSVRC12_TRAIN_IMAGES", "FAKE_EVAL_BATCHES"]

#: Images in the ILSVRC12 training set; an epoch of ``--fake`` data pretends to be one pass over them.
ILSVRC12_TRAIN_IMAGES = 1281167
#: Batches of random images validated per epoch by ``--fake`` training and evaluated by ``--eval --fake``.
FAKE_EVAL_BATCHES = 2


class ImageNetData:
    """ILSVRC12 (``--data DIR``) or random ImageNet-shaped batches (``--fake``) for ``alexnet``/``resnet-dorefa.py``."""

    head = "imagenet"            # the graph's loss and error names (dorefanet.tf_model)
    error_key, error_name = "val-error-top1", "top-1 validation error"
    eval_pattern = r"top-1 error: ([0-9.]+)"
    # what the run's validation after every epoch records in stats.json
    validation_scalars = ("xentropy-loss",)
    validation_errors = (("wrong-top1", "val-error-top1"), ("wrong-top5", "val-error-top5"))
    errors = (ImageNetDataError, ClassNamesError)

    def add_flags(self, group):
        group.add_argument("--fake", action="store_true",
                           help="random ImageNet-shaped images instead of --data, to try or benchmark training "
                                "(or --eval) without the dataset")
        group.add_argument("--workers", type=int, default=None,
                           help="parallel data loading: processes that decode and augment training images and "
                                "threads that decode validation images; 0 loads in the main process. By default "
                                "half the CPUs ({})".format(default_parallelism()))
        # A developer flag for fast tests: the published weights need 224 (AlexNet's fc0 depends on it).
        group.add_argument("--image-size", type=int, default=IMAGE_SIZE, help=argparse.SUPPRESS)

    def check_flags(self, parser, args, needs_data):
        if args.fake and args.data:
            parser.error("--fake and --data cannot be combined; choose one data source")
        if needs_data and not (args.fake or args.data):
            parser.error("give --data ILSVRC_DIR (with train/<wnid>/ and val/) or --fake (random images) to {}".format(
                "evaluate" if args.eval else "train"))
        if args.run and (args.fake or args.data):
            parser.error("--run classifies the given image files; --data and --fake do not apply")

    def _workers(self, args):
        return default_parallelism() if args.workers is None else args.workers

    def data_flags(self, args, sweep=False):
        """The flags that give the same data to another command (the evaluate command, a sweep's runs)."""
        flags = ["--fake"] if args.fake else ["--data", os.path.abspath(args.data)]
        return flags + (["--image-size", str(args.image_size)] if args.image_size != IMAGE_SIZE else [])

    def describe(self, args):
        """What ``config.json`` says the data is."""
        return "fake" if args.fake else os.path.abspath(args.data)

    def kind(self, args):
        """What the workers of a cluster must agree on (their paths to the data may differ)."""
        return "fake" if args.fake else "imagenet"

    def title(self, args):
        return "random images (--fake)" if args.fake else "ILSVRC12 " + os.path.abspath(args.data)

    def training_data(self, args, batch):
        """``(train flow of batches of batch, validation batches, config fields)``."""
        from dorefanet.distributed import fake_train_flow
        from imagenet_utils import fbresnet_augmentor, training_batches

        workers, size = self._workers(args), args.image_size
        fields = {"workers": workers, "image_size": size}
        if args.fake:
            # seeded, the same batch on every tower of every worker: the multi-machine test compares a cluster
            # with one process (distributed.fake_train_flow says why not one batch per tower)
            train = fake_train_flow(batch, size, args.seed)
            fields["train_images"] = ILSVRC12_TRAIN_IMAGES
        else:
            files = list_imagenet_files(args.data, "train")
            train = training_batches(args.data, files, batch, fbresnet_augmentor(True, size), args.seed, workers)
            fields["train_images"] = len(files)
        return train, self.evaluation_data(args, batch), fields

    def resume_fields(self, args):
        return {"image_size": args.image_size}

    def evaluation_data(self, args, batch):
        """The whole validation set in batches of ``batch`` (``--fake``: a few random batches, with tensorpack)."""
        if args.fake:
            from imagenet_utils import fake_dataflow

            return fake_dataflow(batch, args.image_size, size=FAKE_EVAL_BATCHES)
        return ValidationBatches(args.data, batch, args.image_size, parallel=self._workers(args))

    def report(self, result):
        print("evaluated {} images".format(result.count), file=sys.stderr)
        print("top-1 error: {:.4f}".format(result.top1))
        print("top-5 error: {:.4f}".format(result.top5))

    def preprocess(self, args):
        """``--run``: shorter side to 256/224 of the input (bicubic), then the center crop."""
        resize, crop = eval_sizes(args.image_size)
        return functools.partial(preprocess_image, resize=resize, crop=crop)

    def class_describer(self):
        """``--run``'s extra fields of a class: its wnid and name (the class list is read here, before the model)."""
        names = load_class_names()
        return lambda label: {"wnid": names[label][0], "name": names[label][1]}
