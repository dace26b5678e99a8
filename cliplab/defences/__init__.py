"""Inference-time defences as modules that wrap a classifier, so that attacking them is adaptive: edge-preserving
denoisers (``denoise``), ``Denoised`` and ``GaussianNoise`` (``wrappers``), and randomized smoothing
(``smoothing``)."""
from .denoise import Bilateral, Guided, Median, RandomBilateral, bilateral, bilateral_sweep, guided, median
from .smoothing import ABSTAIN, RandomizedSmoothing
from .wrappers import Denoised, GaussianNoise

__all__ = ["ABSTAIN", "Bilateral", "Denoised", "GaussianNoise", "Guided", "Median", "RandomBilateral",
           "RandomizedSmoothing", "bilateral", "bilateral_sweep", "guided", "median"]
