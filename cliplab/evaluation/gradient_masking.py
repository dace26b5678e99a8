"""Sanity checks against gradient masking (Athalye et al. 2018; Carlini et al. 2019, Sec. 5).

A defence that looks robust only because its gradients are useless fails at least one of these. Run
``gradient_masking_report`` on any (defended) model; each failed check also raises a warning.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import _torch
from .._arguments import check_images, check_labels
from ..attacks.common import eot_gradient
from ..attacks.pgd import pgd
from .prediction import accuracy, looks_like_probabilities
from .statistics import Proportion


@dataclass(frozen=True)
class Check:
    name: str  # what was checked
    passed: bool  # whether the defence behaved as an honest (non-masked) model would
    detail: str  # the measured numbers behind the verdict


@dataclass
class MaskingReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def __str__(self) -> str:
        lines = [f"{'ok  ' if c.passed else 'FAIL'} {c.name}: {c.detail}" for c in self.checks]
        return "\n".join(lines)


def gradient_masking_report(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                            undefended: nn.Module | None = None, steps: int = 10, eot_samples: int = 1,
                            votes: int = 1, tolerance: float = 0.02, seed: int = 0) -> MaskingReport:
    """Run the gradient-masking sanity checks on ``model`` at threat radius ``eps`` (L-inf).

    Checks:
        1. input gradients are finite and non-zero for every image;
        2. accuracy does not rise with eps (eps/2, eps, 2 eps);
        3. an unbounded attack (eps = 1) brings accuracy to ~0 (<= 5%, or <= 10% with votes);
        4. more steps and restarts (4x steps, 2 restarts) are never weaker;
        5. white-box is at least as strong as transfer from ``undefended`` (when given);
        and, listed only when it fails, that the model returns logits rather than probabilities.

    Args:
        model: the model under test, defence included. x, y: a batch of images and labels.
        eps: the threat radius the defence is evaluated at.
        undefended: the base classifier, as transfer source.
        steps, eot_samples: PGD budget of the reference attack (EOT for randomised models).
        votes: majority votes to score a randomised model.
        tolerance: slack on accuracy comparisons (Monte-Carlo noise of randomised models).
        seed: seeds the attacks.
    """
    check_images(x)
    check_labels(y, len(x), _torch.num_classes(model, x), "y")
    attack = dict(eot_samples=eot_samples, loss="margin", seed=seed)

    def robust(eps_value, model_=model, **kwargs) -> Proportion:
        x_adv = pgd(model_, x, y, eps=eps_value, **{"steps": steps, **attack, **kwargs}).x_adv
        return accuracy(model, x_adv, y, votes=votes)

    n = f" (n={len(x)}, 95% CI)"

    report = MaskingReport()
    with torch.no_grad(), _torch.eval_mode(model):
        outputs = _torch.logits_of(model(x[:8]), len(x[:8])).float()
    if looks_like_probabilities(outputs):  # listed only when it fails, so a report on logits reads as before
        report.checks.append(Check("the model returns logits", False, "its rows are probabilities (in [0, 1], "
                                   "summing to 1): cross-entropy attacks on them understate robustness"))
    report.checks.append(_gradient_check(model, x, y, eot_samples))
    curve = [robust(e) for e in (eps / 2, eps, 2 * eps)]
    report.checks.append(Check("accuracy falls as eps grows",
                               all(b.value <= a.value + tolerance for a, b in zip(curve, curve[1:])),
                               "accuracy at eps/2, eps, 2eps: " + ", ".join(p.percent(unit="%") for p in curve) + n))
    unbounded = robust(1.0)
    limit = 0.05 if votes == 1 else 0.10
    report.checks.append(Check("unbounded attack (eps=1) reaches ~0% accuracy", unbounded.value <= limit,
                               f"{unbounded.percent(unit='%')} (limit {100 * limit:.0f}%)" + n))
    stronger = robust(eps, steps=4 * steps, restarts=2)
    report.checks.append(Check("more steps and restarts are never weaker", stronger.value <= curve[1].value + tolerance,
                               f"{steps} steps: {curve[1].percent(unit='%')}, {4 * steps} steps x 2 restarts: "
                               f"{stronger.percent(unit='%')}" + n))
    if undefended is not None:
        transfer = robust(eps, model_=undefended, eot_samples=1)
        report.checks.append(Check("white-box at least as strong as transfer",
                                   curve[1].value <= transfer.value + tolerance,
                                   f"white-box {curve[1].percent(unit='%')}, transfer from undefended "
                                   f"{transfer.percent(unit='%')}" + n))
    for check in report.checks:
        if not check.passed:
            warnings.warn(f"gradient-masking check failed: {check.name} ({check.detail})", stacklevel=2)
    return report


def _gradient_check(model, x, y, eot_samples) -> Check:
    with _torch.eval_mode(model):
        grad = eot_gradient(model, x, y, eot_samples=eot_samples)
    finite = bool(torch.isfinite(grad).all())
    zero = int((grad.flatten(1).abs().amax(dim=1) == 0).sum())
    return Check("input gradients finite and non-zero", finite and zero == 0,
                 f"finite: {finite}, images with an all-zero gradient: {zero}/{len(x)}")
