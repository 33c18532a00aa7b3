"""Import the hyphenated top-level scripts (``svhn-digit-dorefa.py``, ...) as modules.

Used by the tests (through ``tests/conftest.py``) and the benchmarks; the
scripts run nothing on import, so loading one only defines its model and main.
"""
import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_loaded = {}


def load_script(filename):
    """Import ``filename`` (relative to the repository root) once per process and return the module."""
    if filename not in _loaded:
        path = os.path.join(ROOT, filename)
        name = os.path.splitext(os.path.basename(filename))[0].replace("-", "_")
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _loaded[filename] = module
    return _loaded[filename]
