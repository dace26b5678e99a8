"""Atomic file writes (write to a temporary file beside the target, flush it to disk, then rename over it), the
safetensors writer built on them, a file lock (``file_lock``), the lock every run holds on its output directory
(``run_lock``) and a file's content digest (``file_digest``)."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
import threading
from pathlib import Path

from ._arguments import check_directory

TEMPORARY_GLOB = ".*.tmp"
LOCK_FILE = ".lock"  # run_lock's file in a run's output directory


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """Yield a temporary path to write to; on success it replaces ``path`` in one rename.

    The rename is atomic on POSIX file systems, so readers see either the old file or the complete
    new one, never a partial write; on error the temporary file is removed and ``path`` is untouched. The file is
    fsynced before the rename and the directory after it, so that after a power loss a file that names another
    (``latest.json`` naming a checkpoint) never points at an empty one. Temporary files are named
    ``.<name>.*.tmp`` (``TEMPORARY_GLOB``), so that what a killed process left can be found and removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield tmp
        # mkstemp creates 0600, and some writers (safetensors) replace the file: set what open() would give
        os.chmod(tmp, 0o666 & ~umask)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, *, wait: bool = True):
    """Hold an exclusive lock on the file ``path`` (created if absent) for the block, waiting while another process
    or thread holds it; yields True, the file holding the holder's pid (``lock_holder``). With ``wait=False`` it does
    not wait: it yields False, holding nothing, when the lock is taken. The kernel drops the lock when its holder
    exits, killed or not."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            yield True
    finally:
        os.close(fd)


def lock_holder(path: str | os.PathLike) -> str:
    """The pid written by the holder of the ``file_lock`` on ``path``, or "unknown"."""
    try:
        return Path(path).read_text(errors="replace").strip()[:32] or "unknown"
    except OSError:
        return "unknown"


class RunLocked(FileExistsError):
    """Another process is training into the same directory (a run that exists, in progress)."""


_HELD: set[tuple[Path, int]] = set()  # (run directory, thread) for each lock this process holds


def written_by_a_run(out: str | os.PathLike) -> bool:
    """Whether a cliplab run has written into ``out``: every run takes ``run_lock`` on its output directory, and
    the lock file it leaves there marks the directory as a run's (files beside it are the run's to replace)."""
    return (Path(out) / LOCK_FILE).is_file()


@contextlib.contextmanager
def run_lock(out: Path, what: str = "fine-tuning run"):
    """Hold an exclusive lock on ``out`` (its ``.lock`` file, which records the holder's pid) for the block; a
    second run into the same directory fails at once, naming the holder, which ``what`` describes. The kernel drops
    the lock when the holder exits, killed or not. Re-entrant within a thread: ``finetune_and_evaluate`` takes it
    before loading anything, and the ``finetune`` it calls finds it held; another thread, like another process, is
    refused. A block that fails leaves no trace of the lock where it found no directory: the folders it made for
    the lock are removed again if nothing else was written in them."""
    out = Path(out)
    key = (out.resolve(), threading.get_ident())
    if key in _HELD:
        yield
        return
    check_directory(out, "out")
    made = [folder for folder in (out, *out.parents) if not folder.exists()]  # deepest first
    with file_lock(out / LOCK_FILE, wait=False) as held:
        if not held:
            raise RunLocked(f"{out} is in use by another {what} (pid {lock_holder(out / LOCK_FILE)}): wait for it to "
                            f"end, or choose another directory")
        _HELD.add(key)
        try:
            yield
        except BaseException:
            _remove_if_only_the_lock(made)
            raise
        finally:
            _HELD.discard(key)


def _remove_if_only_the_lock(made: list[Path]) -> None:
    """Remove the folders ``run_lock`` made (deepest first) while they hold nothing but its lock file."""
    for folder in made:
        if folder.is_dir() and {p.name for p in folder.iterdir()} <= {LOCK_FILE}:
            (folder / LOCK_FILE).unlink(missing_ok=True)
            folder.rmdir()
        else:
            return


def save_tensors(tensors: dict, path: str | os.PathLike, dtype=None, metadata: dict[str, str] | None = None) -> None:
    """Save a state dict as safetensors, atomically; ``dtype`` (e.g. ``torch.float16``) converts its floating-point
    tensors (a smaller file; loading casts them back to the model's precision); ``metadata`` goes in the header."""
    from safetensors.torch import save_file

    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous()
               for k, v in tensors.items()}
    with atomic_write(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def _fsync(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read once per version of the file in a process (a version: its resolved
    path, size and modification time): what a cached result that depends on the file is keyed by, never its name."""
    path = Path(path).resolve()
    stat = path.stat()
    return _digest(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _digest(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
