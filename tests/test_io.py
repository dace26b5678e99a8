"""Atomic writes: all or nothing, with the permissions an ordinary open() would give."""
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from cliplab._io import atomic_write


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("write", [
    lambda tmp: open(tmp, "w").write("text"),
    lambda tmp: save_file({"w": torch.zeros(2)}, tmp),  # safetensors replaces the file it writes
])
def test_written_file_gets_umask_permissions(tmp_path, write):
    umask = os.umask(0o022)
    try:
        with atomic_write(tmp_path / "out") as tmp:
            write(tmp)
    finally:
        os.umask(umask)
    assert mode(tmp_path / "out") == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "out").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(tmp_path / "out") as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("crash")
    assert (tmp_path / "out").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
