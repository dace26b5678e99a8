"""Auto-PGD (Croce & Hein 2020): PGD with momentum and a step size that adapts itself, untargeted and targeted.

APGD needs no step-size tuning: it starts at 2 eps and halves the step of a sample, restarting it from its best
point, at checkpoints where the objective stopped rising often enough (Algorithm 1 of the paper). Together with the
targeted DLR loss over the top-k classes (APGD-T) it is the backbone of AutoAttack, the evaluation RobustBench
accepts. Same [0, 1] contract, EOT and ``AttackResult`` as ``cliplab.pgd``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import _torch
from .._arguments import check_choice, check_int, check_labels
from .common import (AttackResult, Strongest, ascent_direction, attack_objective, check_threat_model, dlr_spread,
                     eot_logits, objective_and_gradient, project, random_delta, repeat_labels)

APGD_LOSSES = ("ce", "dlr")
MOMENTUM = 0.75  # weight of the new step against the previous one (the paper's alpha)
RHO = 0.75  # a checkpoint halves the step unless the objective rose in more than this fraction of the steps


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100, loss: str = "ce",
         norm: str = "linf", restarts: int = 1, eot_samples: int = 1, seed: int | None = None,
         early_stop: bool = False) -> AttackResult:
    """Untargeted APGD: leave the label ``y``, ascending cross-entropy (APGD-CE) or the DLR loss (APGD-DLR).

    Args:
        model: maps (N, 3, H, W) images in [0, 1] to (N, C) logits; may be stochastic (then use EOT).
        x: (N, 3, H, W) clean images in [0, 1]; y: (N,) their labels.
        eps: radius of the threat model in [0, 1] pixel units (L-inf: per pixel; L2: per image).
        steps: iterations per restart (AutoAttack: 100).
        loss: ``"ce"`` or ``"dlr"`` (the difference of logits ratio, invariant to CLIP's logit scale).
        norm: ``"linf"`` or ``"l2"``.
        restarts: runs from fresh random starts; each runs only on the samples not yet fooled.
        eot_samples: stochastic passes averaged per gradient, run as one batch (Athalye et al. 2018).
        seed: seeds the random starts (None: the global generator).
        early_stop: stop attacking a sample once it is fooled: its success cannot change, only its adversarial
            image could still grow stronger (which matters when success is judged otherwise, e.g. by a vote of a
            randomised model). Cheaper; waits for the device once per step.

    Returns:
        AttackResult: success means misclassified; ``loss_history`` is (restarts, steps + 1, N), NaN where a
        sample no longer ran.
    """
    check_choice(loss, "loss", APGD_LOSSES)
    y = _check_attack(model, x, y, eps=eps, steps=steps, norm=norm, restarts=restarts, eot_samples=eot_samples,
                      seed=seed)
    if loss == "dlr" and (num_classes := _torch.num_classes(model, x)) < 3:
        raise ValueError(f"loss='dlr' needs at least 3 classes (the three largest logits), the model has "
                         f"{num_classes}: use loss='ce'")
    objective = (lambda logits, labels: attack_objective(logits, labels, loss, targeted=False))
    return _run_restarts(model, x, y, [None] * restarts, objective, eps=eps, steps=steps, norm=norm,
                         eot_samples=eot_samples, seed=seed, early_stop=early_stop)


def apgd_targeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, steps: int = 100,
                  num_targets: int = 9, norm: str = "linf", loss: str = "dlr", eot_samples: int = 1,
                  seed: int | None = None, early_stop: bool = False) -> AttackResult:
    """APGD-T: targeted APGD on the targeted DLR loss, once towards each of the ``num_targets`` classes the model
    ranks highest after the label (Croce & Hein 2020, Eq. 8; AutoAttack's APGD-T with 9 targets). ``loss="ce"``
    ascends the targeted cross-entropy instead: the targeted DLR needs the four largest logits, so a task of fewer
    than 4 classes needs it.

    The goal is still to leave ``y`` (success means misclassified): aiming at the likeliest wrong classes in turn
    finds adversarial images that untargeted losses miss. Each target runs only on the samples not yet fooled.

    Args:
        num_targets: target classes tried, at most C - 1; the other arguments (``early_stop`` too) as in ``apgd``.
    """
    check_choice(loss, "loss", APGD_LOSSES)
    y = _check_attack(model, x, y, eps=eps, steps=steps, norm=norm, restarts=1, eot_samples=eot_samples, seed=seed)
    check_int(num_targets, "num_targets")
    num_classes = _torch.num_classes(model, x)
    if num_targets > num_classes - 1:
        raise ValueError(f"num_targets must be at most the number of classes - 1 ({num_classes - 1}), "
                         f"got {num_targets}")
    if loss == "dlr" and num_classes < 4:
        raise ValueError(f"loss='dlr' (the targeted DLR) needs at least 4 classes (the four largest logits), the "
                         f"model has {num_classes}: use loss='ce'")
    with torch.no_grad(), _torch.eval_mode(model):  # the ranking of the classes on the clean images
        ranked = eot_logits(model, x, eot_samples).mean(dim=0).sort(dim=1, descending=True).indices
    # the k-th likeliest class other than the label: skip the label wherever it sits in the ranking
    others = ranked.masked_select(ranked != y[:, None]).view(len(x), -1)  # (N, C - 1)
    targets = [others[:, k] for k in range(num_targets)]
    return _run_restarts(model, x, y, targets, targeted_dlr if loss == "dlr" else targeted_ce, eps=eps, steps=steps,
                         norm=norm, eot_samples=eot_samples, seed=seed, early_stop=early_stop)


def targeted_dlr(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted difference of logits ratio, to ascend: (z_t - z_y) / (z_pi1 - (z_pi3 + z_pi4) / 2), (N, C) -> (N,).

    Positive once the target beats the label; dividing by the spread of the top logits makes it invariant to the
    logit scale (Croce & Hein 2020, Eq. 8). Needs at least 4 classes.
    """
    margin = logits.gather(1, target[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)
    return margin / dlr_spread(logits, targeted=True)


def targeted_ce(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted cross-entropy, to ascend: minus the cross-entropy of the target, (N, C) -> (N,) (any C >= 2)."""
    return -F.cross_entropy(logits, target, reduction="none")


def step_size_checks(steps: int) -> list[int]:
    """The iterations at which APGD may halve its step (Croce & Hein 2020, Sec. 3.2): the first after 22% of the
    steps, each interval 3% of the steps shorter than the one before, but at least 6%; in AutoAttack's integer
    form (100 steps: 22, 41, 57, 70, 80, 87, 93, 99)."""
    interval, shrink, shortest = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    marks, at = [], interval
    while at <= steps:
        marks.append(at)
        interval = max(interval - shrink, shortest)
        at += interval
    return marks


def _check_attack(model, x, y, *, eps, steps, norm, restarts, eot_samples, seed) -> torch.Tensor:
    check_threat_model(model, x, eps, norm, seed)
    check_int(steps, "steps")
    check_int(restarts, "restarts")
    check_int(eot_samples, "eot_samples")
    check_labels(y, len(x), _torch.num_classes(model, x), "y")
    return y.to(device=x.device, dtype=torch.int64)


def _run_restarts(model, x, y, targets, objective, *, eps, steps, norm, eot_samples, seed, early_stop):
    """One APGD run per entry of ``targets`` (None: untargeted), each on the samples still standing.

    Choosing the standing samples waits for the device once per run; inside a run only ``early_stop`` does."""
    generator = torch.Generator(x.device).manual_seed(seed) if seed is not None else None
    best = Strongest(x)
    history = torch.full((len(targets), steps + 1, len(x)), float("nan"), device=x.device)
    with _torch.eval_mode(model), _torch.cast_cache(x.device):
        for run, target in enumerate(targets):
            index = (~best.success).nonzero().squeeze(1)
            if len(index) == 0:
                break
            labels = [y[index]] + ([] if target is None else [target[index]])
            _apgd_run(model, x[index], index, labels, best, objective, history[run], eps=eps, steps=steps,
                      norm=norm, eot_samples=eot_samples, generator=generator, early_stop=early_stop)
    return AttackResult(best.x, best.success, history, best.logits)


def _apgd_run(model, x, index, labels, best: Strongest, objective, history, *, eps, steps, norm, eot_samples,
              generator, early_stop) -> None:
    """Algorithm 1 of Croce & Hein (2020) on one batch, offering every iterate to ``best`` (at ``index``) and
    writing the objective of every sample at every iterate into ``history`` (steps + 1, N) at ``index``.

    ``labels``: the per-sample tensors the objective takes after the logits (the labels, then APGD-T's targets).
    Every decision is a per-sample tensor mask, so nothing waits for the device, except ``early_stop``: after every
    step, the samples ``best`` holds as fooled leave the batch (their result can no longer change), which costs one
    wait per step and saves their passes."""
    n = len(x)
    step = torch.full((n, 1, 1, 1), 2.0 * eps, device=x.device)  # the paper's eta^(0) = 2 eps
    x_adv = (x + random_delta(x, eps, norm, generator)).clamp(0, 1)
    drawn = repeat_labels(labels, eot_samples)  # built once, not every step
    value, grad, logits = objective_and_gradient(model, x_adv, objective, drawn, eot_samples=eot_samples)
    best.update(index, x_adv, value, logits, logits.argmax(dim=1) != labels[0])
    history[0, index] = value
    x_max, value_max, grad_max = x_adv.clone(), value.clone(), grad.clone()  # the best point of this run
    x_previous, value_previous = x_adv, value
    value_at_checkpoint, halved_at_checkpoint = value_max.clone(), torch.ones(n, dtype=torch.bool, device=x.device)
    rises = torch.zeros(n, device=x.device)  # steps since the last checkpoint where the objective rose
    marks, last_mark = set(step_size_checks(steps)), 0
    for k in range(1, steps + 1):
        if early_stop:
            standing = ~best.success[index]
            if not standing.all():  # every per-sample tensor of the run loses the fooled rows
                if not standing.any():
                    return
                (x, index, step, x_adv, x_previous, value_previous, x_max, value_max, grad, grad_max,
                 value_at_checkpoint, halved_at_checkpoint, rises, *labels) = (
                    t[standing] for t in (x, index, step, x_adv, x_previous, value_previous, x_max, value_max, grad,
                                          grad_max, value_at_checkpoint, halved_at_checkpoint, rises, *labels))
                drawn = repeat_labels(labels, eot_samples)
        z = project(x, x_adv + ascent_direction(grad, norm) * step, eps, norm)
        momentum = MOMENTUM if k > 1 else 1.0
        x_next = project(x, x_adv + momentum * (z - x_adv) + (1 - momentum) * (x_adv - x_previous), eps, norm)
        x_previous, x_adv = x_adv, x_next
        last = k == steps  # no step follows the final iterate: it is only evaluated, without a gradient
        value, grad, logits = objective_and_gradient(model, x_adv, objective, drawn, eot_samples=eot_samples,
                                                     gradient=not last)
        best.update(index, x_adv, value, logits, logits.argmax(dim=1) != labels[0])
        history[k, index] = value
        if last:
            return
        rises += (value > value_previous).float()
        value_previous = value
        improved = value > value_max
        x_max = torch.where(improved.view(-1, 1, 1, 1), x_adv, x_max)
        grad_max = torch.where(improved.view(-1, 1, 1, 1), grad, grad_max)
        value_max = torch.where(improved, value, value_max)
        if k in marks:
            # condition 1: too few rises; condition 2: the step was kept last time and the best did not improve
            halve = (rises <= RHO * (k - last_mark)) | (~halved_at_checkpoint & (value_max <= value_at_checkpoint))
            step = torch.where(halve.view(-1, 1, 1, 1), step / 2, step)
            x_adv = torch.where(halve.view(-1, 1, 1, 1), x_max, x_adv)  # go on from the best point
            grad = torch.where(halve.view(-1, 1, 1, 1), grad_max, grad)
            halved_at_checkpoint, value_at_checkpoint = halve, value_max.clone()
            rises.zero_()
            last_mark = k
