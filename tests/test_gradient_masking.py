"""Gradient-masking checks: an honest model passes, a shattered-gradient defence is caught and warned about."""
import pytest
import torch
from torch import nn

import cliplab

from cliplab.evaluation import gradient_masking_report
from cliplab.defences import Denoised


class Quantise(nn.Module):
    """Rounds pixels to 8 levels: a classic masking 'defence' whose input gradient is zero everywhere."""

    def forward(self, x):
        return torch.round(x * 7) / 7


@pytest.fixture(scope="module")
def sample(shapes_test):
    x, y, _ = shapes_test
    return x[:24], y[:24]


def test_undefended_model_passes_every_check(shapes_clf, sample):
    x, y = sample
    report = gradient_masking_report(shapes_clf, x, y, eps=4 / 255, undefended=shapes_clf, steps=5)
    assert report.passed, str(report)
    assert len(report.checks) == 5


class Probabilities(nn.Module):
    """The classifier's softmax: what a model that returns probabilities instead of logits looks like."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier, self.num_classes = classifier, classifier.num_classes

    def forward(self, x):
        return self.classifier(x).softmax(dim=1)


def test_probabilities_instead_of_logits_are_flagged(shapes_clf, sample):
    x, y = sample
    with pytest.warns(UserWarning, match="the model returns logits"):
        report = gradient_masking_report(Probabilities(shapes_clf), x, y, eps=4 / 255, steps=2)
    assert not report.passed and report.checks[0].name == "the model returns logits"
    with pytest.warns(UserWarning, match="model returns probabilities"):
        cliplab.evaluate_robustness(Probabilities(shapes_clf), x[:4], y[:4], eps=1 / 255, attacks=["apgd-ce"],
                                    budget=cliplab.AttackBudget(steps=1), progress=False)


def test_shattered_gradients_are_caught_and_warned(shapes_clf, sample):
    x, y = sample
    masked = Denoised(shapes_clf, Quantise())
    with pytest.warns(UserWarning, match="gradient-masking check failed"):
        report = gradient_masking_report(masked, x, y, eps=4 / 255, undefended=shapes_clf, steps=5)
    failed = {check.name for check in report.checks if not check.passed}
    assert "input gradients finite and non-zero" in failed
    assert "white-box at least as strong as transfer" in failed  # transfer beats the blind white-box attack
    assert not report.passed and "FAIL" in str(report)
