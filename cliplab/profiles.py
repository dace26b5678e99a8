"""The two profiles: one code path, different model, data and budgets.

Notebooks call ``get_profile()``, which reads ``CLIPLAB_PROFILE`` (set by ``cliplab reproduce``), so the
same notebook runs the offline toy study or the real one.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace

import torch

from ._checks import check_choice


@dataclass(frozen=True)
class Profile:
    name: str  # profile name; also the model (load_classifier) and data set (load_dataset) it uses
    n_eval: int  # test images behind every reported accuracy or success rate
    batch_size: int  # images per attack batch
    attack_steps: int  # PGD steps for the sweeps
    eps_grid: tuple[float, ...]  # L-inf radii of the sweeps, in units of 1/255
    target_class: str  # the class the targeted attack of notebook 01 aims for
    n_defence: int  # test images behind the defence sweeps (02-04), where EOT multiplies the cost
    eot_samples: int  # EOT draws of every reported adaptive attack on a randomised defence (>= 20)
    eot_grid: tuple[int, ...]  # EOT draws compared in 02
    votes: int  # stochastic passes whose majority vote scores a randomised defence, as deployed
    smoothing_sigmas: tuple[float, ...]  # randomized-smoothing noise levels (pixel units)
    certify_n0: int  # Monte-Carlo draws that select the class to certify (Cohen et al.: 100)
    certify_n: int  # Monte-Carlo draws that bound its probability (Cohen et al.: 100,000)
    n_certify: int  # test images certified per sigma
    finetune_images: int  # training images robust fine-tuning draws its batches from
    finetune_steps: int  # optimiser steps of robust fine-tuning
    finetune_lr: float  # peak AdamW learning rate of full fine-tuning
    oft_lr: float  # peak learning rate of orthogonal fine-tuning (its rotations start at the identity)
    oft_clean_weight: float  # weight of FARE's clean term in OFT runs (keeps clean embeddings in place)
    oft_block_sizes: tuple[int, ...]  # OFT block sizes compared in 06 (the first is the default)
    device: str  # "cuda" or "cpu"

    @property
    def eps_values(self) -> list[float]:
        """``eps_grid`` in [0, 1] pixel units."""
        return [e / 255 for e in self.eps_grid]


PROFILES = {
    "shapes": Profile(name="shapes", n_eval=500, batch_size=250, attack_steps=10,
                      eps_grid=(0.5, 1, 2, 3, 4, 6, 8, 12, 16), target_class="blue star",
                      n_defence=100, eot_samples=20, eot_grid=(1, 5, 20), votes=15,
                      smoothing_sigmas=(0.03, 0.06, 0.12, 0.25), certify_n0=64, certify_n=500, n_certify=100,
                      finetune_images=10_000, finetune_steps=1000, finetune_lr=5e-4,
                      oft_lr=2e-3, oft_clean_weight=1.0, oft_block_sizes=(128, 16),
                      device="cpu"),
    "cifar100": Profile(name="cifar100", n_eval=1000, batch_size=250, attack_steps=20,
                        eps_grid=(0.5, 1, 2, 3, 4, 6, 8, 10), target_class="pickup truck",
                        n_defence=1000, eot_samples=20, eot_grid=(1, 2, 5, 10, 20, 40), votes=32,
                        smoothing_sigmas=(0.12, 0.25, 0.5), certify_n0=100, certify_n=10_000, n_certify=500,
                        finetune_images=50_000, finetune_steps=2000, finetune_lr=1e-5,
                        oft_lr=1e-4, oft_clean_weight=1.0, oft_block_sizes=(128, 32),
                        device="cuda"),
}


def get_profile(name: str | None = None, device: str | None = None) -> Profile:
    """The profile ``name``, else ``$CLIPLAB_PROFILE``, else ``shapes``.

    The device is ``device``, else ``$CLIPLAB_DEVICE``, else the profile's when available, else CPU.
    """
    name = name or os.environ.get("CLIPLAB_PROFILE") or "shapes"
    check_choice(name, "profile", PROFILES)
    device = device or os.environ.get("CLIPLAB_DEVICE") or PROFILES[name].device
    check_choice(device, "device", ("cpu", "cuda"))
    if device == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"profile {name!r} wants a CUDA GPU and none is available: running on the CPU, slowly")
        device = "cpu"
    return replace(PROFILES[name], device=device)
