"""What robust fine-tuning trains in the image encoder, the adapter, and how each folds back into plain weights.

- ``full``: every weight of the encoder.
- ``oft``: orthogonal rotations of every linear weight (``training.oft``, Qiu et al. 2023), ``block_size``.
- ``lora``: a low-rank update W + B A of the same linear weights (Hu et al. 2022), ``rank``: A (rank x in) drawn
  as in the LoRA paper, B (out x rank) zero, so the model starts unchanged; the update is scaled by 1 (alpha = rank).
- ``last-k``: the last ``blocks`` transformer blocks, then the final norm and projection; the rest frozen.
- ``bitfit``: the biases and the layer norms' scales only (Ben Zaken et al. 2022).

OFT and LoRA are ``torch.nn.utils.parametrize`` parametrizations of the weight tensors, so they reach the fused
q/k/v in-projection of ``nn.MultiheadAttention`` (``in_proj_weight``), which adapter libraries that replace
``nn.Linear`` modules do not see; ``merge_adapters`` folds both into plain weights (no cost at inference). The
adapted linear weights are the same for both: the attention's in- and out-projections and the MLP's two layers of
every block (``adapted_weights``).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._arguments import check_int
from .config import FinetuneConfig
from .oft import OrthogonalRotation, adapted_weights, apply_oft, check_block_size, oft_parameters


class LowRankUpdate(nn.Module):
    """Parametrization W -> W + B A (LoRA), A: (rank, in), B: (out, rank), B = 0 at the start."""

    def __init__(self, out_features: int, in_features: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        self.down = nn.Parameter(torch.empty(rank, in_features))  # A
        self.up = nn.Parameter(torch.zeros(out_features, rank))  # B
        bound = 1 / math.sqrt(in_features)  # nn.Linear's (and the LoRA paper's) initialisation, seeded
        with torch.no_grad():
            self.down.uniform_(-bound, bound, generator=generator)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + (self.up @ self.down).to(weight.dtype)


def check_rank(module: nn.Module, rank: int) -> list[tuple[nn.Module, str]]:
    """Raise unless ``rank`` is below both sides of every weight LoRA would adapt (a rank that reaches them is full
    fine-tuning with more parameters); return those (submodule, attribute) pairs. Works on the ``meta`` device."""
    check_int(rank, "rank")
    names = {sub: name for name, sub in module.named_modules()}
    chosen = list(adapted_weights(module))
    for sub, attr in chosen:
        if rank >= min(getattr(sub, attr).shape):
            raise ValueError(f"rank must be below both sides of every adapted weight: {rank} is not below "
                             f"{tuple(getattr(sub, attr).shape)} ({names[sub] or 'module'}.{attr})")
    return chosen


def apply_lora(module: nn.Module, *, rank: int, seed: int = 0) -> list[str]:
    """Adapt every linear weight of ``module`` (as ``apply_oft`` does) in place with LoRA of ``rank``, A drawn from
    ``seed``; freeze everything else. Returns the names of the adapted weights."""
    names = {sub: name for name, sub in module.named_modules()}
    chosen = check_rank(module, rank)
    module.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for sub, attr in chosen:
        weight = getattr(sub, attr)
        update = LowRankUpdate(weight.shape[0], weight.shape[1], rank, generator).to(weight.device)
        parametrize.register_parametrization(sub, attr, update)
    return [f"{names[sub]}.{attr}".lstrip(".") for sub, attr in chosen]


def matching_lora_rank(module: nn.Module, block_size: int) -> int:
    """The LoRA rank whose parameter count is nearest OFT's at ``block_size`` on the same weights of ``module``
    (at least 1): OFT trains (in / b) blocks of b(b-1)/2 angles per weight, LoRA r(in + out)."""
    weights = [getattr(sub, attr).shape for sub, attr in adapted_weights(module)]
    oft = sum(in_features * (block_size - 1) / 2 for _, in_features in weights)
    return max(1, round(oft / sum(out_features + in_features for out_features, in_features in weights)))


def _blocks(visual: nn.Module) -> nn.ModuleList:
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None:
        raise ValueError("adapter='last-k' needs a ViT image encoder (visual.transformer.resblocks)")
    return blocks


def check_adapter(visual: nn.Module, config: FinetuneConfig) -> None:
    """Raise unless ``config``'s adapter fits the image encoder ``visual`` (OFT's block size divides every adapted
    width, LoRA's rank is below every adapted weight's sides, ``blocks`` is at most the depth). Works on the
    ``meta`` device, so a run is checked before any weight loads."""
    if config.adapter == "oft":
        check_block_size(visual, config.block_size)
    elif config.adapter == "lora":
        check_rank(visual, config.rank)
    elif config.adapter == "last-k" and config.blocks > (depth := len(_blocks(visual))):
        raise ValueError(f"blocks must be at most the encoder's depth, {depth} blocks, got {config.blocks}")


def apply_adapter(visual: nn.Module, config: FinetuneConfig) -> list[nn.Parameter]:
    """Freeze the image encoder ``visual`` except what ``config.adapter`` trains, adding OFT's or LoRA's
    parameters where it asks for them; return the trained parameters."""
    check_adapter(visual, config)
    visual.requires_grad_(False)
    if config.adapter == "oft":
        apply_oft(visual, block_size=config.block_size)
        return oft_parameters(visual)
    if config.adapter == "lora":
        apply_lora(visual, rank=config.rank, seed=config.seed)
        return lora_parameters(visual)
    if config.adapter == "last-k":
        trained = [*_blocks(visual)[-config.blocks:].parameters(), *_after_the_blocks(visual)]
    elif config.adapter == "bitfit":
        trained = [p for name, p in visual.named_parameters() if name.endswith("bias") or _is_norm(visual, name)]
    else:
        trained = list(visual.parameters())
    for parameter in trained:
        parameter.requires_grad_(True)
    return trained


def _after_the_blocks(visual: nn.Module) -> list[nn.Parameter]:
    """The final norm and projection, which read the last block's output."""
    ln_post, proj = getattr(visual, "ln_post", None), getattr(visual, "proj", None)
    return [*(ln_post.parameters() if ln_post is not None else ()), *([proj] if isinstance(proj, nn.Parameter) else [])]


