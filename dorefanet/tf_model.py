"""A model's TensorFlow graph and training recipe: the tensorpack ``ModelDesc`` of every script.

:class:`TrainableModel` is :class:`dorefanet.model.Model` built in TensorFlow:
the ``input`` / ``label`` placeholders, the input normalisation, the network
(:class:`dorefanet.network.GraphBuilder`), the softmax ``output``, the per-sample
errors ``wrong-top1`` (and ``wrong-top5``), the cost with the recipe's weight
decay, and the recipe's optimizer and learning rate.

The loss and summary tensors keep the names each data set's scripts have always
given them (the data source's ``head``), so that run directories, ``stats.json``
keys and checkpoints stay what they were:

* ``digits`` (SVHN): ``input / std``, ``cross_entropy_loss``, ``wd_cost``, ``train_error``;
* ``imagenet``: ``image_preprocess``, ``xentropy-loss``, ``l2_regularize_loss``,
  ``train-error-top1`` / ``-top5``.
"""
import re

import numpy as np

from dorefanet.tf_setup import tf

from tensorpack import ModelDesc  # noqa: E402
from tensorpack.models import regularize_cost  # noqa: E402
from tensorpack.tfutils.summary import add_moving_summary, add_param_summary  # noqa: E402

from dorefanet.model import Model  # noqa: E402
from dorefanet.network import GraphBuilder  # noqa: E402

__all__ = ["TrainableModel", "schedule_callbacks"]


class TrainableModel(Model, ModelDesc):
    """A script's model with its TensorFlow graph (:meth:`build_graph`) and optimizer (a ``ModelDesc``)."""

    def inputs(self):
        return [tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.as_dtype(self.input_dtype), "input"),
                tf.TensorSpec([None], tf.int32, "label")]

    def network_logits(self, x):
        """The logits of ``network`` built in TensorFlow on the normalised batch ``x`` (in ``data_format``)."""
        return GraphBuilder(self.layer_plan, self.data_format, self.activation_at_32).build(self.network, x)

    def build_graph(self, image, label):
        return _HEADS[self.data.head](self, image, label)

    def learning_rate(self):
        """The recipe's learning rate: a staircase decay in the graph, or a variable that callbacks set."""
        schedule = self.recipe.get("lr_schedule", ())
        if isinstance(schedule, dict) and "halve_every" in schedule:
            lr = tf.train.exponential_decay(
                learning_rate=self.recipe["lr"], global_step=tf.train.get_or_create_global_step(),
                decay_steps=self.steps_per_epoch * schedule["halve_every"], decay_rate=0.5, staircase=True,
                name="learning_rate")
            tf.summary.scalar("lr", lr)
            return lr
        lr = tf.get_variable("learning_rate", initializer=float(self.recipe["lr"]), trainable=False)
        tf.summary.scalar("learning_rate-summary", lr)
        return lr

    def optimizer(self):
        name, options = self.recipe["optimizer"]
        make = {"adam": tf.train.AdamOptimizer, "momentum": tf.train.MomentumOptimizer}[name]
        return make(self.learning_rate(), **options)


def schedule_callbacks(model, schedule):
    """The callbacks that set the ``learning_rate`` variable by ``schedule``, ``[(epoch, lr), ...]`` (or None)."""
    if not schedule:
        return []
    from tensorpack import ScheduledHyperParamSetter

    # Keyed on epochs: a resumed run starts at the epoch after its checkpoint, and the
    # learning_rate variable itself is restored from the checkpoint.
    return [ScheduledHyperParamSetter("learning_rate", [tuple(step) for step in schedule])]


def _to_layout(model, x):
    return tf.transpose(x, [0, 3, 1, 2]) if model.data_format == "channels_first" else x


def _digits_head(model, image, label):
    logits = model.network_logits(_to_layout(model, image / model.image_std))
    tf.nn.softmax(logits, name="output")

    wrong = tf.cast(tf.logical_not(tf.nn.in_top_k(logits, label, 1)), tf.float32, name="wrong-top1")
    cost = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(logits=logits, labels=label),
                          name="cross_entropy_loss")
    decayed = [v for v in tf.trainable_variables() if re.search(model.recipe["weight_decay_pattern"], v.op.name)]
    wd_cost = tf.multiply(model.recipe["weight_decay"], tf.add_n([tf.nn.l2_loss(v) for v in decayed]),
                          name="wd_cost")
    total = tf.add_n([cost, wd_cost], name="cost")
    add_moving_summary(cost, wd_cost, total, tf.reduce_mean(wrong, name="train_error"))
    return total


def _prediction_incorrect(logits, label, k, name):
    # tensorpack convention: a float 0/1 vector per sample, 1 where the label is not in the top k.
    with tf.name_scope(name + "_internals"):
        wrong = tf.logical_not(tf.nn.in_top_k(logits, label, k))
    return tf.cast(wrong, tf.float32, name=name)


def _imagenet_head(model, image, label):
    with tf.name_scope("image_preprocess"):
        image = tf.cast(image, tf.float32)
        mean = np.asarray(model.image_mean, dtype=np.float32)
        if np.any(mean != 0):
            image = image - tf.constant(mean)
        image = image / tf.constant(np.asarray(model.image_std, dtype=np.float32))
    logits = model.network_logits(_to_layout(model, image))
    if model.recipe.get("histograms"):
        add_param_summary((model.recipe["histograms"], ["histogram", "rms"]))
    tf.nn.softmax(logits, name="output")

    loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(logits=logits, labels=label),
                          name="xentropy-loss")
    wrong1 = _prediction_incorrect(logits, label, 1, "wrong-top1")
    wrong5 = _prediction_incorrect(logits, label, 5, "wrong-top5")
    add_moving_summary(tf.reduce_mean(wrong1, name="train-error-top1"),
                       tf.reduce_mean(wrong5, name="train-error-top5"))
    weight_decay, pattern = model.recipe.get("weight_decay", 0), model.recipe.get("weight_decay_pattern", r"/W$")
    if weight_decay > 0:
        # wd * sum(w^2) / 2 per variable (tf.nn.l2_loss), the form of the tensorpack versions
        # that trained the published models (tf.contrib l2_regularizer).
        wd_loss = regularize_cost(pattern, lambda w: weight_decay * tf.nn.l2_loss(w), name="l2_regularize_loss")
        add_moving_summary(loss, wd_loss)
        return tf.add_n([loss, wd_loss], name="cost")
    cost = tf.identity(loss, name="cost")
    add_moving_summary(cost)
    return cost


_HEADS = {"digits": _digits_head, "imagenet": _imagenet_head}
