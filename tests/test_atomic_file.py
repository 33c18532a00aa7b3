"""atomic_open: a failed write leaves the previous file and no temporary behind."""
import os

import pytest

from dorefanet.atomic_file import atomic_open


def test_success_replaces_and_failure_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "sub" / "stats.json")
    with atomic_open(path) as f:
        f.write("old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write("half")
            raise RuntimeError("killed")
    with open(path) as f:
        assert f.read() == "old"
    assert os.listdir(os.path.dirname(path)) == ["stats.json"]
    with atomic_open(path, "wb") as f:
        f.write(b"new")
    with open(path, "rb") as f:
        assert f.read() == b"new"
