"""Argument validation shared by every public entry point.

Each check raises ``TypeError`` or ``ValueError`` naming the argument and what is allowed, so a
mistake surfaces at the call that made it rather than deep inside a kernel.
"""
from __future__ import annotations

import math
import numbers
import tempfile
from pathlib import Path

import torch


def check_images(x: torch.Tensor, name: str = "x", *, values: bool = True) -> None:
    """Images must be float NCHW with 3 channels, finite, in [0, 1] (the data contract).

    ``values=False`` checks only type and shape: it needs no device synchronisation, so it can run at
    every forward pass, where defences may legitimately feed noisy images outside [0, 1].
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of images, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a float tensor with values in [0, 1], got dtype {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (N, 3, H, W), got {tuple(x.shape)}")
    if x.shape[1] != 3:
        raise ValueError(f"{name} must have 3 channels (N, 3, H, W), got {x.shape[1]} in {tuple(x.shape)}")
    if not values:
        return
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(
            f"{name} must have values in [0, 1], got range [{x.min().item():.4g}, {x.max().item():.4g}]"
        )


def check_nonempty(x: torch.Tensor, name: str = "x") -> None:
    """A batch must hold at least one image: an empty one has no accuracy and breaks reshapes deep inside."""
    if len(x) == 0:
        raise ValueError(f"{name} must hold at least one image (N >= 1), got shape {tuple(x.shape)}")


def check_seed(seed: int | None, name: str = "seed") -> None:
    """None, or an int that torch's generators take: 0 <= seed < 2**64."""
    if seed is None:
        return
    check_int(seed, name, minimum=0)
    if seed >= 2**64:
        raise ValueError(f"{name} must be below 2**64, got {seed}")


def check_labels(y: torch.Tensor, n: int, num_classes: int, name: str = "y") -> None:
    """Labels must be an int64-compatible vector of length ``n`` with values in [0, num_classes)."""
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name} must be an integer torch.Tensor of class indices")
    if y.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match the images, got {tuple(y.shape)}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"{name} must hold class indices in [0, {num_classes - 1}], "
            f"got range [{y.min().item()}, {y.max().item()}]"
        )


def check_positive(value: float, name: str, *, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def check_int(value: int, name: str, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def check_directory(path: Path, name: str) -> None:
    """``path`` is a directory this process can write in, or can be made one: its nearest existing ancestor must be a
    directory where a probe file can be created (and is removed at once), so that an output location that cannot be
    written fails before the work that would fill it, not after."""
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                raise FileExistsError(f"{name} must be a directory, but {existing} is a file")
            try:
                with tempfile.NamedTemporaryFile(dir=existing, prefix=".cliplab-probe-"):
                    pass
            except OSError as error:
                raise PermissionError(f"{name}: cannot write in {existing} ({error.strerror or error})") from None
            return


def check_new_file(path: Path, name: str, overwrite: bool) -> None:
    """``path`` may be written: a file that is not there yet (or ``overwrite``), in a directory that can be written."""
    if path.is_dir():
        raise FileExistsError(f"{name} must be a file, but {path} is a directory")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{name}: {path} exists; choose another path, or pass --overwrite to replace it")
    check_directory(path.parent, name)


def check_choice(value: str, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
