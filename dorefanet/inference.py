"""What ``--run`` and ``--eval`` share across the scripts: a strictly loaded predictor, per-image
top-k output, whole-set top-1/top-5 error, and clean stdout for results."""
import contextlib
import json
import queue
import sys
import threading
from typing import NamedTuple

import numpy as np
import tqdm

from dorefanet.image_io import ImageReadError, read_image_bgr
from dorefanet.errors import ModelLoadError

__all__ = ["run_images", "top_k", "EvaluationError", "TopKError", "topk_wrong", "evaluate_topk", "make_predictor",
           "make_packed_predictor", "check_packed_header", "load_predictor", "results_only_on_stdout"]


def top_k(probs, k):
    """Indices of the ``k`` largest probabilities, highest first (ties: lower class first)."""
    order = np.argsort(-np.asarray(probs, np.float64), kind="stable")
    return order[:k]


def run_images(paths, preprocess, predict, describe, k=5, as_json=False, out=None, err=None):
    """Classify each file in ``paths``; return the number of files that failed.

    ``preprocess(image_bgr_uint8) -> array`` makes one network input,
    ``predict(batch) -> probabilities`` runs the network, ``describe(class) ->
    dict`` gives the extra JSON fields of a class (e.g. wnid and name).  A file
    that cannot be read gets a one-line error on ``err``; the others are still
    processed.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    failed = 0
    for path in paths:
        try:
            image = preprocess(read_image_bgr(path))
        except ImageReadError as e:
            print("error: {}".format(e), file=err)
            failed += 1
            continue
        probs = np.asarray(predict(image[np.newaxis]))[0]
        top = [dict({"class": int(c)}, **describe(int(c)), prob=float(probs[c])) for c in top_k(probs, k)]
        if as_json:
            print(json.dumps({"image": path, "top": top}), file=out)
        else:
            best = top[0]
            label = " ".join(str(v) for key, v in best.items() if key not in ("class", "prob"))
            print("{}: {}{} ({:.4f})".format(path, best["class"], " " + label if label else "", best["prob"]),
                  file=out)
            for entry in top[1:]:
                rest = " ".join(str(v) for key, v in entry.items() if key not in ("class", "prob"))
                print("    {}{} ({:.4f})".format(entry["class"], " " + rest if rest else "", entry["prob"]),
                      file=out)
        out.flush()
    return failed


class EvaluationError(ValueError):
    """The evaluation cannot produce a number (e.g. no images); one-line message."""


class TopKError(NamedTuple):
    """Error rates over a whole set: ``top1``, ``top5`` in [0, 1] and the number of images ``count``."""

    top1: float
    top5: float
    count: int


def topk_wrong(probs, labels, k):
    """Per-sample bool: the label is not among the ``k`` highest scores.

    Same rule as ``tf.nn.in_top_k``: ties at the boundary count as in the top k
    (wrong only if at least ``k`` classes score strictly higher); a non-finite
    score for the label is wrong.
    """
    probs = np.asarray(probs)
    labels = np.asarray(labels).astype(np.int64)
    target = probs[np.arange(len(labels)), labels]
    higher = (probs > target[:, None]).sum(axis=1)
    return (higher >= k) | ~np.isfinite(target)


def _prefetched(dataflow, depth):
    """The batches of ``dataflow``, read by a thread of their own up to ``depth`` batches ahead.

    Decoding and resizing the next batch then overlap the network's work on this one (OpenCV and the
    engines release the GIL).  An exception of the reader reaches the consumer at the batch it
    would have come with; a consumer that stops early stops the reader.
    """
    items = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item):
        """Queue ``item`` unless the consumer has stopped (then False)."""
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def read():
        try:
            for dp in dataflow:
                if not put((dp, None)):
                    return
            put((done, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            put((done, err))

    reader = threading.Thread(target=read, name="eval-prefetch", daemon=True)
    reader.start()
    try:
        while True:
            dp, err = items.get()
            if err is not None:
                raise err
            if dp is done:
                return
            yield dp
    finally:
        stop.set()
        reader.join()


def evaluate_topk(predict, dataflow, total=None, progress=True, prefetch=1):
    """Top-1 and top-5 error of ``predict`` over every batch of ``dataflow`` (the partial last one included).

    ``predict(images) -> probabilities [B, classes]``; ``dataflow`` yields
    ``[images, labels]`` batches.  ``total``: number of batches for the progress
    bar (default ``len(dataflow)`` when available).  ``prefetch``: batches read
    ahead by a thread while ``predict`` runs (0: none).  Returns :class:`TopKError`.
    """
    if total is None:
        try:
            total = len(dataflow)
        except (TypeError, NotImplementedError):
            total = None
    dataflow.reset_state()
    wrong1 = wrong5 = count = 0
    with tqdm.tqdm(total=total, disable=not progress, unit="batch", desc="evaluating", dynamic_ncols=True) as bar:
        for images, labels in (_prefetched(dataflow, prefetch) if prefetch > 0 else dataflow):
            probs = np.asarray(predict(images))
            labels = np.asarray(labels)
            if probs.ndim != 2 or probs.shape[0] != labels.shape[0]:
                raise ValueError("the predictor returned shape {} for a batch of {} images; expected "
                                 "[{}, classes]".format(probs.shape, labels.shape[0], labels.shape[0]))
            wrong1 += int(topk_wrong(probs, labels, 1).sum())
            wrong5 += int(topk_wrong(probs, labels, 5).sum())
            count += labels.shape[0]
            bar.update(1)
            bar.set_postfix(top1="{:.4f}".format(wrong1 / count), top5="{:.4f}".format(wrong5 / count))
    if count == 0:
        raise EvaluationError("the evaluation data has no images")
    return TopKError(wrong1 / count, wrong5 / count, count)


def make_predictor(model, weights, source):
    """``predict(images) -> probabilities`` of ``model`` with every variable loaded strictly from ``weights``."""
    from dorefanet.checkpoints import StrictInit
    from dorefanet.training import session_config
    from tensorpack import OfflinePredictor, PredictConfig
    from tensorpack.tfutils.sesscreate import NewSessionCreator

    # Given a config, NewSessionCreator warns (on stdout) about GPU options set too late; this
    # config sets none, so it replaces the default config instead of being passed in.
    creator = NewSessionCreator()
    creator.config = session_config()
    config = PredictConfig(model=model, session_init=StrictInit(weights, source), session_creator=creator,
                           input_names=["input"], output_names=["output"])
    predictor = OfflinePredictor(config)
    return lambda images: predictor(images)[0]


def make_packed_predictor(path, model):
    """``predict(images) -> probabilities`` of the packed engine on ``path`` (``--engine packed``).

    The file must have been exported for the script's ``model``: the same
    network, bit widths and input size; otherwise :class:`ModelLoadError`.
    """
    from dorefanet.packed import PackedFormatError, load_packed

    try:
        packed = load_packed(path, huge_pages=True)     # the scripts' choice (see dorefanet.memory)
    except PackedFormatError as err:
        raise ModelLoadError(str(err)) from None
    check_packed_header(path, packed.header, model)
    return packed.predict


def check_packed_header(path, header, model):
    """Raise :class:`ModelLoadError` unless the packed file ``path`` (its ``header``) holds the script's ``model``:
    the same network, bit widths (per layer) and input size."""
    from dorefanet.bits import LayerPlan

    bits = str(model.bits)
    if header["model"] != model.model_name:
        raise ModelLoadError("{}: is a packed {} model; this script runs {}".format(path, header["model"],
                                                                                   model.model_name))
    if header["bits"] != bits:
        raise ModelLoadError("{}: was packed at --dorefa {}, not {}; pass --dorefa {}".format(
            path, header["bits"], bits, header["bits"]))
    # a file exported at --dorefa alone records no table: it is the table --dorefa alone gives
    packed_table = header.get("layer_bits") or LayerPlan(model.network, model.bits).table()
    ours = model.layer_plan.table()
    for layer in ours:
        if packed_table.get(layer) != ours[layer]:
            raise ModelLoadError("{}: was packed with {} at {}, not {} as --dorefa / --layer-bits give".format(
                path, layer, packed_table.get(layer), ours[layer]))
    height, width = model.input_hw
    if (header["input"]["height"], header["input"]["width"]) != (height, width):
        raise ModelLoadError("{}: takes {}x{} images; this network takes {}x{}".format(
            path, header["input"]["height"], header["input"]["width"], height, width))


def load_predictor(args, model):
    """The predictor of ``--eval`` / ``--run``: ``--engine`` on ``--load``, strictly checked against ``model``."""
    if args.engine == "packed":
        return make_packed_predictor(args.load, model)
    from dorefanet.checkpoints import read_weights

    return make_predictor(model, read_weights(args.load), args.load)


@contextlib.contextmanager
def results_only_on_stdout():
    """While inside: tensorpack logs only warnings, and to stderr.

    tensorpack logs to stdout, where ``--run --json`` and ``--eval`` print
    results that other programs parse.  The streams and the level are restored
    on exit, so that a caller (a test, a notebook) keeps its own logging setup.
    """
    import logging

    # tensorpack's logger, without importing tensorpack (dorefanet.training.quiet_tensorpack)
    logger = logging.getLogger("tensorpack")
    level = logger.level
    logger.setLevel(logging.WARNING)
    moved = [handler for handler in logger.handlers
             if type(handler) is logging.StreamHandler and handler.stream is not sys.stderr]  # not FileHandlers
    previous = [handler.setStream(sys.stderr) for handler in moved]
    try:
        yield
    finally:
        for handler, stream in zip(moved, previous):
            handler.setStream(stream)
        logger.setLevel(level)   # a later training in the same process logs its graph building again
