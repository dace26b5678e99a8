"""Evaluation: Proportion and its Clopper-Pearson interval, predict / accuracy against a manual argmax,
and the bookkeeping of pgd_accuracy and attack_success_rate."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import cliplab
from cliplab import Proportion


class Fixed(nn.Module):
    """A deterministic 4-class linear model on the mean colour, with a ``num_classes`` attribute."""

    num_classes = 4

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.linear = nn.Linear(3, 4)

    def forward(self, x):
        return 10 * self.linear(x.mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------------- Proportion
@pytest.mark.parametrize("hits, n", [(0, 10), (3, 10), (10, 10), (500, 1000), (1, 1), (0, 1), (999, 1000)])
def test_interval_contains_value(hits, n):
    p = Proportion(hits, n)
    low, high = p.ci95
    assert p.n == n
    assert 0 <= low <= p.value <= high <= 1
    assert p.value == hits / n


def test_one_clopper_pearson_serves_intervals_and_certificates():
    """Proportion.ci95 is the two-sided interval of the same bounds that randomized smoothing's certificates use,
    elementwise over arrays, with the exact edges at 0 and n."""
    from scipy.stats import beta

    from cliplab._stats import clopper_pearson

    hits, n = np.array([0, 1, 37, 99, 100]), 100
    low, high = clopper_pearson(hits, n, 0.001)
    expected_low = [0.0, *(beta.ppf(0.001, k, n - k + 1) for k in hits[1:])]
    expected_high = [*(beta.ppf(0.999, k + 1, n - k) for k in hits[:-1]), 1.0]
    np.testing.assert_allclose(low, expected_low)
    np.testing.assert_allclose(high, expected_high)
    for k in hits:
        assert Proportion(int(k), n).ci95 == tuple(float(b) for b in clopper_pearson(k, n, 0.025))


def test_interval_width_at_n_1000():
    low, high = Proportion(500, 1000).ci95
    # the protocol's rule of thumb: n = 1000 gives about +-3 points at 50% (exact: 46.9% to 53.1%)
    assert 0.028 < 0.5 - low < 0.034 and 0.028 < high - 0.5 < 0.034
    # and it narrows with n
    low_big, high_big = Proportion(5000, 10000).ci95
    assert high_big - low_big < (high - low) / 2


def test_interval_edge_cases():
    assert Proportion(0, 50).ci95[0] == 0.0 and Proportion(0, 50).ci95[1] > 0
    assert Proportion(50, 50).ci95[1] == 1.0 and Proportion(50, 50).ci95[0] < 1
    # Clopper-Pearson at 0/n: upper bound 1 - 0.025^(1/n)
    assert math.isclose(Proportion(0, 50).ci95[1], 1 - 0.025 ** (1 / 50), rel_tol=1e-9)
    assert math.isclose(Proportion(50, 50).ci95[0], 0.025 ** (1 / 50), rel_tol=1e-9)
    empty = Proportion(0, 0)
    assert math.isnan(empty.value) and all(math.isnan(b) for b in empty.ci95)


def test_str_reports_value_interval_and_n():
    text = str(Proportion(500, 1000))
    assert text.startswith("50.0%") and "n=1000" in text and "46.9" in text and "53.1" in text


def test_percent_is_the_tables_cell_and_str_adds_the_unit_and_n():
    proportion = Proportion(17, 100)
    assert proportion.percent(digits=0) == "17 [10, 26]" and proportion.percent() == "17.0 [10.2, 25.8]"
    assert str(proportion) == "17.0% [10.2, 25.8] (n=100)"


# ------------------------------------------------------------------------------ predict / accuracy
def test_predict_each_is_predict_on_every_set_of_a_stack():
    from cliplab.evaluation import predict_each

    model = Fixed()
    stack = torch.rand(3, 5, 3, 8, 8)  # 3 sets of 5 images
    expected = torch.stack([cliplab.predict(model, images) for images in stack])
    assert torch.equal(predict_each(model, stack, batch_size=4), expected)
    with pytest.raises(ValueError, match=r"images must be a \(S, N, 3, H, W\) stack"):
        predict_each(model, stack[0])


def test_accuracy_matches_manual_argmax():
    model = Fixed()
    torch.manual_seed(0)
    x = torch.rand(50, 3, 8, 8)
    with torch.no_grad():
        manual = model(x).argmax(1)
    y = manual.clone()
    y[::3] = (y[::3] + 1) % 4  # every third label wrong
    result = cliplab.accuracy(model, x, y, batch_size=7)  # batches that do not divide N
    assert result.n == 50
    assert result.hits == int((manual == y).sum()) == 50 - 17
    assert torch.equal(cliplab.predict(model, x, batch_size=7), manual)
    assert torch.equal(cliplab.predict(model, x, batch_size=1000), manual)


def test_accuracy_on_shapes_matches_manual_argmax(shapes_clf, shapes_test):
    x, y, _ = shapes_test
    with torch.no_grad():
        manual = shapes_clf(x[:100]).argmax(1)
    result = cliplab.accuracy(shapes_clf, x[:100], y[:100], batch_size=32)
    assert result.hits == int((manual == y[:100]).sum()) and result.n == 100


def test_predict_empty_and_bad_inputs():
    model = Fixed()
    assert cliplab.predict(model, torch.rand(0, 3, 8, 8)).shape == (0,)
    with pytest.raises(ValueError, match=r"^x must have values in \[0, 1\]"):
        cliplab.predict(model, torch.rand(2, 3, 8, 8) + 1)
    with pytest.raises(ValueError, match=r"^batch_size must be >= 1"):
        cliplab.predict(model, torch.rand(2, 3, 8, 8), batch_size=0)
    with pytest.raises(ValueError, match=r"^y must hold class indices in \[0, 3\]"):
        cliplab.accuracy(model, torch.rand(2, 3, 8, 8), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"^y must have shape \(2,\)"):
        cliplab.accuracy(model, torch.rand(2, 3, 8, 8), torch.tensor([0, 1, 2]))
    for evaluate in (cliplab.accuracy, lambda *a: cliplab.pgd_accuracy(*a, eps=1 / 255)):
        with pytest.raises(ValueError, match=r"^x must hold at least one image"):  # not "nan% (n=0)"
            evaluate(model, torch.rand(0, 3, 8, 8), torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("kwargs, match", [(dict(eps=-1 / 255), r"^eps must be >= 0"),
                                           (dict(eps=1 / 255, steps=0), r"^steps must be >= 1")])
def test_attack_arguments_checked_even_when_nothing_is_attacked(kwargs, match):
    """No image classified correctly means no attack runs: its arguments must still be validated."""
    model = Fixed()
    x = torch.rand(4, 3, 8, 8)
    wrong = (cliplab.predict(model, x) + 1) % 4
    with pytest.raises(ValueError, match=match):
        cliplab.pgd_accuracy(model, x, wrong, progress=False, **kwargs)


# ---------------------------------------------------------------------------- robust / success rate
def test_robust_accuracy_bookkeeping(shapes_clf, shapes_test, shapes_pred):
    x, y, _ = shapes_test
    x, y, pred = x[:40], y[:40], shapes_pred[:40]
    r = cliplab.pgd_accuracy(shapes_clf, x, y, eps=2 / 255, steps=3, batch_size=16, seed=0, progress=False)
    assert r.clean.hits == int((pred == y).sum()) and r.clean.n == 40
    assert r.success.n == r.clean.hits
    assert r.robust.hits == r.clean.hits - r.success.hits
    assert r.robust.value <= r.clean.value
    # eps = 0: nothing is fooled
    r0 = cliplab.pgd_accuracy(shapes_clf, x, y, eps=0.0, steps=1, progress=False)
    assert r0.success.hits == 0 and r0.robust.hits == r0.clean.hits


def test_robust_accuracy_decreases_with_eps(shapes_clf, shapes_test):
    x, y, _ = shapes_test
    accuracies = [cliplab.pgd_accuracy(shapes_clf, x[:48], y[:48], eps=e / 255, steps=5, seed=0,
                                       progress=False).robust.value for e in (0, 1, 4)]
    assert accuracies[0] >= accuracies[1] >= accuracies[2]
    assert accuracies[2] < accuracies[0]


def test_accuracy_vs_eps_is_the_worst_case_per_radius(shapes_clf, shapes_test):
    x, y, _ = shapes_test
    settings = dict(budget=cliplab.AttackBudget(steps=3, num_targets=2, queries=5), seed=0, progress=False)
    curve = cliplab.accuracy_vs_eps(shapes_clf, x[:32], y[:32], [1 / 255, 4 / 255], **settings)
    assert list(curve) == [0, 1 / 255, 4 / 255] and all(p.n == 32 for p in curve.values())
    assert curve[0] == cliplab.accuracy(shapes_clf, x[:32], y[:32])
    # nested radii: 4/255 attacks only the survivors of 1/255, so its worst case is at most 4/255's alone
    alone = cliplab.evaluate_robustness(shapes_clf, x[:32], y[:32], eps=4 / 255, **settings).robust
    assert curve[4 / 255].hits <= alone.hits
    assert curve[0].value >= curve[1 / 255].value >= curve[4 / 255].value
    for bad in ([], [0.0, 1 / 255]):
        with pytest.raises(ValueError, match="eps_values"):
            cliplab.accuracy_vs_eps(shapes_clf, x[:4], y[:4], bad)


def test_accuracy_table_has_every_cell_with_its_interval_and_n():
    from cliplab.evaluation import format_accuracy_table

    rows = {"original": {0: Proportion(99, 100), 4 / 255: Proportion(1, 100)},
            "FARE": {0: Proportion(90, 100), 4 / 255: Proportion(40, 100)}}
    lines = format_accuracy_table(rows).splitlines()
    assert lines[0] == "accuracy in % [95% CI], n=100 images"
    assert lines[1].split() == ["clean", "4/255"]
    low, high = Proportion(40, 100).ci95
    assert lines[3].split()[0] == "FARE" and f"40 [{100 * low:.0f}, {100 * high:.0f}]" in lines[3]


def test_attack_success_rate_leaves_out_targets_equal_to_labels(shapes_clf, shapes_test, shapes_pred):
    x, y, _ = shapes_test
    x, y, pred = x[:24], y[:24], shapes_pred[:24]
    targets = (y + 1) % 100
    targets[:6] = y[:6]  # already "reached": must not count
    rate = cliplab.attack_success_rate(shapes_clf, x, y, eps=8 / 255, targets=targets, steps=5, seed=0,
                                       progress=False)
    eligible = (pred == y) & (targets != y)
    assert rate.n == int(eligible.sum())
    assert 0 <= rate.hits <= rate.n
    untargeted = cliplab.attack_success_rate(shapes_clf, x, y, eps=8 / 255, steps=5, seed=0, progress=False)
    assert untargeted.n == int((pred == y).sum())
    with pytest.raises(ValueError, match=r"^targets must hold class indices"):
        cliplab.attack_success_rate(shapes_clf, x, y, eps=1 / 255, targets=targets + 100, progress=False)
