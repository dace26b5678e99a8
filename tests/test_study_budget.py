"""benchmarks/study_budget.py, the study's cost model, held against counted runs of the evaluation it models: its
upper bound is exact for a model no attack can fool, and a real run's counts lie between its bounds."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from cliplab.evaluation import AttackBudget, robustness_vs_eps
from cliplab.study import get_profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import study_budget  # noqa: E402

BUDGET = AttackBudget(steps=3, num_targets=2, queries=4, pgd_steps=2, pgd_restarts=2)
RADII = (1 / 255, 2 / 255, 4 / 255)
STUDY_ATTACKS = get_profile("shapes").threat_model().attacks  # 05-07's


class Counted(nn.Module):
    """Counts the images of ``model``'s forward passes: F without grad, B with (an input gradient follows)."""

    def __init__(self, model: nn.Module, num_classes: int):
        super().__init__()
        self.model, self.num_classes = model, num_classes
        self.forward_images, self.backward_images = 0, 0

    def forward(self, x):
        if torch.is_grad_enabled():
            self.backward_images += len(x)
        else:
            self.forward_images += len(x)
        return self.model(x)


class Unfoolable(nn.Module):
    """Always the same 5 logits (class 0 first): no perturbation changes the prediction, so every image classified
    right survives every attack, the cost model's upper bound."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0]))

    def forward(self, x):
        return self.logits + 0 * x.flatten(1).sum(dim=1, keepdim=True)  # a gradient path to x, always zero


def _count(model, x, y):
    robustness_vs_eps(model, x, y, RADII, attacks=list(STUDY_ATTACKS), budget=BUDGET, batch_size=8,
                      progress=False)
    return model.forward_images, model.backward_images


def test_upper_bound_is_exact_when_nothing_falls():
    x = torch.rand(20, 3, 8, 8)
    y = torch.tensor([0, 1] * 10)  # half classified right
    counted = _count(Counted(Unfoolable(), 5), x, y)
    cost = study_budget.Cost(upper=True, accuracy=0.5)
    cost.ensemble(len(x), STUDY_ATTACKS, BUDGET, radii=len(RADII))
    assert counted == (cost.forward, cost.backward)


@pytest.mark.slow
def test_a_real_run_lies_between_the_bounds(shapes_clf, shapes_test):
    x, y, _ = shapes_test
    x, y = x[:24], y[:24]
    model = Counted(shapes_clf, shapes_clf.num_classes)
    with torch.no_grad():
        accuracy = (shapes_clf(x).argmax(1) == y).float().mean().item()
    forward, backward = _count(model, x, y)
    bounds = []
    for upper in (False, True):
        cost = study_budget.Cost(upper=upper, accuracy=accuracy)
        cost.ensemble(len(x), STUDY_ATTACKS, BUDGET, radii=len(RADII))
        bounds.append(cost)
    assert bounds[0].forward <= forward <= bounds[1].forward
    assert bounds[0].backward <= backward <= bounds[1].backward
