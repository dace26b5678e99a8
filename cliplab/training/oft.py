"""Orthogonal fine-tuning (OFT, Qiu et al., NeurIPS 2023), including the fused attention in-projection.

A weight W0 (rows are neurons) becomes W' = W0 R^T with R block-diagonal and orthogonal, each block the
exact Cayley transform (I + Q)(I - Q)^{-1} of a skew-symmetric Q. Rotating every neuron by the same R
keeps their norms and pairwise angles, hence the hyperspherical energy of the layer, which is what lets
OFT adapt a model while keeping what it knew. Q = 0 at initialisation, so R = I and the model is unchanged.
``training.adapters.merge_adapters`` folds R into W.

The adaptation is a ``torch.nn.utils.parametrize`` parametrization of the weight tensor, so it reaches
``nn.MultiheadAttention.in_proj_weight`` (the fused q/k/v projection CLIP uses), which adapter libraries
that replace ``nn.Linear`` modules cannot see.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from .._arguments import check_int


class OrthogonalRotation(nn.Module):
    """Parametrization W -> W R^T, R = blockdiag(Cayley(Q_1), ..., Cayley(Q_k)), Q_i = A_i - A_i^T.

    Args:
        features: width of the weight's rows (``in_features`` of a Linear).
        block_size: size of each orthogonal block; must divide ``features``.
    """

    def __init__(self, features: int, block_size: int):
        super().__init__()
        check_int(block_size, "block_size")
        if features % block_size:
            raise ValueError(f"block_size must divide the layer width {features}, got {block_size}")
        self.block_size = block_size
        self.generator = nn.Parameter(torch.zeros(features // block_size, block_size, block_size))  # A_i

    def rotation_blocks(self) -> torch.Tensor:
        """The orthogonal blocks R_i. (k, b, b)."""
        skew = self.generator - self.generator.transpose(1, 2)
        eye = torch.eye(self.block_size, dtype=skew.dtype, device=skew.device).expand_as(skew)
        # Cayley transform, exactly: R = (I + Q)(I - Q)^{-1}, solved rather than inverted or series-expanded
        return torch.linalg.solve(eye - skew, eye + skew, left=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        blocks = self.rotation_blocks().to(weight.dtype)  # (k, b, b)
        rows = weight.view(weight.shape[0], -1, self.block_size)  # (out, k, b)
        return torch.einsum("okb,kcb->okc", rows, blocks).reshape(weight.shape)  # W R^T, block by block


def adapted_weights(module: nn.Module) -> Iterable[tuple[nn.Module, str]]:
    """The (submodule, attribute) pairs OFT and LoRA adapt: every ``nn.Linear`` weight and the fused q/k/v
    in-projection of every ``nn.MultiheadAttention``."""
    for sub in module.modules():
        if isinstance(sub, nn.MultiheadAttention) and sub.in_proj_weight is not None:
            yield sub, "in_proj_weight"
        elif isinstance(sub, nn.Linear):
            yield sub, "weight"


def check_block_size(module: nn.Module, block_size: int,
                     targets: Callable[[str, nn.Module], bool] | None = None) -> list[tuple[nn.Module, str]]:
    """Raise unless ``block_size`` divides the width of every weight ``apply_oft`` would adapt; return those
    (submodule, attribute) pairs. Works on a model on the ``meta`` device, so a run can be checked before loading."""
    check_int(block_size, "block_size")
    names = {sub: name for name, sub in module.named_modules()}
    chosen = [(sub, attr) for sub, attr in adapted_weights(module) if targets is None or targets(names[sub], sub)]
    for sub, attr in chosen:
        width = getattr(sub, attr).shape[1]
        if width % block_size:
            raise ValueError(f"block_size must divide the width of every adapted weight: {block_size} does "
                             f"not divide {width} ({names[sub] or 'module'}.{attr})")
    return chosen


def apply_oft(module: nn.Module, *, block_size: int,
              targets: Callable[[str, nn.Module], bool] | None = None) -> list[str]:
    """Adapt every linear weight of ``module`` in place with OFT; freeze everything else in it.

    Args:
        module: e.g. ``classifier.model.visual``.
        block_size: size of the orthogonal blocks (smaller: fewer parameters, a more constrained R).
        targets: ``targets(name, submodule)`` selects which submodules to adapt (default: every
            ``nn.Linear`` and the fused in-projection of every ``nn.MultiheadAttention``).

    Returns:
        Names of the adapted weights. Only their OFT generators require gradients afterwards.

    Raises:
        ValueError: ``block_size`` does not divide the width of an adapted weight.
    """
    names = {sub: name for name, sub in module.named_modules()}
    chosen = check_block_size(module, block_size, targets)  # every width, before changing anything
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    for sub, attr in chosen:
        weight = getattr(sub, attr)
        rotation = OrthogonalRotation(weight.shape[1], block_size).to(weight.device)
        parametrize.register_parametrization(sub, attr, rotation)
    return [f"{names[sub]}.{attr}".lstrip(".") for sub, attr in chosen]


def oft_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable OFT generators of ``module``."""
    return [p for m in module.modules() if isinstance(m, OrthogonalRotation) for p in m.parameters()]
