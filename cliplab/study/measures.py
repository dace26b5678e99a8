"""What the notebooks measure beyond accuracy: the seeded target classes of the targeted attacks
(``random_targets``), 03's certified-accuracy curve (``certified_accuracy``), and 06's claim that OFT keeps the
angles between neurons (``neuron_geometry``, ``geometry_change``) and how many parameters each adapter trains
(``trainable_parameters``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .._torch import meta_copy
from ..classifier import ZeroShotClassifier
from ..evaluation.statistics import Proportion
from ..training.config import FinetuneConfig
from ..training.adapters import apply_adapter, trained_parameter_count


def random_targets(y: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """A target class for each label, uniform over the other classes, drawn from a generator seeded ``seed`` on
    ``y``'s device (so a run is reproducible and independent of the global RNG). (N,) -> (N,)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2 for a target other than the label, got {num_classes}")
    if len(y) and not 0 <= int(y.min()) <= int(y.max()) < num_classes:
        raise ValueError(f"y must hold labels in [0, num_classes) = [0, {num_classes}), got labels from "
                         f"{int(y.min())} to {int(y.max())}")
    generator = torch.Generator(y.device).manual_seed(seed)
    return (y + torch.randint(1, num_classes, y.shape, device=y.device, generator=generator)) % num_classes


# ------------------------------------------------------------------------------------------ fine-tuning


# the weight matrices OFT rotates in an open_clip ViT: attention in/out projections and the MLP's two layers
ADAPTED_WEIGHTS = ("in_proj_weight", "out_proj.weight", "c_fc.weight", "c_proj.weight")


def neuron_geometry(classifier: ZeroShotClassifier) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per adapted weight of the image encoder (``ADAPTED_WEIGHTS``): the norm of each neuron (row) and the angle
    in degrees between every pair of neurons, in float64 on the weight's device. OFT rotates every neuron by the
    same orthogonal matrix, so it keeps both; full fine-tuning changes them."""
    geometry = {}
    for name, weight in classifier.model.visual.state_dict().items():
        if name.endswith(ADAPTED_WEIGHTS):
            weight = weight.double()  # (out, in): one neuron per row
            cosines = _pair_cosines(F.normalize(weight, dim=1))
            geometry[name] = weight.norm(dim=1), torch.rad2deg(torch.arccos(cosines.clamp(-1, 1)))
    if not geometry:
        raise ValueError(f"no weight named *{', *'.join(ADAPTED_WEIGHTS)} in the image encoder: an open_clip ViT is "
                         f"needed, with OFT rotations merged (cliplab.merge_adapters) if it has any")
    return geometry


def _pair_cosines(directions: torch.Tensor, block: int = 256) -> torch.Tensor:
    """The cosine between every pair of rows of ``directions`` once, row by row (``triu_indices``' order), from
    blocks of ``block`` rows, each against itself and the rows after it: about half the products of the whole Gram
    matrix (float64 products are most of the cost: 12 ViT-B/32 blocks per model)."""
    parts = []
    for start in range(0, len(directions), block):
        gram = directions[start:start + block] @ directions[start:].T  # (block, rows from start on)
        parts.append(gram[torch.ones_like(gram, dtype=torch.bool).triu(1)])  # a row's pairs with the rows after it
    return torch.cat(parts)


def geometry_change(reference: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                    geometry: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """How far ``geometry`` is from ``reference`` (both from ``neuron_geometry``), over all adapted weights: the
    relative change of every neuron's norm (a fraction) and the absolute change of every angle (degrees)."""
    if reference.keys() != geometry.keys():
        raise ValueError("geometry and reference must come from the same architecture (different adapted weights)")
    norm_change = torch.cat([(geometry[k][0] / reference[k][0] - 1).abs() for k in reference])
    angle_change = torch.cat([(geometry[k][1] - reference[k][1]).abs() for k in reference])
    return norm_change, angle_change


def certified_accuracy(classes: torch.Tensor, radii: torch.Tensor, y: torch.Tensor,
                       at: Sequence[float]) -> list[Proportion]:
    """Certified accuracy at each L2 radius of ``at``: the images certified as their label with a radius at least
    that large (``RandomizedSmoothing.certify``'s classes and radii; an abstention, -1, is never right)."""
    if not classes.shape == radii.shape == y.shape or classes.dim() != 1:
        raise ValueError(f"classes, radii and y must be (N,) tensors of one length (one entry per image), got shapes "
                         f"{tuple(classes.shape)}, {tuple(radii.shape)} and {tuple(y.shape)}")
    right = classes.cpu() == y.cpu()
    radii = radii.cpu()
    return [Proportion.of(right & (radii >= r)) for r in at]


def trainable_parameters(classifier: ZeroShotClassifier, config: FinetuneConfig) -> int:
    """The free parameters ``config``'s adapter trains in ``classifier``'s image encoder (counted on a copy of its
    structure on the meta device, ``adapters.trained_parameter_count``): every entry it trains, but for OFT the
    b(b-1)/2 angles of each b x b skew-symmetric block (its generator stores b x b entries, of which only the skew
    part acts)."""
    return trained_parameter_count(config, apply_adapter(meta_copy(classifier.model.visual), config))
