"""Projected gradient descent (Madry et al. 2018) on [0, 1] images, batched, with restarts and EOT; and
``pgd_maximize``, the bare ascent of any per-sample objective (FARE's inner attack).
"""
from __future__ import annotations

import torch
from torch import nn

from .. import _torch
from .._arguments import check_choice, check_int, check_labels, check_positive
from .common import (LOSSES, AttackResult, Strongest, ascent_direction, check_threat_model, eot_logits, loss_function,
                     objective_and_gradient, project, random_delta, repeat_labels, succeeded)


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None, *, eps: float,
        alpha: float | None = None, steps: int = 10, targeted: bool = False, random_start: bool = True,
        restarts: int = 1, norm: str = "linf", loss: str = "ce", early_stop: bool = False,
        eot_samples: int = 1, seed: int | None = None,
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
                y = eot_logits(model, x, eot_samples).mean(dim=0).argmax(dim=1)
        check_labels(y, len(x), _torch.num_classes(model, x), "y")
        y = y.to(device=x.device, dtype=torch.int64)
        best = Strongest(x)
        for restart in range(restarts):
            history.append(_pgd_run(model, x, y, best, eps=eps, alpha=alpha, steps=steps, targeted=targeted,
                                    random_start=random_start, norm=norm, loss=loss, early_stop=early_stop,
                                    eot_samples=eot_samples, generator=generator, start=start if restart == 0 else None))
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
             early_stop, eot_samples, generator, start) -> torch.Tensor:
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
        objective, grad, logits = objective_and_gradient(model, x_adv[active], loss_function(loss, targeted),
                                                         repeat_labels([y[active]], eot_samples),
                                                         eot_samples=eot_samples, gradient=not last)
        history[step, active] = objective
        best.update(active, x_adv[active], objective, logits, succeeded(logits, y[active], targeted))
        if last:
            break
        x_adv[active] = _step(x[active], x_adv[active], grad, eps, alpha, norm)
        if early_stop:
            active = active[~best.success[active]]
    return history


def _step(x, x_adv, grad, eps, alpha, norm):
    """Ascend ``alpha`` along the steepest direction, then ``project``."""
    return project(x, x_adv + alpha * ascent_direction(grad, norm), eps, norm)
