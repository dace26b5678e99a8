"""APGD, APGD-T and Square (``cliplab.attacks.apgd``, ``cliplab.attacks.square``): the threat model, the step-size
schedule, the paper's targeted DLR, early stopping, and parity with torchattacks' ports on the trained `shapes`
CLIP."""
from __future__ import annotations

import pytest
import torch

import cliplab
from cliplab.attacks import apgd, apgd_targeted
from cliplab.attacks.apgd import step_size_checks, targeted_dlr
from cliplab.attacks import square

ATTACKS = {
    "apgd-ce": lambda m, x, y, eps: apgd(m, x, y, eps=eps, steps=5, seed=0),
    "apgd-dlr": lambda m, x, y, eps: apgd(m, x, y, eps=eps, steps=5, loss="dlr", restarts=2, seed=0),
    "apgd-t": lambda m, x, y, eps: apgd_targeted(m, x, y, eps=eps, steps=5, num_targets=2, seed=0),
    "square": lambda m, x, y, eps: square(m, x, y, eps=eps, queries=20, seed=0),
}


def _robust(model, x_adv, y) -> float:
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def standing(shapes_clf, shapes_test, shapes_pred):
    """100 test images the trained model classifies correctly."""
    x, y, _ = shapes_test
    correct = shapes_pred == y
    return x[correct][:100], y[correct][:100]


# ------------------------------------------------------------------------------------- data contract
@pytest.mark.parametrize("name", ATTACKS)
def test_adversarial_images_respect_threat_model(shapes_clf, batch, name):
    x, y = batch
    eps = 4 / 255
    result = ATTACKS[name](shapes_clf, x, y, eps)
    assert result.x_adv.shape == x.shape and result.x_adv.dtype == x.dtype
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert (result.x_adv - x).abs().amax() <= eps + 1e-6
    assert (result.x_adv != x).any(), "the attack never moved the images"
    with torch.no_grad():
        logits = shapes_clf(result.x_adv)
    torch.testing.assert_close(result.logits, logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(result.success, logits.argmax(1) != y)


def test_apgd_l2_stays_in_the_ball(shapes_clf, batch):
    x, y = batch
    result = apgd(shapes_clf, x, y, eps=0.5, steps=5, norm="l2", seed=0)
    assert (result.x_adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1


def test_step_size_checks_follow_autoattack():
    assert step_size_checks(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert step_size_checks(10) == list(range(2, 11))
    assert step_size_checks(1) == [1]


def test_targeted_dlr_is_the_papers_eq_8():
    """Croce & Hein (2020), Eq. 8, the loss APGD-T ascends: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), the z_pi
    sorted in decreasing order, computed here by hand for each row."""
    logits = torch.tensor([[3.0, 9.0, -2.0, 4.5, 1.0], [0.5, -1.0, 2.0, 7.0, 6.0]])
    y, target = torch.tensor([1, 3]), torch.tensor([3, 4])
    # row 0: sorted 9, 4.5, 3, 1, -2; row 1: sorted 7, 6, 2, 0.5, -1
    expected = torch.tensor([-(9.0 - 4.5) / (9.0 - (3.0 + 1.0) / 2), -(7.0 - 6.0) / (7.0 - (2.0 + 0.5) / 2)])
    torch.testing.assert_close(targeted_dlr(logits, y, target), expected)


def test_targeted_dlr_is_positive_once_the_target_wins():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0], [5.0, 4.0, 1.0, 0.0, -1.0]])
    y, target = torch.tensor([0, 1]), torch.tensor([1, 0])
    value = targeted_dlr(logits, y, target)
    assert value[0] < 0 < value[1]
    torch.testing.assert_close(targeted_dlr(100 * logits, y, target), value)  # invariant to CLIP's logit scale


def test_same_seed_same_result(shapes_clf, batch):
    x, y = batch
    first, second = (apgd(shapes_clf, x, y, eps=2 / 255, steps=4, seed=3) for _ in range(2))
    assert torch.equal(first.x_adv, second.x_adv)


def test_more_steps_are_never_weaker(shapes_clf, standing):
    x, y = standing
    short, long = (apgd(shapes_clf, x, y, eps=1 / 255, steps=s, seed=0).success.sum() for s in (5, 20))
    assert long >= short


def test_apgd_history_is_per_restart_and_nan_where_a_sample_did_not_run(shapes_clf, standing):
    x, y = standing
    result = apgd(shapes_clf, x, y, eps=4 / 255, steps=3, restarts=2, seed=0)
    assert result.loss_history.shape == (2, 4, len(x))
    assert torch.isfinite(result.loss_history[0]).all()
    # the second restart ran only on the samples the first one left standing
    ran = torch.isfinite(result.loss_history[1, 0])
    assert ran.sum() < len(x)


def test_apgd_t_aims_at_classes_other_than_the_label(shapes_clf, standing):
    """A target equal to the label would make targeted DLR identically zero: no sample would move."""
    x, y = standing
    result = apgd_targeted(shapes_clf, x[:20], y[:20], eps=4 / 255, steps=3, num_targets=1, seed=0)
    assert (result.loss_history[0, 0].abs() > 0).all()


