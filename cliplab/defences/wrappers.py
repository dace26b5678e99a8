"""Defences as modules that wrap a classifier, so that attacking them is adaptive.

- ``Denoised(classifier, denoiser)``: x -> classifier(denoiser(x)).
- ``GaussianNoise(sigma)``: a random input transformation (x + N(0, sigma^2)).
- ``Wrapper``: what every defence around a classifier shares (``Denoised``, ``RandomizedSmoothing``).
"""
from __future__ import annotations

import torch
from torch import nn

from .._arguments import check_positive


class Wrapper(nn.Module):
    """A defence around ``self.classifier``: it predicts the classifier's classes."""

    classifier: nn.Module

    @property
    def num_classes(self) -> int:
        return self.classifier.num_classes


class Denoised(Wrapper):
    """A defence that transforms the input before classifying it: ``classifier(denoiser(x))``.

    Any module (a denoiser, ``GaussianNoise``, a random filter) fits; gradients flow through it, so
    ``pgd(Denoised(...))`` attacks the whole pipeline.
    """

    def __init__(self, classifier: nn.Module, denoiser: nn.Module):
        super().__init__()
        self.classifier, self.denoiser = classifier, denoiser

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.denoiser(x))


class GaussianNoise(nn.Module):
    """Adds N(0, sigma^2) noise to every pixel, without clipping (as randomized smoothing requires)."""

    def __init__(self, sigma: float):
        super().__init__()
        check_positive(sigma, "sigma")
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sigma * torch.randn_like(x)
