"""Reading, strictly loading and exporting model weights.

A model is loaded from one of

* a training logdir (its latest checkpoint),
* a TensorFlow checkpoint (``model-1234``, or its ``.index`` / ``.data-*`` file),
* an ``.npz`` of variable name -> array (the model-zoo format; names may carry
  ``:0``), read without pickle.

Loading for evaluation, inference and export is strict: the file's model
variables must match the graph's exactly (names and shapes), otherwise
:class:`ModelLoadError` lists every missing, extra and mis-shaped variable.
A half-loaded model with random leftovers is never used.
"""
import os
import re
import zipfile

import numpy as np

from dorefanet.atomic_file import atomic_open
from dorefanet.tf_setup import tf

from tensorpack.tfutils.sessinit import SessionInit  # noqa: E402  (after tf_setup)

__all__ = ["ModelLoadError", "read_weights", "model_variable_shapes", "check_weights",
           "StrictInit", "save_npz", "expected_variables", "build_inference_graph", "export_weights", "latest_checkpoint", "is_training_state"]


from dorefanet.errors import ModelLoadError  # noqa: E402  (defined without TensorFlow)


# Checkpoints written during training also hold the optimizer's slots, the
# step counter, the learning rate, tensorpack's moving-average summaries and,
# for replicated multi-GPU training, the other towers' copies.  None of these
# is part of the model.
_TRAINING_STATE = re.compile(
    r"(^|/)(global_step|learning_rate|beta[12]_power(_\d+)?)$"
    r"|/(Adam|Adam_\d+|Momentum|RMSProp(_\d+)?)$"
    r"|^EMA/|^tower\d+/|/EMA/biased$|/EMA/local_step$")


def is_training_state(name):
    """True for checkpoint entries that are training state rather than model weights."""
    return bool(_TRAINING_STATE.search(name))


def latest_checkpoint(logdir):
    """The path prefix of the newest checkpoint in ``logdir``, or None.

    The ``checkpoint`` state file may name it relative to ``logdir`` (tensorpack,
    ``save_relative_paths``) or absolutely (TensorFlow's default); an absolute
    path that no longer exists, because the logdir was moved or copied, is looked
    up in ``logdir`` by its file name.  ``logdir`` may be relative to the current
    directory: the result then is too.
    """
    state = tf.train.get_checkpoint_state(logdir)
    if state is None or not state.model_checkpoint_path:
        return None
    # TensorFlow has already joined a relative path onto ``logdir``; joining again doubled it.
    path = state.model_checkpoint_path
    if os.path.isabs(path) and not _checkpoint_exists(path):
        moved = os.path.join(logdir, os.path.basename(path))
        if _checkpoint_exists(moved):
            return moved
    return path


def _checkpoint_exists(prefix):
    """A V2 checkpoint has ``prefix.index``; a V1 checkpoint is the file ``prefix`` itself."""
    return os.path.exists(prefix + ".index") or os.path.isfile(prefix)


def _checkpoint_prefix(path):
    match = re.match(r"^(.*?)(\.index|\.data-\d+-of-\d+|\.meta)$", path)
    return match.group(1) if match else path


def _read_npz(path):
    try:
        with np.load(path, allow_pickle=False) as data:
            if "__packed__" in data.files:
                raise ModelLoadError("{}: is a packed model (--export-packed); run it with --engine packed".format(path))
            weights = {}
            for key in data.files:
                try:
                    value = data[key]
                except ValueError:
                    raise ModelLoadError("{}: entry {!r} holds Python objects (pickle); only plain numeric arrays "
                                         "are loaded".format(path, key)) from None
                name = key[:-2] if key.endswith(":0") else key
                if name in weights:
                    raise ModelLoadError("{}: variable {!r} appears twice (with and without ':0')".format(path, name))
                weights[name] = value
            return weights
    except ModelLoadError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ModelLoadError("{}: not a readable .npz of name -> array ({})".format(path, err)) from None


def _read_checkpoint(prefix):
    try:
        reader = tf.train.NewCheckpointReader(prefix)
    except Exception as err:  # TensorFlow raises several error types for bad files
        raise ModelLoadError("{}: not a readable TensorFlow checkpoint ({})".format(
            prefix, str(err).splitlines()[0] if str(err) else type(err).__name__)) from None
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not is_training_state(name)}


