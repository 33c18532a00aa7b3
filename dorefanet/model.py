"""A model is its network, its recipe and its data: a script's three parts at one set of bit widths.

A script (``svhn-digit-dorefa.py``, ...) defines ``network(net, x)`` (its layers,
against :mod:`dorefanet.builder`), ``RECIPE`` (a dict of plain data: the name, the
input, the optimizer and schedule, epochs, batch, weight decay) and ``DATA`` (its
data source, e.g. :class:`dorefanet.svhn_data.SVHNDigits`).  :class:`Model` joins
them at the bit widths of a run, without TensorFlow (what the packed engine needs);
:class:`dorefanet.tf_model.TrainableModel` is the same model with its TensorFlow
graph, and :func:`dorefanet.driver.make_model` chooses between them.

The recipe's keys:

* ``name``: the model's name in packed files and summaries; ``run_name``: in run
  directories (``train_log/<run_name>-dorefa-W,A,G``; default ``name``);
* ``default_dorefa``: ``--dorefa`` when none is given;
* ``input``: ``size`` (square, pixels), ``dtype`` of the ``input`` placeholder,
  ``mean`` / ``std`` of the normalisation (BGR, 0..255 units; ``std`` may be one number);
* ``activation_at_32``: ``relu`` or ``clip``, the float activation (:mod:`dorefanet.builder`);
* ``optimizer``: ``(name, keyword arguments)``, name ``adam`` or ``momentum``; ``lr``;
  ``lr_schedule``: ``[(epoch, lr), ...]`` (the lr from the end of that epoch on),
  ``{"at_fractions": [(fraction, lr), ...]}`` (the same at fractions of ``--epochs``,
  rounded to whole epochs: :func:`lr_steps`), or ``{"halve_every": epochs}`` (a
  staircase decay in the graph);
* ``epochs``, ``batch`` (total; an epoch is one pass over the training data unless
  ``--steps-per-epoch`` says otherwise);
* ``weight_decay`` and ``weight_decay_pattern`` (L2 on the variables whose name matches, ``re.search``);
* ``histograms``: a variable-name pattern whose histogram and RMS are summarised (optional);
* ``cpu_data_format``: the layout without a GPU (the one measured faster); ``min_image_size``.
"""
from dorefanet.bits import Bits, LayerPlan, check_bits

__all__ = ["Model", "normalize_data_format", "run_name", "lr_steps"]


def run_name(recipe):
    """What a recipe's runs are called: ``train_log/<run_name>-dorefa-W,A,G``, the resume key's model."""
    return recipe.get("run_name", recipe["name"])


def lr_steps(recipe, epochs):
    """The recipe's learning-rate schedule as ``[(epoch, lr), ...]`` for a run of ``epochs`` (None: in the graph)."""
    schedule = recipe.get("lr_schedule", ())
    if isinstance(schedule, dict) and "at_fractions" in schedule:
        steps = {}
        for fraction, lr in schedule["at_fractions"]:
            steps[int(fraction * epochs + 0.5)] = lr   # a later entry at the same epoch wins
        return sorted(steps.items())
    if isinstance(schedule, dict):
        return None
    return [tuple(step) for step in schedule]


def normalize_data_format(data_format):
    """Accept ``'channels_first'``/``'NCHW'`` or ``'channels_last'``/``'NHWC'``; return the ``channels_*`` name."""
    value = {"nchw": "channels_first", "channels_first": "channels_first",
             "nhwc": "channels_last", "channels_last": "channels_last"}.get(str(data_format).lower())
    if value is None:
        raise ValueError("invalid data_format {!r}; expected 'channels_first' (NCHW) or 'channels_last' "
                         "(NHWC)".format(data_format))
    return value


class Model:
    """One script's network, recipe and data source at ``bits`` (``(W, A, G)``, W may be ``'t'``).

    ``layer_bits``: the ``--layer-bits`` entries ``[(pattern, (W, A, G))]``;
    ``image_size``: the input's side (default the recipe's; only a test changes it);
    ``steps_per_epoch``: what an in-graph schedule counts epochs in.
    """

    def __init__(self, network, recipe, data, bits, data_format="channels_last", image_size=None, layer_bits=(),
                 steps_per_epoch=None):
        self.network, self.recipe, self.data = network, recipe, data
        self.model_name = recipe["name"]
        self.bits = Bits(*check_bits(*bits))
        self.data_format = normalize_data_format(data_format)
        self.image_size = int(recipe["input"]["size"] if image_size is None else image_size)
        if self.image_size < 1:
            raise ValueError("invalid image size {!r}".format(image_size))
        self.image_mean = tuple(recipe["input"].get("mean", (0.0, 0.0, 0.0)))
        self.image_std = recipe["input"]["std"]
        self.activation_at_32 = recipe.get("activation_at_32", "relu")
        self.steps_per_epoch = int(steps_per_epoch or 1)   # training sets it once the data is known
        self.layer_plan = LayerPlan(network, self.bits, layer_bits)

    @property
    def input_hw(self):
        """(height, width) of the network's input images."""
        return self.image_size, self.image_size

    @property
    def input_shape(self):
        """(height, width, channels) of one input image (BGR)."""
        return self.image_size, self.image_size, 3

    @property
    def input_dtype(self):
        return self.recipe["input"].get("dtype", "float32")

    def packed_program(self):
        """The network as a program of the packed engine (``--export-packed``, ``--summary``)."""
        from dorefanet.packed.program import ProgramBuilder

        net = ProgramBuilder(self.layer_plan, self.activation_at_32)
        return net.program(self.network, self.image_mean, self.image_std)
