"""The primitives every attack shares: the result type, the objectives (cross-entropy, margin, DLR), the
threat-model checks, the projection onto the eps-ball, random starts, EOT logits and gradients, and the strongest
iterate kept per sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import _torch
from .._arguments import check_choice, check_images, check_int, check_labels, check_nonempty, check_positive, check_seed

NORMS = ("linf", "l2")
LOSSES = ("ce", "margin", "dlr")


@dataclass
class AttackResult:
    """What an attack returns.

    Attributes:
        x_adv: (N, 3, H, W) adversarial images in [0, 1], the strongest found per sample.
        success: (N,) bool, the attack's goal reached (targeted: predicted == target; untargeted:
            predicted != label).
        loss_history: (restarts, steps + 1, N) objective the attack ascends, at every iterate
            (ce: cross-entropy to the label, or minus cross-entropy to the target when targeted).
        logits: (N, C) logits of ``x_adv`` (mean over EOT draws).
    """

    x_adv: torch.Tensor
    success: torch.Tensor
    loss_history: torch.Tensor
    logits: torch.Tensor


def attack_objective(logits: torch.Tensor, y: torch.Tensor, loss: str, targeted: bool) -> torch.Tensor:
    """Per-sample objective that PGD ascends. (N, C), (N,) -> (N,).

    - ``ce``: cross-entropy to ``y`` (minus it when targeted). CLIP's logit scale of 100 saturates it
      on confident samples, which is why the margin losses exist.
    - ``margin``: Carlini & Wagner (2017) logit margin, best other class minus ``y`` (``y`` minus best
      other when targeted). Positive exactly when the attack has succeeded.
    - ``dlr``: Croce & Hein (2020) difference of logits ratio, the margin divided by the spread of the
      top logits (``dlr_spread``), so it is invariant to the logit scale. Targeted, ``y`` is the target and the true
      label is not known here, so the numerator is the margin z_t minus the best other logit, not the paper's
      z_t - z_y (Eq. 8, ``attacks.apgd.targeted_dlr``, which APGD-T uses).
    """
    if loss == "ce":
        ce = F.cross_entropy(logits, y, reduction="none")
        return -ce if targeted else ce
    own = logits.gather(1, y[:, None]).squeeze(1)
    best_other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    margin = own - best_other if targeted else best_other - own
    if loss == "margin":
        return margin
    return margin / dlr_spread(logits, targeted)


def dlr_spread(logits: torch.Tensor, targeted: bool) -> torch.Tensor:
    """The denominator of the DLR losses (Croce & Hein 2020): the spread of the top logits, z_pi1 - z_pi3 (Eq. 7), or
    z_pi1 - (z_pi3 + z_pi4) / 2 for the targeted DLR (Eq. 8), which needs four classes. (N, C) -> (N,)."""
    top = logits.topk(4 if targeted else 3, dim=1).values
    return top[:, 0] - (0.5 * (top[:, 2] + top[:, 3]) if targeted else top[:, 2]) + 1e-12


def check_threat_model(model: nn.Module, x: torch.Tensor, eps: float, norm: str, seed: int | None) -> None:
    """What every attack checks first: images in [0, 1] on the model's device, a radius the norm allows, a seed."""
    check_images(x)
    check_nonempty(x)
    _torch.check_device(model, x)
    check_radius(eps, norm)
    check_seed(seed)


def check_radius(eps: float, norm: str) -> None:
    """A known norm and a radius it allows: >= 0, and at most 1 in L-inf (pixel values are in [0, 1])."""
    check_choice(norm, "norm", NORMS)
    check_positive(eps, "eps", allow_zero=True)
    if eps > 1 and norm == "linf":
        raise ValueError(f"eps must be in [0, 1] for norm='linf' (pixel values are in [0, 1]), got {eps}")


class Strongest:
    """The strongest iterate seen so far per sample, over all steps and restarts: a success beats a
    failure, then the higher objective wins. Tracking it makes more steps or restarts never weaker."""

    def __init__(self, x: torch.Tensor):
        self.x = x.clone()
        self.objective = torch.full((len(x),), float("-inf"), device=x.device)
        self.success = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        self.logits = None

    def update(self, index, x_adv, objective, logits, success) -> None:
        """Offer candidates for the samples ``index``; keep those that are stronger.

        Selects with ``torch.where`` rather than boolean indexing, which would wait for the GPU at every step."""
        if self.logits is None:
            self.logits = torch.zeros(len(self.x), logits.shape[1], device=logits.device)
        held = self.success[index]
        better = (success & ~held) | ((success == held) & (objective > self.objective[index]))
        self.x[index] = torch.where(better.view(-1, 1, 1, 1), x_adv, self.x[index])
        self.objective[index] = torch.where(better, objective, self.objective[index])
        self.logits[index] = torch.where(better[:, None], logits, self.logits[index])
        self.success[index] = held | success