def read_weights(path):
    """Read model weights from a logdir, checkpoint or ``.npz``; return ``{name: ndarray}``.

    Checkpoint entries that are training state (see :func:`is_training_state`)
    are left out; an ``.npz`` is returned whole.
    """
    if not path:
        raise ModelLoadError("--load: no path given")
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        try:
            ckpt = latest_checkpoint(path)
        except Exception as err:  # a damaged 'checkpoint' index file (protobuf text)
            raise ModelLoadError("{}: its 'checkpoint' file cannot be read ({})".format(
                path, str(err).splitlines()[0] if str(err) else type(err).__name__)) from None
        if ckpt is None:
            raise ModelLoadError("{}: directory has no TensorFlow checkpoint (no 'checkpoint' file); expected "
                                 "a training logdir, a checkpoint or an .npz".format(path))
        return _read_checkpoint(ckpt)
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        return _read_npz(path)
    if path.endswith(".npz"):
        raise ModelLoadError("{}: {}".format(path, "not an .npz (zip) file" if os.path.exists(path)
                                             else "file not found"))
    prefix = _checkpoint_prefix(path)
    if not os.path.exists(prefix + ".index"):
        raise ModelLoadError("{}: not found; expected a logdir, a checkpoint (with {}.index) or an .npz".format(
            path, os.path.basename(prefix)))
    return _read_checkpoint(prefix)


def model_variable_shapes(graph=None):
    """``{name: shape}`` of the model variables of ``graph``: everything but training state."""
    graph = graph or tf.get_default_graph()
    with graph.as_default():
        variables = tf.global_variables()
    return {v.op.name: tuple(v.shape.as_list()) for v in variables if not is_training_state(v.op.name)}


def build_inference_graph(model):
    """Build a tensorpack ``ModelDesc`` for inference (batch norm uses its EMA) in the current graph.

    Returns the placeholders of ``model.inputs()`` (``input``, ``label``); the softmax is ``output:0``.
    """
    from tensorpack.tfutils.tower import TowerContext

    placeholders = [tf.placeholder(spec.dtype, spec.shape, spec.name) for spec in model.inputs()]
    with TowerContext("", is_training=False):
        model.build_graph(*placeholders)
    return placeholders


def expected_variables(model):
    """``{name: shape}`` of the model variables a tensorpack ``ModelDesc`` creates for inference."""
    with tf.Graph().as_default() as graph:
        build_inference_graph(model)
        return model_variable_shapes(graph)


def export_weights(model, source, out):
    """``--export``: read ``source``, check it strictly against ``model``, write its model variables to ``out``."""
    weights = read_weights(source)
    check_weights(expected_variables(model), weights, source)
    save_npz(weights, out)
    print("exported {} variables to {}".format(len(weights), out))


def _summarise(names, limit=12):
    names = sorted(names)
    text = ", ".join(names[:limit])
    return text + (" and {} more".format(len(names) - limit) if len(names) > limit else "")


def check_weights(expected, weights, source):
    """Raise :class:`ModelLoadError` unless ``weights`` has exactly the names and shapes of ``expected``."""
    missing = set(expected) - set(weights)
    extra = set(weights) - set(expected)
    misshaped = ["{} (file {}, graph {})".format(n, tuple(np.shape(weights[n])), tuple(expected[n]))
                 for n in sorted(set(expected) & set(weights))
                 if tuple(np.shape(weights[n])) != tuple(expected[n])]
    problems = []
    if missing:
        problems.append("missing {}".format(_summarise(missing)))
    if extra:
        problems.append("unexpected {}".format(_summarise(extra)))
    if misshaped:
        problems.append("wrong shape {}".format(_summarise(misshaped)))
    if problems:
        raise ModelLoadError("{}: does not match this model ({} variables): {}. Check --dorefa and the model "
                             "the file was trained for".format(source, len(expected), "; ".join(problems)))


class StrictInit(SessionInit):
    """A tensorpack ``SessionInit`` that loads every model variable from ``weights`` or fails.

    ``weights`` is ``{name: array}`` (from :func:`read_weights`); the check
    happens when the graph is set up, before any value is assigned.
    """

    def __init__(self, weights, source):
        self.weights = weights
        self.source = source
        self._assign = None

    def _setup_graph(self):
        check_weights(model_variable_shapes(), self.weights, self.source)
        self._targets = {v.op.name: v for v in tf.global_variables() if v.op.name in self.weights}

    def _run_init(self, sess):
        for name, var in self._targets.items():
            var.load(np.asarray(self.weights[name], dtype=var.dtype.base_dtype.as_numpy_dtype), sess)


def save_npz(weights, path):
    """Write ``{name: array}`` to ``path`` atomically (a temporary file, then a rename)."""
    with atomic_open(path, "wb") as f:
        np.savez(f, **{name: np.asarray(value) for name, value in sorted(weights.items())})
