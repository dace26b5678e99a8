"""Gradient-masking checks: an honest model passes, a shattered-gradient defence is caught and warned about."""
import pytest
import torch
from torch import nn

from cliplab.checks import gradient_masking_report
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


def test_shattered_gradients_are_caught_and_warned(shapes_clf, sample):
    x, y = sample
    masked = Denoised(shapes_clf, Quantise())
    with pytest.warns(UserWarning, match="gradient-masking check failed"):
        report = gradient_masking_report(masked, x, y, eps=4 / 255, undefended=shapes_clf, steps=5)
    failed = {check.name for check in report.checks if not check.passed}
    assert "input gradients finite and non-zero" in failed
    assert "white-box at least as strong as transfer" in failed  # transfer beats the blind white-box attack
    assert not report.passed and "FAIL" in str(report)