def test_eot_apgd_runs_on_a_randomised_defence(shapes_clf, batch):
    x, y = batch
    model = cliplab.Denoised(shapes_clf, cliplab.GaussianNoise(0.05))
    result = apgd(model, x, y, eps=4 / 255, steps=3, eot_samples=4, seed=0)
    assert (result.x_adv - x).abs().amax() <= 4 / 255 + 1e-6


# ------------------------------------------------------------------------ early stopping: less work, same result
class Counted(torch.nn.Module):
    """A model that counts the images its forward passes see, and those of them whose gradient is taken."""

    def __init__(self, model):
        super().__init__()
        self.model, self.images, self.with_gradient = model, 0, 0
        self.num_classes = model.num_classes

    def forward(self, x):
        self.images += len(x)
        self.with_gradient += len(x) * torch.is_grad_enabled()
        return self.model(x)


def test_apgd_takes_no_gradient_at_its_final_iterate(shapes_clf, standing):
    """The final iterate is only judged, no step follows it: one forward pass per sample without a gradient, and a
    gradient at each of the ``steps`` iterates before it."""
    x, y = standing
    model = Counted(shapes_clf)
    apgd(model, x, y, eps=2 / 255, steps=5, seed=0)
    assert (model.with_gradient, model.images) == (5 * len(x), 6 * len(x))


@pytest.mark.parametrize("name", ATTACKS)
def test_early_stop_changes_the_cost_not_the_result(shapes_clf, standing, name):
    """A fooled sample leaves the batch: the same samples are fooled, for fewer passes (the random starts, windows
    and signs of every sample are drawn as without early stopping)."""
    x, y = standing
    attack = {"apgd-ce": lambda m, **kw: apgd(m, x, y, eps=2 / 255, steps=10, seed=0, **kw),
              "apgd-dlr": lambda m, **kw: apgd(m, x, y, eps=2 / 255, steps=10, loss="dlr", restarts=2, seed=0, **kw),
              "apgd-t": lambda m, **kw: apgd_targeted(m, x, y, eps=2 / 255, steps=10, num_targets=3, seed=0, **kw),
              "square": lambda m, **kw: square(m, x, y, eps=2 / 255, queries=50, seed=0, **kw)}[name]
    full, early = Counted(shapes_clf), Counted(shapes_clf)
    everything, stopped = attack(full), attack(early, early_stop=True)
    assert 0 < int(stopped.success.sum()) < len(x)
    assert torch.equal(stopped.success, everything.success)
    assert early.images < full.images
    with torch.no_grad():  # each success is real: the returned image is misclassified
        assert torch.equal(shapes_clf(stopped.x_adv).argmax(1) != y, stopped.success)
    assert (stopped.x_adv - x).abs().amax() <= 2 / 255 + 1e-6


def test_early_stop_ends_a_run_once_every_sample_is_fooled(shapes_clf, standing):
    x, y = standing
    model = Counted(shapes_clf)
    result = apgd(model, x[:8], y[:8], eps=1.0, steps=20, seed=0, early_stop=True)
    assert result.success.all() and model.images < 8 * 21
    assert torch.isnan(result.loss_history[0, -1]).all()  # the last steps ran on no sample


# ------------------------------------------------------------------- strength: parity with torchattacks
@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_not_weaker_than_torchattacks(shapes_clf, standing, loss):
    import torchattacks  # installed by the README's test command: missing it is an error, not a skip

    x, y = standing
    eps = 1 / 255  # robust accuracy strictly between 0 and 1 here, so the comparison bites
    ours = _robust(shapes_clf, apgd(shapes_clf, x, y, eps=eps, steps=10, loss=loss, seed=0).x_adv, y)
    theirs = _robust(shapes_clf, torchattacks.APGD(shapes_clf, eps=eps, steps=10, loss=loss, seed=0)(x, y), y)
    assert 0.05 < theirs < 0.95, "vacuous comparison"
    assert ours <= theirs + 0.03, f"cliplab APGD-{loss} robust acc {ours:.1%} vs torchattacks {theirs:.1%}"


def test_apgd_t_not_weaker_than_torchattacks(shapes_clf, standing):
    import torchattacks

    x, y = standing[0][:60], standing[1][:60]
    eps = 1 / 255
    ours = _robust(shapes_clf, apgd_targeted(shapes_clf, x, y, eps=eps, steps=10, num_targets=3, seed=0).x_adv, y)
    reference = torchattacks.APGDT(shapes_clf, eps=eps, steps=10, n_classes=shapes_clf.num_classes, seed=0)
    reference.n_target_classes = 3
    theirs = _robust(shapes_clf, reference(x, y), y)
    assert 0.05 < theirs < 0.95, "vacuous comparison"
    assert ours <= theirs + 0.03, f"cliplab APGD-T robust acc {ours:.1%} vs torchattacks {theirs:.1%}"


def test_square_fools_the_model_without_gradients(shapes_clf, standing):
    x, y = standing[0][:40], standing[1][:40]
    with torch.no_grad():
        result = square(shapes_clf, x, y, eps=8 / 255, queries=100, seed=0)
    assert result.success.float().mean() >= 0.5
    # the margin never falls: a query is only kept when it helps
    assert (result.loss_history[0].diff(dim=0) >= 0).all()
