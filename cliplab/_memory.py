"""glibc's malloc set to keep the memory an attack pass frees for the next pass, in this process or a child's.

A pass on the CPU allocates and frees the same activations at every step, blocks of a few MB each. By default glibc
serves a block above its mmap threshold (128 KiB at first, raised to the largest block freed so far, up to 32 MiB)
from a mapping of its own that it unmaps when the block is freed, and returns the free space at the top of its heap
to the kernel beyond twice that threshold: the kernel then maps the same pages again and zeroes them, at every pass.
A fixed mmap threshold of 32 MiB (the most glibc's own rule would reach on 64-bit) and a trim threshold of 256 MiB
keep those blocks in the heap for the next pass (``benchmarks/bench_malloc.py``: page faults, system time and speed
of PGD and Square steps on the shapes model, with and without). Larger blocks still get mappings of their own; each
arena returns the free top of its heap beyond 256 MiB, and free gaps below the top stay mapped, as they do anyway.
Children inherit ``GLIBC_TUNABLES``: whatever a notebook kernel starts (a DataLoader worker, ``!pip``) gets the same.
A user's own thresholds, in ``GLIBC_TUNABLES`` or as ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``, stand.
"""
from __future__ import annotations

import ctypes
import functools
import os

MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from <malloc.h>
_TUNABLES = {"glibc.malloc.mmap_threshold": MMAP_THRESHOLD, "glibc.malloc.trim_threshold": TRIM_THRESHOLD}
_OLD_NAMES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # glibc's earlier variables for the same


def malloc_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The ``GLIBC_TUNABLES`` that gives a child process these settings (glibc reads it when the process starts;
    other C libraries ignore it), with the tunables ``environ`` (default ``os.environ``) already has after them;
    nothing where ``environ`` sets the thresholds itself (``users_own``)."""
    environ = os.environ if environ is None else environ
    if users_own(environ):
        return {}
    ours = ":".join(f"{name}={value}" for name, value in _TUNABLES.items())
    theirs = environ.get("GLIBC_TUNABLES")
    return {"GLIBC_TUNABLES": f"{ours}:{theirs}" if theirs else ours}


def users_own(environ: dict[str, str]) -> bool:
    """Whether ``environ`` sets malloc's mmap or trim threshold (or inherited ours from a parent that set them)."""
    return any(name in environ.get("GLIBC_TUNABLES", "") for name in _TUNABLES) or \
        any(name in environ for name in _OLD_NAMES)


def keep_freed_memory() -> bool:
    """Give this process these settings, unless its environment sets the thresholds (``users_own``): True if
    glibc's ``mallopt`` took them now (False with another C library, or where the environment spoke). A malloc
    preloaded in glibc's place (tcmalloc, jemalloc) keeps its own ways either way."""
    mallopt = None if users_own(os.environ) else _glibc_mallopt()
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
