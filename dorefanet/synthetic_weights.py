"""Random model-zoo-format weights whose activations are not degenerate, for tests and benchmarks.

Freshly initialised batch norms (mean 0, variance 1) leave most activations of
a deep quantized net clipped to 0 or 1, which makes a comparison of two
implementations weak.  :func:`calibrated_weights` gives every batch norm random
``gamma`` / ``beta`` and sets its moving statistics to the batch statistics of
the given images, so that each quantized activation spreads over its levels.
"""
import numpy as np

from dorefanet.tf_setup import tf

__all__ = ["calibrated_weights"]


def calibrated_weights(model, images, seed=0):
    """``{name: array}`` of every model variable of ``model`` (a tensorpack ``ModelDesc``).

    Weights are the model's random initialisation (seeded); batch norms get
    ``gamma`` in +-[0.3, 1.0] (some negative, to exercise sign handling) and
    ``beta`` in [0.2, 0.7]; their ``mean/EMA`` and ``variance/EMA`` are the
    statistics of ``images`` in a training-mode pass; TTQ's ``Wp`` / ``Wn``
    are drawn from [0.5, 1.5].
    """
    from tensorpack.tfutils.tower import TowerContext

    from dorefanet.checkpoints import is_training_state

    rng = np.random.RandomState(seed)
    with tf.Graph().as_default() as graph:
        tf.set_random_seed(seed)
        image_spec, label_spec = model.inputs()
        image = tf.placeholder(image_spec.dtype, image_spec.shape, "input")
        label = tf.placeholder(label_spec.dtype, label_spec.shape, "label")
        with TowerContext("", is_training=True):
            model.build_graph(image, label)
        variables = {v.op.name: v for v in tf.global_variables() if not is_training_state(v.op.name)}
        stats = {}
        for op in graph.get_operations():
            if op.type.startswith("FusedBatchNorm") and op.type != "FusedBatchNormGradV3":
                scope = op.name.rsplit("/", 1)[0]
                stats[scope] = (op.outputs[1], op.outputs[2])
        with tf.Session() as sess:
            sess.run(tf.global_variables_initializer())
            for name, var in variables.items():
                size = var.shape.as_list()
                if name.endswith("/gamma"):
                    value = rng.uniform(0.3, 1.0, size) * rng.choice([-1.0, 1.0], size, p=[0.2, 0.8])
                elif name.endswith("/beta"):
                    value = rng.uniform(0.2, 0.7, size)
                elif name.endswith("/Wp") or name.endswith("/Wn"):
                    value = rng.uniform(0.5, 1.5)
                else:
                    continue
                var.load(np.asarray(value, np.float32), sess)
            feed = {image: images, label: np.zeros(len(images), np.int32)}
            batch_stats = sess.run(stats, feed)
            weights = sess.run(variables)
    for scope, (mean, var) in batch_stats.items():
        bn = _bn_scope(scope, weights)
        weights[bn + "/mean/EMA"] = mean.astype(np.float32)
        weights[bn + "/variance/EMA"] = var.astype(np.float32)
    return weights


def _bn_scope(op_scope, weights):
    """The batch norm variable scope an op's name scope belongs to (the longest matching prefix)."""
    parts = op_scope.split("/")
    for end in range(len(parts), 0, -1):
        scope = "/".join(parts[:end])
        if scope + "/mean/EMA" in weights:
            return scope
    raise KeyError("no batch norm variables for the op scope {}".format(op_scope))
