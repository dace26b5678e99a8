"""The one home of the small torch helpers every layer uses, with no knowledge of CLIP: where a module lives, how
many classes it predicts, eval mode that restores each submodule, and the bf16 autocast switch."""
from __future__ import annotations

import contextlib
import functools
import platform

import torch
import torch.nn.functional as F
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
    """A batch-first ``nn.MultiheadAttention`` (open_clip's ViT blocks) that computes self-attention without a mask in
    a layout made for attacks and fine-tuning, the same module on every device and in every precision:

    - one GEMM for the queries, keys and values of every token (batch-first, contiguous), viewed into heads: no
      transposed copies in, no zero-filled gradient chunks for q, k and v out (``nn.MultiheadAttention`` transposes
      a batch-first input to sequence-first and back, and its in-projection of a strided input ran as a batched
      matmul over the weight broadcast to every token, which bf16's kernel copies out: 4.3 s against 0.9 s for
      ViT-B/32's pass of 8 images);
    - on the CPU, two batched products and a softmax, where flash attention cost more than it saved on CLIP's short
      sequences (17 tokens for the shapes model, 50 for ViT-B/32; its bf16 backward took 217 ms of a 357 ms pass);
      elsewhere ``F.scaled_dot_product_attention``, whose fused kernels pay on a GPU;
    - ``attend(x, queries=...)`` computes the attention of some tokens only, for ``ClassTokenBlock``.

    The arithmetic is the same attention, in another order: fp32 results agree with ``nn.MultiheadAttention``'s to
    about 1e-7 (``benchmarks/bench_pass.py``). A mask, the attention weights asked for (``need_weights``), dropout
    in training, or cross-attention take ``nn.MultiheadAttention``'s own path. ``SelfAttention.adopt(attention)``
    turns one in place: the same parameters and state-dict keys. (``applies_to`` takes only a plain
    ``nn.MultiheadAttention``; ``ZeroShotClassifier`` adopts before any OFT is applied, so that OFT's
    parametrized class derives from this one.)"""

    @classmethod
    def adopt(cls, attention: nn.MultiheadAttention) -> "SelfAttention":
        attention.__class__ = cls  # in place: OFT's parametrizations and every reference to the module stay valid
        return attention

    @staticmethod
    def applies_to(module: nn.Module) -> bool:
        return (type(module) is nn.MultiheadAttention and module.batch_first and module._qkv_same_embed_dim
                and module.in_proj_bias is not None and module.bias_k is None and not module.add_zero_attn)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        plain = (query is key is value and query.dim() == 3 and key_padding_mask is None and attn_mask is None
                 and not need_weights and not is_causal and not (self.training and self.dropout > 0))
        if not plain:
            return super().forward(query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                                   is_causal)
        return self.attend(query), None

    def attend(self, x: torch.Tensor, queries: slice | None = None) -> torch.Tensor:
        """Self-attention of the (N, L, D) tokens ``x``, for the tokens ``x[:, queries]`` (default: all), each
        attending to every token. Returns (N, L_queries, D)."""
        width, heads = self.embed_dim, self.num_heads
        if queries is None:  # (N, L, 3, H, d) viewed as q, k, v of (N, H, L, d) each
            q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).unflatten(-1, (3, heads, -1)) \
                .permute(2, 0, 3, 1, 4).unbind(0)
        else:
            (w_q, w_kv), (b_q, b_kv) = (t.split([width, 2 * width]) for t in (self.in_proj_weight, self.in_proj_bias))
            q = F.linear(x[:, queries], w_q, b_q).unflatten(-1, (heads, -1)).transpose(1, 2)
            k, v = F.linear(x, w_kv, b_kv).unflatten(-1, (2, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
        if x.device.type == "cpu":
            out = ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)).softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return F.linear(out.transpose(1, 2).flatten(2), self.out_proj.weight, self.out_proj.bias)