def _is_norm(visual: nn.Module, name: str) -> bool:
    owner = visual.get_submodule(name.rpartition(".")[0]) if "." in name else visual
    return isinstance(owner, nn.LayerNorm)


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA factors of ``module``."""
    return [p for m in module.modules() if isinstance(m, LowRankUpdate) for p in m.parameters()]


def trained_parameter_count(config: FinetuneConfig, parameters: list[nn.Parameter]) -> int:
    """The free parameters among ``parameters`` (``apply_adapter``'s): their entries, except for OFT, whose b x b
    generators act only through their skew-symmetric part, b(b-1)/2 angles per block."""
    if config.adapter != "oft":
        return sum(p.numel() for p in parameters)
    b = config.block_size
    return sum(p.numel() // (b * b) * (b * (b - 1) // 2) for p in parameters)


def merge_adapters(module: nn.Module) -> nn.Module:
    """Fold every OFT rotation and LoRA update of ``module`` into its weight (W <- W0 R^T, W <- W0 + B A): plain
    weights, no adapter left, no cost at inference. A model without adapters is returned as it is."""
    for sub in list(module.modules()):
        if parametrize.is_parametrized(sub):
            # torch.nn.utils.parametrize keeps the weight's property on a class made per module, which a
            # deepcopy shares; removing it from that class would break every copy, so work on a private one
            cls = type(sub)
            sub.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))
            for attr in list(sub.parametrizations.keys()):
                if any(isinstance(p, (OrthogonalRotation, LowRankUpdate)) for p in sub.parametrizations[attr]):
                    parametrize.remove_parametrizations(sub, attr, leave_parametrized=True)
    return module
