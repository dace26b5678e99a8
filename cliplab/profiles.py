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
    device: str  # "cuda" or "cpu"

    @property
    def eps_values(self) -> list[float]:
        """``eps_grid`` in [0, 1] pixel units."""
        return [e / 255 for e in self.eps_grid]


PROFILES = {
    "shapes": Profile(name="shapes", n_eval=500, batch_size=250, attack_steps=10,
                      eps_grid=(0.5, 1, 2, 3, 4, 6, 8, 12, 16), target_class="blue star", device="cpu"),
    "cifar100": Profile(name="cifar100", n_eval=1000, batch_size=250, attack_steps=20,
                        eps_grid=(0.5, 1, 2, 3, 4, 6, 8, 10), target_class="pickup truck", device="cuda"),
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
