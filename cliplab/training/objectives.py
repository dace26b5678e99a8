"""The objectives of robust fine-tuning, the text head frozen.

- FARE (Schlarmann et al., ICML 2024), unsupervised: the inner attack maximises ||f(x + delta) - f0(x)||^2,
  f0 the frozen original encoder; the outer step minimises it (plus, optionally, the clean term
  ||f(x) - f0(x)||^2). No labels needed, and the embedding stays compatible with the text encoder.
- TeCoA (Mao et al., ICLR 2023), supervised baseline: cross-entropy of the adversarial zero-shot logits.

``adversarial_loss`` computes either; ``TrainingObjective`` wraps it as a module for DistributedDataParallel.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from .. import _distributed, _torch
from ..attacks.pgd import pgd, pgd_maximize
from ..classifier import ZeroShotClassifier
from .config import FinetuneConfig


class TrainingObjective(torch.nn.Module):
    """One step's loss on a batch, inner attack included: a module, so that ``DistributedDataParallel`` can wrap it
    (its forward is where DDP prepares the gradient all-reduce of the backward that follows).

    ``forward(x, y, start)`` returns the loss and the batch's clean and adversarial zero-shot accuracy (0-d
    tensors); ``start`` is the inner attack's random start."""

    def __init__(self, classifier: ZeroShotClassifier, original: torch.nn.Module, config: FinetuneConfig):
        super().__init__()
        self.classifier, self.original, self.config = classifier, original, config

    def forward(self, x, y, start):
        return adversarial_loss(self.classifier, self.original, x, y, self.config, start)


def training_objective(classifier: ZeroShotClassifier, original: torch.nn.Module,
                       config: FinetuneConfig) -> torch.nn.Module:
    """The ``TrainingObjective`` of ``classifier`` (``prepare``-d), wrapped in ``DistributedDataParallel`` in a
    process group (torchrun, a group of one included): only the trained parameters take part, and their gradients
    are averaged over the processes during the backward pass."""
    objective = TrainingObjective(classifier, original, config)
    if not _distributed.active():
        return objective
    device = _torch.device_of(classifier, torch.device("cpu"))
    return torch.nn.parallel.DistributedDataParallel(objective, device_ids=[device] if device.type == "cuda" else None)


def objective_config(objective: torch.nn.Module) -> FinetuneConfig:
    return getattr(objective, "module", objective).config  # DDP keeps the wrapped module as .module


def fare_distance(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """FARE's distance, ||f(x) - f0(x)||^2 per image: what its inner attack maximises and its step minimises.
    (B, D), (B, D) -> (B,)."""
    return (features - target).pow(2).sum(1)


def adversarial_loss(classifier, original, x, y, config, start):
    """One training step's loss; also the batch's clean and adversarial zero-shot accuracy (0-d tensors)."""
    alpha = 2.5 * config.eps / config.attack_steps
    with torch.no_grad(), classifier.autocast(x.device):  # f0 in the classifier's precision
        target = original(classifier.preprocess(x)).float()  # f0(x), (B, D)
    with _torch.eval_mode(classifier), parametrize.cached():  # OFT: each rotation is built once for the whole attack
        if config.method == "fare":
            x_adv = pgd_maximize(lambda images: fare_distance(classifier.image_features(images), target), x,
                                 eps=config.eps, alpha=alpha, steps=config.attack_steps, start=start)
        else:
            x_adv = pgd(classifier, x, y, eps=config.eps, alpha=alpha, steps=config.attack_steps, start=start).x_adv
    features_clean = None  # f(x): part of the loss with FARE's clean term, else only for the statistics
    # image_features runs in the classifier's precision (bf16 autocast on CUDA); the losses stay fp32
    features_adv = classifier.image_features(x_adv)
    logits_adv = classifier.logits_from_features(features_adv)
    if config.method == "fare":
        loss = fare_distance(features_adv, target).mean()
        if config.clean_weight:
            features_clean = classifier.image_features(x)
            loss = loss + config.clean_weight * fare_distance(features_clean, target).mean()
    else:
        loss = F.cross_entropy(logits_adv, y)
    with torch.no_grad():
        if features_clean is None:
            features_clean = classifier.image_features(x)
        clean_hit = (classifier.logits_from_features(features_clean).argmax(1) == y).float().mean()
    robust_hit = (logits_adv.argmax(1) == y).float().mean()
    return loss, clean_hit, robust_hit
