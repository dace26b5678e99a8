"""Small torch helpers with no knowledge of CLIP: where a module lives, and the bf16 autocast switch."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

PRECISIONS = ("auto", "bf16", "fp32")


def device_of(model: nn.Module, default: torch.device) -> torch.device:
    """The device of ``model``'s first parameter (else buffer); ``default`` for a module with neither."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else default


def check_device(model: nn.Module, x: torch.Tensor, name: str = "x") -> None:
    """``x`` must be on ``model``'s device: a clear error at the boundary, not a device mismatch deep inside."""
    device = device_of(model, x.device)
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the model is on {device}: move it with "
                         f"{name}.to({str(device)!r}) (or the model with .to({name}.device))")


def autocast(device: torch.device, precision: str | bool):
    """The autocast context of ``precision`` on ``device``.

    - ``"auto"``: bfloat16 autocast on CUDA; elsewhere the caller's autocast state is left as it is.
    - ``"bf16"`` (or True): bfloat16 autocast on any device that supports it.
    - ``"fp32"``: autocast switched off, even inside a caller's autocast region.
    - False: the caller's state, unchanged.

    Matmuls and convolutions then run in bf16; callers keep losses, softmax and statistics in fp32 by
    casting logits with ``.float()``.
    """
    if precision is True:
        precision = "bf16"
    if precision is False or not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()  # e.g. the meta device, which has no autocast
    if precision == "fp32":
        return torch.autocast(device_type=device.type, enabled=False)
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
