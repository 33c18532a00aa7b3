"""What ``--run`` and ``--eval`` share across the scripts: per-image top-k output and whole-set error."""
import json
import sys

import numpy as np

from image_io import ImageReadError, read_image_bgr

__all__ = ["run_images", "top_k", "count_errors", "batches"]


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


def batches(images, labels, batch_size):
    """Yield ``(images, labels)`` batches covering every sample, the last one possibly partial."""
    for start in range(0, len(labels), batch_size):
        yield images[start:start + batch_size], labels[start:start + batch_size]


def count_errors(probs, labels, ks=(1,)):
    """Number of samples whose label is not among the top-k of ``probs``, for each k."""
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    # rank of the true class: how many classes score strictly higher
    true_score = probs[np.arange(len(labels)), labels]
    rank = np.sum(probs > true_score[:, None], axis=1)
    return [int(np.sum(rank >= k)) for k in ks]
