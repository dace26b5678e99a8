"""Modules for open_clip's vision transformer that compute what its own compute, in a layout made for attacks and
fine-tuning: the patch embedding as one matrix product (``PatchEmbedding``), self-attention from one QKV product
viewed into heads (``SelfAttention``), and the last block for the class token alone (``ClassTokenBlock``). Each is
adopted in place by ``ZeroShotClassifier`` (the same parameters and state-dict keys)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


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


class ClassTokenBlock:
    """The last block of a ViT whose output is its class token alone (open_clip's ``pool_type='tok'``, no attentional
    pooler, no token outputs), computed for that token only: the other tokens' attention outputs, MLPs and residuals
    feed nothing, and their keys and values are all it needs of them. For the shapes model that is 16 of 17 rows of
    the block's queries, output projection and MLP, a fifth of an attack pass's matrix products; for ViT-B/32, 49 of
    50 rows of one of 12 blocks. The block then returns (N, 1, D) tokens, which ``ln_post`` and the pooling take as
    they took (N, L, D).

    ``ClassTokenBlock.adopt(block)`` turns open_clip's ``ResidualAttentionBlock`` into one in place (the same
    parameters and state-dict keys): its class becomes one derived from both."""

    @staticmethod
    def applies_to(visual: nn.Module) -> bool:
        transformer = getattr(visual, "transformer", None)
        blocks = getattr(transformer, "resblocks", None)
        return (getattr(visual, "pool_type", None) == "tok" and getattr(visual, "attn_pool", None) is None
                and not getattr(visual, "output_tokens", False) and getattr(transformer, "batch_first", False)
                and bool(blocks) and type(blocks[-1]).__name__ == "ResidualAttentionBlock"
                and not hasattr(blocks[-1], "ln_1_kv") and isinstance(blocks[-1].attn, SelfAttention))

    @staticmethod
    def adopt(block: nn.Module) -> nn.Module:
        block.__class__ = _class_token_class(type(block))
        return block

    def forward(self, q_x: torch.Tensor, k_x: torch.Tensor | None = None, v_x: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if k_x is not None or v_x is not None or attn_mask is not None:
            return super().forward(q_x, k_x, v_x, attn_mask)
        x = q_x[:, :1] + self.ls_1(self.attn.attend(self.ln_1(q_x), queries=slice(0, 1)))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


@functools.cache
def _class_token_class(block_class: type) -> type:
    """``ClassTokenBlock`` over ``block_class`` (one class per base, as torch's parametrizations make theirs)."""
    return type(f"ClassToken{block_class.__name__}", (ClassTokenBlock, block_class), {})
