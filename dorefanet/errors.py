"""Exceptions that need no TensorFlow (the packed engine's ``--eval`` / ``--run`` import no TensorFlow).

Re-exported by the modules that raise them (``checkpoints``, ``training``).
"""

__all__ = ["ModelLoadError", "TrainingSetupError"]


class ModelLoadError(ValueError):
    """A weights file cannot be loaded into the graph (one-line message)."""


class TrainingSetupError(RuntimeError):
    """A training run cannot start as asked (one-line message)."""
