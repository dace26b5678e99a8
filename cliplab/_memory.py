"""glibc's malloc set to keep the memory an attack pass frees for the next pass, in this process or a child's.

A pass on the CPU allocates and frees the same activations at every step, blocks of a few MB each. By default glibc
serves a block above its mmap threshold (128 KiB at first, raised to the largest block freed so far) from a mapping
of its own that it unmaps when the block is freed, and returns the heap's free top to the kernel beyond twice that
threshold: the kernel then maps the same pages again and zeroes them, at every pass. A fixed mmap threshold at
glibc's largest (32 MiB) and a trim threshold of 256 MiB keep those blocks in the heap for the next pass
(``benchmarks/bench_malloc.py``: the shapes pass's page faults, system time and speed, with and without). Larger
blocks still get mappings of their own, and a process keeps at most 256 MiB of free heap beyond what it uses.
"""
from __future__ import annotations

import ctypes
import functools
import os

MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit): mallopt refuses more
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from <malloc.h>


def malloc_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The ``GLIBC_TUNABLES`` that give a child process these settings (glibc reads it when the process starts;
    other C libraries ignore it). Tunables already in ``environ`` (default ``os.environ``) come after, so a setting
    of the user's own wins."""
    environ = os.environ if environ is None else environ
    ours = f"glibc.malloc.mmap_threshold={MMAP_THRESHOLD}:glibc.malloc.trim_threshold={TRIM_THRESHOLD}"
    theirs = environ.get("GLIBC_TUNABLES", "")
    if theirs.startswith(ours):  # inherited from a parent that set them
        return {"GLIBC_TUNABLES": theirs}
    return {"GLIBC_TUNABLES": f"{ours}:{theirs}" if theirs else ours}


def keep_freed_memory() -> bool:
    """Give this process these settings, unless its ``GLIBC_TUNABLES`` already names malloc's (the user's, or ours
    inherited from a parent); True if glibc took them now (False with another C library, or where the environment
    spoke)."""
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    mallopt = _glibc_mallopt()
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


@functools.cache
def _glibc_mallopt():
    """glibc's ``mallopt``, or None where the C library is another (musl, macOS, Windows)."""
    try:
        libc = ctypes.CDLL(None)  # the symbols this process has loaded, the C library's among them
        libc.gnu_get_libc_version  # only glibc has it (and its mallopt's parameters)
    except (OSError, TypeError, AttributeError):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return libc.mallopt
