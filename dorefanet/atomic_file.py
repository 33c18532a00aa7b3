"""Files that are either completely written or not there at all: nothing a user trained is half-saved."""
import contextlib
import json
import os
import tempfile

__all__ = ["atomic_open", "write_json_atomic", "read_json"]


@contextlib.contextmanager
def atomic_open(path, mode="w"):
    """Open a temporary file beside ``path``; on success it is synced and renamed onto ``path``.

    A crash or kill before the rename leaves any previous ``path`` untouched;
    an exception inside the block removes the temporary file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(obj, path):
    """``obj`` as indented JSON in ``path``, atomically (what a run records: config, stats, results)."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def read_json(path):
    """The JSON in ``path``, or None when it is missing or unreadable (a record not written yet)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