def ascent_direction(grad, norm):
    """The steepest ascent direction of unit norm: the gradient's sign (L-inf), or the gradient normalised per
    image (L2). Shared by every attack."""
    if norm == "linf":
        return grad.sign()
    return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)


def project(x, x_adv, eps, norm):
    """Onto the eps-ball around x, then [0, 1]: clipping moves every pixel towards x (x is in [0, 1]), so the
    norm bound still holds. Shared by every attack."""
    if norm == "linf":
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    else:
        delta = x_adv - x
        delta_norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        x_adv = x + delta * (eps / delta_norm.clamp_min(1e-12)).clamp(max=1)
    return x_adv.clamp(0, 1)


def random_delta(x, eps, norm, generator):
    if norm == "linf":
        return (torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1) * eps
    # uniform in the L2 ball: a Gaussian direction, radius eps * U^(1/d)
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    direction = direction / direction.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    radius = torch.rand(len(x), generator=generator, device=x.device, dtype=x.dtype) ** (1 / x[0].numel())
    return direction * (eps * radius).view(-1, 1, 1, 1)


def eot_logits(model, x, eot_samples) -> torch.Tensor:
    """``eot_samples`` stochastic passes of ``model`` in one batch. (N, 3, H, W) -> (k, N, C)."""
    batch = x.repeat(eot_samples, 1, 1, 1) if eot_samples > 1 else x  # (k*N, 3, H, W)
    logits = _torch.logits_of(model(batch), len(batch)).float()
    return logits.view(eot_samples, len(x), -1)


def eot_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss: str = "ce", targeted: bool = False,
                 eot_samples: int = 1) -> torch.Tensor:
    """Input gradient of the attack objective, averaged over ``eot_samples`` stochastic passes.

    Expectation over Transformation (Athalye et al. 2018): for a randomised model the gradient of the
    expected objective is the mean of the per-draw gradients; all draws run as one batch.

    Shape: x (N, 3, H, W), y (N,) -> (N, 3, H, W).
    """
    check_images(x)
    check_nonempty(x)
    _torch.check_device(model, x)
    check_int(eot_samples, "eot_samples")
    check_choice(loss, "loss", LOSSES)
    check_labels(y, len(x), _torch.num_classes(model, x), "y")
    return objective_and_gradient(model, x, loss_function(loss, targeted), repeat_labels([y], eot_samples),
                                  eot_samples=eot_samples)[1]


def loss_function(loss: str, targeted: bool):
    """``attack_objective`` with ``loss`` and ``targeted`` fixed: (logits, labels) -> (N,)."""
    return lambda logits, labels: attack_objective(logits, labels, loss, targeted)


def repeat_labels(labels, eot_samples: int) -> list[torch.Tensor]:
    """Per-sample tensors (N,) repeated for the (k * N,) flattened logits of ``eot_logits``."""
    return [t.repeat(eot_samples) for t in labels] if eot_samples > 1 else list(labels)


def objective_and_gradient(model, x, objective, drawn, *, eot_samples, gradient=True):
    """The objective's mean over the EOT draws (N,), its input gradient (N, 3, H, W) or None (``gradient=False``:
    a forward pass only), and the mean logits (N, C); every attack's one evaluation of ``model``.

    ``objective`` maps the (k*N, C) logits of the draws and ``drawn``, their (k*N,) labels (and targets) from
    ``repeat_labels``, to (k*N,)."""
    x = x.detach().requires_grad_(gradient)
    with torch.set_grad_enabled(gradient):
        logits = eot_logits(model, x, eot_samples)  # (k, N, C)
        value = objective(logits.flatten(0, 1), *drawn).view(eot_samples, len(x)).mean(dim=0)
        grad = torch.autograd.grad(value.sum(), x)[0] if gradient else None
    return value.detach(), grad, logits.detach().mean(dim=0)


def succeeded(logits, y, targeted):
    prediction = logits.argmax(dim=1)
    return prediction == y if targeted else prediction != y
