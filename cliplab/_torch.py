"""The one home of the small torch helpers every layer uses, with no knowledge of CLIP: where a module lives, how
many classes it predicts, a copy of its structure alone, eval mode that restores each submodule, and the bf16
autocast switch."""
from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import platform

import torch
from torch import nn

PRECISIONS = ("auto", "bf16", "fp32")


def device_of(model: nn.Module, default: torch.device) -> torch.device:
    """The device of ``model``'s first parameter (else buffer); ``default`` for a module with neither."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else default


def computing_device(model: nn.Module, default: torch.device) -> torch.device:
    """``device_of``, refusing the meta device: a model there holds no weights and computes nothing."""
    device = device_of(model, default)
    if device.type == "meta":
        raise ValueError("model is on the meta device, which holds no weights and computes no predictions: load it "
                         "on a real device (cpu, cuda)")
    return device


def meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are on the ``meta`` device: its structure, shapes and
    ``requires_grad`` flags without copying a byte of its weights (a ViT-B/32 CLIP in milliseconds, where
    ``copy.deepcopy`` takes half a second and 600 MB), for what only needs the structure, such as counting what an
    adapter would train."""
    memo = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        meta = tensor.to("meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def logits_of(output, n: int) -> torch.Tensor:
    """``output``, a model's answer to ``n`` images, if it is the (n, classes) logits every kernel here expects; a
    clear error otherwise (a CLIP model's tuple of embeddings, one score per image, a batch of the wrong length)."""
    if not isinstance(output, torch.Tensor) or output.dim() != 2 or len(output) != n:
        got = f"shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else f"a {type(output).__name__}"
        raise ValueError(f"model must map N images to (N, classes) logits; on {n} image{'s' * (n != 1)} it returned "
                         f"{got}")
    return output


def num_classes(model: nn.Module, x: torch.Tensor) -> int:
    """The number of classes ``model`` predicts: its ``num_classes`` attribute, else the width of its logits on one
    image of ``x`` (so any ``nn.Module`` that maps images to logits works, a torchvision model or a plain wrapper)."""
    known = getattr(model, "num_classes", None)  # a wrapper's property raises AttributeError when its model has none
    if known is not None:
        return known
    with torch.no_grad():
        return logits_of(model(x[:1].to(computing_device(model, x.device))), 1).shape[1]


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run ``model`` in eval mode (no dropout, frozen norms), then restore every submodule's own mode.

    Restoring only the top-level flag would be wrong for wrappers: a fresh ``Denoised(classifier, ...)`` is
    in training mode, and ``wrapper.train(True)`` would switch the wrapped eval-mode classifier to training.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def check_device(model: nn.Module, x: torch.Tensor, name: str = "x") -> None:
    """``x`` must be on ``model``'s device: a clear error at the boundary, not a device mismatch deep inside."""
    device = device_of(model, x.device)
    if x.device != device:
        computing_device(model, x.device)  # a model on meta: say so, since moving x there would not help
        raise ValueError(f"{name} is on {x.device} but the model is on {device}: move it with "
                         f"{name}.to({str(device)!r}) (or the model with .to({name}.device))")


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU is an x86 one that computes in bfloat16 (AVX512-BF16 or AMX). torch reports only these x86
    features (privately named; a torch without the checks reports False), so any other CPU reports False."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported",
                                                                       "_is_amx_tile_supported"))


def cpu_emulates_bf16() -> bool:
    """Whether torch emulates bfloat16 on this CPU, more slowly than fp32: an x86 CPU without AVX512-BF16 or AMX.
    Other architectures are not judged (an ARM CPU may have bf16 arithmetic that torch does not report)."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686") and not cpu_has_bf16()


@functools.cache
def _cuda_has_bf16(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)  # Ampere on; earlier GPUs emulate it


def computes_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes in bfloat16 natively: a CUDA GPU from Ampere on, an x86 CPU with AVX512-BF16 or
    AMX (``cpu_has_bf16``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and _cuda_has_bf16(device.index or 0)
    return device.type == "cpu" and cpu_has_bf16()


def resolve_precision(device: torch.device | str, precision: str) -> str:
    """``"bf16"`` or ``"fp32"``: what ``precision`` means on ``device``. ``"auto"`` is bf16 autocast wherever the
    device computes bf16 natively (``computes_bf16``), fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if computes_bf16(device) else "fp32"
    return precision


def precision_line(device: torch.device | str, precision: str) -> str:
    """One line that says which precision runs on ``device`` and why (what every command prints)."""
    resolved = resolve_precision(device, precision)
    arithmetic = "bf16 autocast" if resolved == "bf16" else "fp32"
    if precision != "auto":
        return f"precision: {arithmetic}, as asked (--precision {precision})"
    kind = torch.device(device).type
    what = "this GPU" if kind == "cuda" else "this CPU" if kind == "cpu" else f"the {kind} device"
    native = "computes bf16 natively" if resolved == "bf16" else "has no native bf16 arithmetic"
    return f"precision: {arithmetic} (auto: {what} {native}; --precision fp32 for the committed arithmetic)"


def autocast(device: torch.device, precision: str | bool):
    """The autocast context of ``precision`` on ``device``.

    - ``"auto"``: bfloat16 autocast where the device computes bf16 natively (``computes_bf16``: CUDA from Ampere
      on, CPUs with AVX512-BF16 or AMX); elsewhere the caller's autocast state is left as it is.
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
    if precision == "bf16" or (precision == "auto" and computes_bf16(device)):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cast_cache(device: torch.device):
    """One autocast weight-cast cache for the whole block.

    Autocast casts each fp32 weight to bf16 when an op uses it, and keeps the copy only until the outermost
    autocast region exits; every forward pass of a classifier opens its own region, so an attack of k steps
    would re-cast every weight k times. Wrapping the attack in this context keeps one outer region open, with
    the caller's autocast state unchanged, so the nested regions share one copy of each weight. (Autocast
    caches the casts of leaf tensors that require grad, i.e. trainable weights; weights must not change inside
    the block.)
    """
    if not torch.amp.is_autocast_available(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.get_autocast_dtype(device.type),
                          enabled=torch.is_autocast_enabled(device.type))
