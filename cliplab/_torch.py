"""The one home of the small torch helpers every layer uses, with no knowledge of CLIP: where a module lives, how
many classes it predicts, eval mode that restores each submodule, and the bf16 autocast switch."""
from __future__ import annotations

import contextlib
import functools
import platform

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

PRECISIONS = ("auto", "bf16", "fp32")


def device_of(model: nn.Module, default: torch.device) -> torch.device:
    """The device of ``model``'s first parameter (else buffer); ``default`` for a module with neither."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else default


def num_classes(model: nn.Module, x: torch.Tensor) -> int:
    """The number of classes ``model`` predicts: its ``num_classes`` attribute, else the width of its logits on one
    image of ``x`` (so any ``nn.Module`` that maps images to logits works, a torchvision model or a plain wrapper)."""
    known = getattr(model, "num_classes", None)  # a wrapper's property raises AttributeError when its model has none
    if known is not None:
        return known
    with torch.no_grad():
        return model(x[:1].to(device_of(model, x.device))).shape[1]


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


class PatchEmbedding(nn.Conv2d):
    """A convolution whose stride equals its kernel, without padding (a ViT's patch embedding), run as one matmul
    over the non-overlapping patches: the same linear map, but a plain GEMM, forward and backward, where cuDNN's
    kernels for this shape ran at 3% of the GPU's bf16 peak (8.4 ms a call for 1,024 ViT-B/32 images on an H200,
    17% of a PGD step) and the CPU's convolution backward was slow too.

    ``PatchEmbedding.replacing(conv)`` builds one sharing ``conv``'s parameters (same state-dict keys)."""

    @classmethod
    def replacing(cls, conv: nn.Conv2d) -> "PatchEmbedding":
        embedding = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, bias=False,
                        device="meta")
        embedding.weight, embedding.bias = conv.weight, conv.bias
        return embedding.train(conv.training)

    @staticmethod
    def applies_to(module: nn.Module) -> bool:
        return (type(module) is nn.Conv2d and module.stride == module.kernel_size and module.groups == 1
                and module.padding == (0, 0) and module.dilation == (1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, channels, height, width = x.shape
        (kh, kw), (gh, gw) = self.kernel_size, (height // self.kernel_size[0], width // self.kernel_size[1])
        x = x[..., :gh * kh, :gw * kw]  # a strided convolution ignores the remainder
        patches = x.reshape(n, channels, gh, kh, gw, kw).permute(0, 2, 4, 1, 3, 5).reshape(n, gh * gw, -1)
        out = F.linear(patches, self.weight.reshape(self.out_channels, -1), self.bias)  # (N, gh*gw, C_out)
        return out.transpose(1, 2).unflatten(2, (gh, gw))  # (N, C_out, gh, gw), a view: no copy


class SelfAttention(nn.MultiheadAttention):
    """A batch-first ``nn.MultiheadAttention`` (open_clip's ViT blocks) with the same arithmetic, except under bfloat16
    autocast on the CPU, where it steps around two of PyTorch's CPU kernels that are slow for CLIP's shapes (2-core
    AMD EPYC with AVX512-BF16, torch 2.15, one thread; ``benchmarks/bench_precision.py``):

    - batch-first, ``nn.MultiheadAttention`` hands its input projection a transposed view, and ``F.linear`` on a
      strided 3-D input that needs a gradient becomes a batched matmul over the weight broadcast to every token,
      which the bf16 kernel copies out: ViT-B/32's forward + input-backward of 8 images took 4.3 s in bf16 against
      1.9 s in fp32. Sequence-first and contiguous, the projection is one GEMM (0.9 s).
    - the flash-attention backward in bf16: 217 ms of a 357 ms forward + backward of 250 shapes images. The math
      backend (GEMMs and a softmax) takes about 20 ms.

    It takes this path for passes without a gradient too: a version that left those to ``nn.MultiheadAttention``'s
    fused inference kernel and wrote the attention out (``need_weights=True``) instead of ``sdpa_kernel`` made the
    cifar100 smoke run in bf16 45% slower (643 s against 445 s, ``benchmarks/RESULTS.md``). Everything else (fp32,
    fp16, CUDA, cross-attention) is ``nn.MultiheadAttention``'s own path, bit for bit.
    ``SelfAttention.adopt(attention)`` turns one in place: the same parameters and state-dict keys. (``applies_to``
    takes only a plain ``nn.MultiheadAttention``: one that OFT already parametrizes keeps its own class, and its slow
    path; ``ZeroShotClassifier`` adopts before any OFT is applied.)"""

    @classmethod
    def adopt(cls, attention: nn.MultiheadAttention) -> "SelfAttention":
        attention.__class__ = cls  # in place: OFT's parametrizations and every reference to the module stay valid
        return attention

    @staticmethod
    def applies_to(module: nn.Module) -> bool:
        return type(module) is nn.MultiheadAttention and module.batch_first and module._qkv_same_embed_dim

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not self._bf16_on_the_cpu(query, key, value):
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                                   is_causal)
        x = query.transpose(0, 1).contiguous()  # (L, N, D): the in-projection becomes one GEMM
        # sdpa_kernel sets process-wide switches for the block: a thread computing attention meanwhile would use the
        # math backend too (cliplab's passes run in one thread)
        with sdpa_kernel(SDPBackend.MATH):
            out, weights = F.multi_head_attention_forward(
                x, x, x, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias, self.bias_k,
                self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias,
                training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
                attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        return out.transpose(0, 1), weights

    @staticmethod
    def _bf16_on_the_cpu(query, key, value) -> bool:
        """Self-attention on a batch in bf16 autocast on the CPU."""
        return (query is key is value and query.dim() == 3 and query.device.type == "cpu"
                and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
