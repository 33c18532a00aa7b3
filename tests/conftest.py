"""Shared test helpers: import the project from the repository root and load its hyphenated scripts."""
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import tf_setup  # noqa: E402,F401  (prepares TensorFlow before any test imports it)

_scripts = {}


def load_script(filename):
    """Import a top-level script such as ``svhn-digit-dorefa.py`` as a module (once per session)."""
    if filename not in _scripts:
        path = os.path.join(ROOT, filename)
        name = os.path.splitext(filename)[0].replace("-", "_")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _scripts[filename] = module
    return _scripts[filename]


@pytest.fixture
def session():
    """A fresh graph and a session bound to it; yields ``tf.compat.v1`` and the session."""
    from tf_setup import tf

    graph = tf.Graph()
    with graph.as_default():
        tf.set_random_seed(1234)
        with tf.Session(graph=graph) as sess:
            yield sess
