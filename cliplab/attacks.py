"""Projected gradient descent (Madry et al. 2018) on [0, 1] images, batched, with restarts and EOT."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import _torch
from ._checks import check_choice, check_images, check_int, check_labels, check_nonempty, check_positive, check_seed

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

    @property
    def success_rate(self) -> float:
        return self.success.float().mean().item()


def attack_objective(logits: torch.Tensor, y: torch.Tensor, loss: str, targeted: bool) -> torch.Tensor:
    """Per-sample objective that PGD ascends. (N, C), (N,) -> (N,).

    - ``ce``: cross-entropy to ``y`` (minus it when targeted). CLIP's logit scale of 100 saturates it
      on confident samples, which is why the margin losses exist.
    - ``margin``: Carlini & Wagner (2017) logit margin, best other class minus ``y`` (``y`` minus best
      other when targeted). Positive exactly when the attack has succeeded.
    - ``dlr``: Croce & Hein (2020) difference of logits ratio, the margin divided by the spread of the
      top logits, so it is invariant to the logit scale; the targeted form uses the 1st, 3rd and 4th.
    """
    if loss == "ce":
        ce = F.cross_entropy(logits, y, reduction="none")
        return -ce if targeted else ce
    own = logits.gather(1, y[:, None]).squeeze(1)
    best_other = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    margin = own - best_other if targeted else best_other - own
    if loss == "margin":
        return margin
    top = logits.sort(dim=1, descending=True).values
    if targeted:  # Croce & Hein (2020), Eq. 8
        return margin / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)
    return margin / (top[:, 0] - top[:, 2] + 1e-12)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *, eps: float,
        alpha: float | None = None, steps: int = 10, targeted: bool = False, random_start: bool = True,
        restarts: int = 1, norm: str = "linf", loss: str = "ce", early_stop: bool = False,
        eot_samples: int = 1, seed: int | None = None, autocast: bool = False,
        start: torch.Tensor | None = None) -> AttackResult:
    """Projected gradient descent with restarts, keeping the strongest result per sample.

    Args:
        model: maps (N, 3, H, W) images in [0, 1] to (N, C) logits; may be stochastic (a defence).
        x: (N, 3, H, W) clean images in [0, 1].
        y: (N,) labels to leave (untargeted) or targets to reach (targeted). None (untargeted only):
            leave the model's own prediction on ``x``.
        eps: radius of the threat model in [0, 1] pixel units (L-inf: per pixel; L2: per image).
        alpha: step size; default ``2.5 * eps / steps`` (Madry et al. 2018).
        steps: gradient steps per restart.
        targeted: reach ``y`` instead of leaving it.
        random_start: start from a uniform point of the ball rather than ``x``.
        restarts: independent runs; per sample the successful (else highest-objective) one is kept.
        norm: ``"linf"`` or ``"l2"``.
        loss: ``"ce"``, ``"margin"`` or ``"dlr"`` (see ``attack_objective``).
        early_stop: stop updating samples once they succeed (cheaper; the result is still a success).
        eot_samples: Expectation over Transformation (Athalye et al. 2018): the gradient is the mean of
            the gradients of this many stochastic forward passes, run as one batch.
        seed: seeds the random start (None: the global generator).
        autocast: run the model under bfloat16 autocast (GPU speed; gradients stay float32). A
            ``ZeroShotClassifier`` runs in its own ``precision`` (bf16 autocast on CUDA by default), and
            one loaded with ``precision="fp32"`` stays fp32 whatever this flag says.
        start: (N, 3, H, W) perturbation the first run starts from instead of a random one, e.g. this process's
            rows of a random start drawn for a whole distributed batch (later restarts start at random).

    Returns:
        AttackResult with the adversarial images, per-sample success and the objective history.
    """
    check_threat_model(model, x, eps, norm, seed)
    _check_start(start, x)
    check_int(steps, "steps")
    if alpha is not None:
        check_positive(alpha, "alpha")
    alpha = 2.5 * eps / steps if alpha is None else alpha
    check_int(restarts, "restarts")
    check_int(eot_samples, "eot_samples")
    check_choice(loss, "loss", LOSSES)
    if y is None and targeted:
        raise ValueError("y (the target classes) is required when targeted=True")

    generator = torch.Generator(x.device).manual_seed(seed) if seed is not None else None
    history = []
    with _torch.eval_mode(model), _torch.cast_cache(x.device):
        if y is None:  # leave the model's own prediction
            with torch.no_grad():
                y = eot_logits(model, x, eot_samples, autocast).mean(dim=0).argmax(dim=1)
        check_labels(y, len(x), _torch.num_classes(model, x), "y")
        y = y.to(device=x.device, dtype=torch.int64)
        best = Strongest(x)
        for restart in range(restarts):
            history.append(_pgd_run(model, x, y, best, eps=eps, alpha=alpha, steps=steps, targeted=targeted,
                                    random_start=random_start, norm=norm, loss=loss, early_stop=early_stop,
                                    eot_samples=eot_samples, generator=generator, autocast=autocast,
                                    start=start if restart == 0 else None))
    return AttackResult(best.x, best.success, torch.stack(history), best.logits)


def pgd_maximize(objective, x: torch.Tensor, *, eps: float, alpha: float, steps: int, norm: str = "linf",
                 random_start: bool = True, generator: torch.Generator | None = None,
                 start: torch.Tensor | None = None) -> torch.Tensor:
    """Plain PGD (last iterate) on any per-sample objective, e.g. an embedding distance for FARE.

    Args:
        objective: maps (N, 3, H, W) images to (N,) values to ascend.
        x: (N, 3, H, W) images in [0, 1]; eps, alpha, steps, norm, random_start, start as in ``pgd``.

    Returns:
        (N, 3, H, W) adversarial images within the eps-ball, in [0, 1], detached.
    """
    _check_start(start, x)
    x_adv = (x + _start(x, eps, norm, random_start, generator, start)).clamp(0, 1).detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            grad = torch.autograd.grad(objective(x_adv).sum(), x_adv)[0]
        x_adv = _step(x, x_adv.detach(), grad, eps, alpha, norm)
    return x_adv.detach()


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


def _check_start(start: torch.Tensor | None, x: torch.Tensor) -> None:
    if start is not None and (start.shape != x.shape or start.device != x.device):
        raise ValueError(f"start must be a perturbation of x's shape {tuple(x.shape)} on {x.device}, got "
                         f"{tuple(start.shape)} on {start.device}")


def _start(x, eps, norm, random_start, generator, start) -> torch.Tensor:
    """The perturbation a run starts from: ``start`` if given, else a random point of the ball, else zero."""
    if start is not None:
        return start
    return random_delta(x, eps, norm, generator) if random_start else torch.zeros_like(x)


def _pgd_run(model, x, y, best: Strongest, *, eps, alpha, steps, targeted, random_start, norm, loss,
             early_stop, eot_samples, generator, autocast, start) -> torch.Tensor:
    """One PGD run from ``start`` or a fresh start, offering every iterate to ``best``. Returns (steps+1, N)
    objectives."""
    x_adv = (x + _start(x, eps, norm, random_start, generator, start)).clamp(0, 1)
    history = torch.full((steps + 1, len(x)), float("nan"), device=x.device)
    active = torch.arange(len(x), device=x.device)  # samples still being updated
    if early_stop:  # a restart skips the samples an earlier run fooled
        active = active[~best.success]
    for step in range(steps + 1):
        if len(active) == 0:
            break
        last = step == steps  # the final iterate is only evaluated
        objective, grad, logits = _objective_and_gradient(model, x_adv[active], y[active], loss=loss,
                                                          targeted=targeted, eot_samples=eot_samples,
                                                          autocast=autocast, gradient=not last)
        history[step, active] = objective
        best.update(active, x_adv[active], objective, logits, _succeeded(logits, y[active], targeted))
        if last:
            break
        x_adv[active] = _step(x[active], x_adv[active], grad, eps, alpha, norm)
        if early_stop:
            active = active[~best.success[active]]
    return history


def _step(x, x_adv, grad, eps, alpha, norm):
    """Ascend ``alpha`` along the steepest direction, then ``project``."""
    return project(x, x_adv + alpha * ascent_direction(grad, norm), eps, norm)


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


def eot_logits(model, x, eot_samples, autocast) -> torch.Tensor:
    """``eot_samples`` stochastic passes of ``model`` in one batch. (N, 3, H, W) -> (k, N, C)."""
    batch = x.repeat(eot_samples, 1, 1, 1) if eot_samples > 1 else x  # (k*N, 3, H, W)
    with _torch.autocast(x.device, autocast):
        logits = model(batch).float()
    return logits.view(eot_samples, len(x), -1)


def eot_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, loss: str = "ce", targeted: bool = False,
                 eot_samples: int = 1, autocast: bool = False) -> torch.Tensor:
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
    return _objective_and_gradient(model, x, y, loss=loss, targeted=targeted, eot_samples=eot_samples,
                                   autocast=autocast, gradient=True)[1]


def _objective_and_gradient(model, x, y, *, loss, targeted, eot_samples, autocast, gradient):
    """Mean per-draw objective (N,), its input gradient (N, 3, H, W) or None, and the mean logits (N, C)."""
    x = x.detach().requires_grad_(gradient)
    with torch.set_grad_enabled(gradient):
        logits = eot_logits(model, x, eot_samples, autocast)  # (k, N, C)
        objective = attack_objective(logits.flatten(0, 1), y.repeat(eot_samples), loss, targeted)
        objective = objective.view(eot_samples, len(x)).mean(dim=0)  # (N,)
        grad = torch.autograd.grad(objective.sum(), x)[0] if gradient else None
    return objective.detach(), grad, logits.detach().mean(dim=0)


def _succeeded(logits, y, targeted):
    prediction = logits.argmax(dim=1)
    return prediction == y if targeted else prediction != y
