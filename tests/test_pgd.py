"""cliplab.pgd and attack_objective: the data contract, the evaluation protocol's sanity checks (threat model
respected, robust <= clean, more steps or restarts never weaker, same seed -> same result), argument
validation, and the attack's strength on the trained `shapes` CLIP (compared with torchattacks)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import cliplab
from cliplab import attack_objective, pgd
from cliplab.study import random_targets

EPS_COMPARE = 1 / 255  # torchattacks comparison: robust accuracy is between 0 and clean there, so it bites


def _assert_genuine(model, result, y, targeted):
    """The reported logits are those of x_adv and the reported success is what they say."""
    with torch.no_grad():
        logits = model(result.x_adv)
    torch.testing.assert_close(result.logits, logits, atol=1e-4, rtol=1e-4)
    reached = logits.argmax(1) == y if targeted else logits.argmax(1) != y
    assert torch.equal(result.success, reached)


# ------------------------------------------------------------------------------------- data contract
@pytest.mark.parametrize("loss", ["ce", "margin", "dlr"])
@pytest.mark.parametrize("norm, eps", [("linf", 4 / 255), ("l2", 0.5)])
def test_adversarial_images_respect_threat_model(shapes_clf, batch, norm, eps, loss):
    x, y = batch
    result = pgd(shapes_clf, x, y, eps=eps, steps=4, norm=norm, loss=loss, seed=0)
    assert result.x_adv.shape == x.shape and result.x_adv.dtype == x.dtype
    assert result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    delta = (result.x_adv - x).flatten(1)
    if norm == "linf":
        assert delta.abs().amax() <= eps + 1e-6
    else:
        assert (delta.norm(dim=1) <= eps + 1e-5).all()
    assert (delta != 0).any(), "the attack never moved the images"
    assert result.success.dtype == torch.bool and result.success.shape == (len(x),)
    assert result.logits.shape == (len(x), shapes_clf.num_classes)
    assert torch.isfinite(result.loss_history).all()
    _assert_genuine(shapes_clf, result, y, targeted=False)


def test_zero_eps_leaves_images_unchanged(shapes_clf, batch):
    x, y = batch
    result = pgd(shapes_clf, x, y, eps=0.0, steps=2, seed=0)
    assert torch.equal(result.x_adv, x)
    with torch.no_grad():
        assert torch.equal(result.success, shapes_clf(x).argmax(1) != y)


def test_loss_history_shape_and_start(shapes_clf, batch):
    x, y = batch
    result = pgd(shapes_clf, x, y, eps=2 / 255, steps=3, restarts=2, random_start=False, seed=0)
    assert result.loss_history.shape == (2, 3 + 1, len(x))
    with torch.no_grad():
        clean_objective = attack_objective(shapes_clf(x), y, "ce", targeted=False)
    # without a random start every restart begins at the clean image
    torch.testing.assert_close(result.loss_history[:, 0], clean_objective.expand(2, -1), atol=1e-4, rtol=1e-4)
    # PGD ascends: over the run the objective of most samples goes up
    assert (result.loss_history[0, -1] > result.loss_history[0, 0]).float().mean() > 0.5


def test_robust_accuracy_not_above_clean(shapes_clf, shapes_test):
    x, y, _ = shapes_test
    r = cliplab.pgd_accuracy(shapes_clf, x[:64], y[:64], eps=1 / 255, steps=3, seed=0, progress=False)
    assert r.clean.n == r.robust.n == 64
    assert r.robust.hits <= r.clean.hits
    assert r.success.n == r.clean.hits
    assert r.robust.hits == r.clean.hits - r.success.hits


def test_more_restarts_never_weaker(shapes_clf, batch):
    x, y = batch
    kwargs = dict(eps=1 / 255, alpha=0.5 / 255, steps=2, seed=0)
    one, three = pgd(shapes_clf, x, y, restarts=1, **kwargs), pgd(shapes_clf, x, y, restarts=3, **kwargs)
    assert 0 < one.success.sum() < len(x), "vacuous: pick an eps where some but not all attacks succeed"
    # same seed: the first restart is the same run, later restarts can only add to it
    torch.testing.assert_close(three.loss_history[0], one.loss_history[0])
    assert (three.success | ~one.success).all()
    for result in (one, three):
        # a failed sample keeps its strongest iterate over all steps and restarts
        failed = ~result.success
        kept = attack_objective(result.logits, y, "ce", targeted=False)
        torch.testing.assert_close(kept[failed], result.loss_history.amax(dim=(0, 1))[failed], atol=1e-4, rtol=1e-4)
    both_failed = ~one.success & ~three.success
    assert (attack_objective(three.logits, y, "ce", False)[both_failed]
            >= attack_objective(one.logits, y, "ce", False)[both_failed] - 1e-5).all()


def test_more_steps_never_weaker(shapes_clf, batch):
    x, y = batch
    kwargs = dict(eps=1 / 255, alpha=0.5 / 255, seed=0)  # a fixed alpha: the first iterates coincide
    short, long = pgd(shapes_clf, x, y, steps=1, **kwargs), pgd(shapes_clf, x, y, steps=4, **kwargs)
    torch.testing.assert_close(long.loss_history[0, :2], short.loss_history[0])
    assert (long.success | ~short.success).all()


def test_same_seed_same_result(shapes_clf, batch):
    x, y = batch
    a, b = (pgd(shapes_clf, x, y, eps=4 / 255, steps=3, seed=123) for _ in range(2))
    assert torch.equal(a.x_adv, b.x_adv)
    assert torch.equal(a.success, b.success)
    assert torch.equal(a.loss_history, b.loss_history)
    c = pgd(shapes_clf, x, y, eps=4 / 255, steps=3, seed=124)
    assert not torch.equal(a.loss_history[0, 0], c.loss_history[0, 0]), "seed does not reach the random start"


def test_a_given_start_replaces_the_random_one_and_can_be_split_by_rows(shapes_clf, batch):
    """What distributed training relies on: a start drawn for a whole batch, then split, attacks each part exactly
    as the seeded attack of the whole batch would (PGD's random start, and pgd_maximize's)."""
    from cliplab.attacks.pgd import pgd_maximize
    from cliplab.attacks.common import random_delta

    x, y = batch
    start = random_delta(x, 4 / 255, "linf", torch.Generator().manual_seed(123))
    whole = pgd(shapes_clf, x, y, eps=4 / 255, steps=3, seed=123)
    halves = [pgd(shapes_clf, x[rows], y[rows], eps=4 / 255, steps=3, start=start[rows])
              for rows in (slice(0, 8), slice(8, 16))]
    assert torch.equal(torch.cat([half.x_adv for half in halves]), whole.x_adv)
    clean = shapes_clf.image_features(x)
    distance = lambda images: (shapes_clf.image_features(images) - clean).pow(2).sum(1)  # noqa: E731
    settings = dict(eps=4 / 255, alpha=1 / 255, steps=2)
    seeded = pgd_maximize(distance, x, **settings, generator=torch.Generator().manual_seed(123))
    assert torch.equal(pgd_maximize(distance, x, **settings, start=start), seeded)
    with pytest.raises(ValueError, match=r"start must be a perturbation of x's shape \(16, 3, 32, 32\)"):
        pgd(shapes_clf, x, y, eps=4 / 255, start=start[:8])


def test_seed_none_uses_global_generator(shapes_clf, batch):
    x, y = batch
    torch.manual_seed(5)
    a = pgd(shapes_clf, x, y, eps=4 / 255, steps=1)
    torch.manual_seed(5)
    b = pgd(shapes_clf, x, y, eps=4 / 255, steps=1)
    assert torch.equal(a.x_adv, b.x_adv)


def test_targeted_success_means_prediction_is_target(shapes_clf, batch):
    x, y = batch
    targets = random_targets(y, shapes_clf.num_classes, seed=0)
    result = pgd(shapes_clf, x, targets, eps=16 / 255, steps=5, targeted=True, seed=0)
    assert result.success.any(), "a targeted attack at eps=16/255 should reach some targets"
    _assert_genuine(shapes_clf, result, targets, targeted=True)
    assert (result.logits.argmax(1)[result.success] == targets[result.success]).all()


def test_early_stop_still_returns_successes(shapes_clf, batch):
    x, y = batch
    full = pgd(shapes_clf, x, y, eps=2 / 255, steps=4, seed=0)
    early = pgd(shapes_clf, x, y, eps=2 / 255, steps=4, seed=0, early_stop=True)
    assert early.success.any()
    assert early.loss_history.shape == full.loss_history.shape
    _assert_genuine(shapes_clf, early, y, targeted=False)
    # only floating-point noise from the changing batch composition can separate the two runs
    assert abs(int(early.success.sum()) - int(full.success.sum())) <= 1


def test_y_none_attacks_the_predicted_labels(shapes_clf, batch):
    x, _ = batch
    with torch.no_grad():
        predicted = shapes_clf(x).argmax(1)
    implicit = pgd(shapes_clf, x, None, eps=2 / 255, steps=2, seed=0)
    explicit = pgd(shapes_clf, x, predicted, eps=2 / 255, steps=2, seed=0)
    assert torch.equal(implicit.x_adv, explicit.x_adv)
    assert torch.equal(implicit.success, explicit.success)
    _assert_genuine(shapes_clf, implicit, predicted, targeted=False)


def test_restores_training_mode(toy_model, batch):
    x, y = batch
    y = y % 10
    toy_model.train()
    seen = []
    hook = toy_model.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    pgd(toy_model, x, y, eps=2 / 255, steps=2, seed=0)
    hook.remove()
    assert toy_model.training, "pgd must restore model.training"
    assert seen and not any(seen[1:]), "the attack itself must run the model in eval mode"
    toy_model.eval()
    pgd(toy_model, x, y, eps=2 / 255, steps=2, seed=0)
    assert not toy_model.training


def test_y_none_labels_come_from_eval_mode(toy_model, batch):
    """y=None means "the model's own prediction", and the attack runs the model in eval mode: the label
    must be the eval-mode prediction too, else a zero perturbation already counts as a success."""
    x, _ = batch
    toy_model.train()  # dropout active, as inside a fine-tuning loop
    result = pgd(toy_model, x, None, eps=0.0, steps=1, seed=0)
    assert toy_model.training
    assert not result.success.any(), "eps=0 changes nothing, so nothing can have been fooled"


def test_no_side_effects_on_batchnorm_statistics(batch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 30 * 30, 10)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = batch
    pgd(model, x, y % 10, eps=2 / 255, steps=2, seed=0)
    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"pgd changed the model's state: {changed}"


def test_model_without_num_classes_and_no_parameter_grads(toy_model, batch):
    x, y = batch
    result = pgd(toy_model, x, y % 10, eps=8 / 255, steps=3, seed=0)
    assert result.logits.shape == (len(x), 10)
    assert all(p.grad is None for p in toy_model.parameters()), "gradients must be taken on the input only"
    _assert_genuine(toy_model, result, y % 10, targeted=False)


def test_eot_on_a_stochastic_model(toy_model, batch):
    class Noisy(nn.Module):  # a randomised defence: Gaussian noise, then classify
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x + 0.05 * torch.randn_like(x))

    x, y = batch
    calls = []
    model = Noisy(toy_model)
    model.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    result = pgd(model, x, y % 10, eps=4 / 255, steps=2, eot_samples=4, seed=0)
    assert (result.x_adv - x).abs().amax() <= 4 / 255 + 1e-6
    assert 0 <= result.x_adv.min() and result.x_adv.max() <= 1
    assert 4 * len(x) in calls, "EOT draws must run as one batch"


# --------------------------------------------------------------------------------- attack_objective
def test_margin_positive_exactly_when_attack_succeeds():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2000, 10, generator=generator) * 3
    y = torch.randint(10, (2000,), generator=generator)
    untargeted = attack_objective(logits, y, "margin", targeted=False)
    targeted = attack_objective(logits, y, "margin", targeted=True)
    assert torch.equal(untargeted > 0, logits.argmax(1) != y)
    assert torch.equal(targeted > 0, logits.argmax(1) == y)
    # DLR is the margin over a positive spread: same sign, and invariant to the logit scale
    for targeted_ in (False, True):
        margin = attack_objective(logits, y, "margin", targeted_)
        dlr = attack_objective(logits, y, "dlr", targeted_)
        assert torch.isfinite(dlr).all()
        assert torch.equal(dlr > 0, margin > 0)
        torch.testing.assert_close(attack_objective(100 * logits, y, "dlr", targeted_), dlr, rtol=1e-4, atol=1e-4)
    ce = attack_objective(logits, y, "ce", targeted=False)
    torch.testing.assert_close(attack_objective(logits, y, "ce", targeted=True), -ce)
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits, y, reduction="none"))


def test_margin_of_attack_result_matches_success(shapes_clf, batch):
    x, y = batch
    result = pgd(shapes_clf, x, y, eps=2 / 255, steps=3, loss="margin", seed=0)
    assert torch.equal(attack_objective(result.logits, y, "margin", targeted=False) > 0, result.success)


# --------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("mutate, error, match", [
    (lambda x: torch.where(x > 0.5, float("nan"), x), ValueError, r"^x contains NaN"),
    (lambda x: torch.where(x > 0.5, float("inf"), x), ValueError, r"^x contains NaN or infinite"),
    (lambda x: x * 2, ValueError, r"^x must have values in \[0, 1\]"),
    (lambda x: x - 0.5, ValueError, r"^x must have values in \[0, 1\]"),
    (lambda x: x[0], ValueError, r"^x must have shape"),
    (lambda x: x[:, :1], ValueError, r"^x must have 3 channels"),
    (lambda x: (x * 255).to(torch.uint8), TypeError, r"^x must be a float"),
])
def test_bad_images_are_rejected(random_shapes_clf, batch, mutate, error, match):
    x, y = batch
    with pytest.raises(error, match=match):
        pgd(random_shapes_clf, mutate(x.clone()), y, eps=1 / 255)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(eps=-1 / 255), ValueError, r"^eps must be >= 0"),
    (dict(eps=2.0), ValueError, r"^eps must be in \[0, 1\]"),
    (dict(eps=float("nan")), TypeError, r"^eps"),
    (dict(eps=1 / 255, alpha=0.0), ValueError, r"^alpha must be > 0"),
    (dict(eps=1 / 255, alpha=-0.1), ValueError, r"^alpha must be > 0"),
    (dict(eps=1 / 255, steps=0), ValueError, r"^steps must be >= 1"),
    (dict(eps=1 / 255, steps=1.5), TypeError, r"^steps must be an int"),
    (dict(eps=1 / 255, restarts=0), ValueError, r"^restarts must be >= 1"),
    (dict(eps=1 / 255, eot_samples=0), ValueError, r"^eot_samples must be >= 1"),
    (dict(eps=1 / 255, norm="l1"), ValueError, r"^norm must be one of"),
    (dict(eps=1 / 255, loss="hinge"), ValueError, r"^loss must be one of"),
    (dict(eps=1 / 255, seed=2**64), ValueError, r"^seed must be below 2\*\*64"),
    (dict(eps=1 / 255, seed=-1), ValueError, r"^seed must be >= 0"),
])
def test_bad_attack_arguments_are_rejected(random_shapes_clf, batch, kwargs, error, match):
    x, y = batch
    with pytest.raises(error, match=match):
        pgd(random_shapes_clf, x, y, **kwargs)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(eps=1 / 255, eot_samples=0), ValueError, r"^eot_samples must be >= 1"),
    (dict(eps=-1 / 255), ValueError, r"^eps must be >= 0"),
])
def test_arguments_checked_before_the_model_runs_with_y_none(toy_model, batch, kwargs, error, match):
    """With y=None pgd first predicts the labels; arguments must still be validated, not crash inside."""
    x, _ = batch
    with pytest.raises(error, match=match):
        pgd(toy_model, x, None, **kwargs)


def test_empty_batch_is_rejected(random_shapes_clf, batch):
    x, y = batch
    with pytest.raises(ValueError, match=r"^x must hold at least one image \(N >= 1\)"):
        pgd(random_shapes_clf, x[:0], y[:0], eps=1 / 255)
    with pytest.raises(ValueError, match=r"^x must hold at least one image"):
        cliplab.eot_gradient(random_shapes_clf, x[:0], y[:0])


def test_eot_gradient_checks_labels_like_pgd(random_shapes_clf, batch):
    x, y = batch
    with pytest.raises(ValueError, match=r"^y must hold class indices in \[0, 99\]"):
        cliplab.eot_gradient(random_shapes_clf, x, y + 100)


def test_bad_labels_are_rejected(random_shapes_clf, batch):
    x, y = batch
    out_of_range = torch.full_like(y, random_shapes_clf.num_classes)
    with pytest.raises(ValueError, match=r"^y must hold class indices in \[0, 99\]"):
        pgd(random_shapes_clf, x, out_of_range, eps=1 / 255, targeted=True)
    with pytest.raises(ValueError, match=r"^y must hold class indices"):
        pgd(random_shapes_clf, x, y - 200, eps=1 / 255)
    with pytest.raises(ValueError, match=r"^y must have shape"):
        pgd(random_shapes_clf, x, y[:3], eps=1 / 255)
    with pytest.raises(TypeError, match=r"^y must be an integer"):
        pgd(random_shapes_clf, x, y.float(), eps=1 / 255)
    with pytest.raises(ValueError, match=r"^y \(the target classes\) is required"):
        pgd(random_shapes_clf, x, None, eps=1 / 255, targeted=True)


# ------------------------------------------------------------------- strength on the trained model
@pytest.fixture(scope="module")
def attacked(shapes_clf, shapes_test, shapes_pred):
    """The first 200 test images the trained model classifies correctly, with their labels."""
    x, y, _ = shapes_test
    correct = (shapes_pred == y).nonzero().squeeze(1)[:200]
    return x[correct], y[correct]


def test_untargeted_pgd_breaks_the_model(shapes_clf, attacked):
    x, y = attacked
    result = pgd(shapes_clf, x, y, eps=8 / 255, steps=10, seed=0)
    with torch.no_grad():
        robust = (shapes_clf(result.x_adv).argmax(1) == y).float().mean().item()
    assert robust <= 0.05, f"robust accuracy {robust:.1%} at eps=8/255: PGD is too weak"


def test_targeted_success_grows_with_eps(shapes_clf, attacked):
    x, y = attacked[0][:100], attacked[1][:100]
    targets = random_targets(y, shapes_clf.num_classes, seed=0)
    rates = [pgd(shapes_clf, x, targets, eps=e / 255, steps=10, targeted=True, seed=0).success.float().mean()
             for e in (1, 4, 16)]
    assert rates[0] < rates[1] < rates[2], f"targeted success at eps 1, 4, 16 /255: {rates}"
    assert rates[2] >= 0.5


@pytest.mark.slow
def test_not_weaker_than_torchattacks(shapes_clf, attacked):
    import torchattacks  # installed by the README's test command: missing it is an error, not a skip

    x, y = attacked
    eps, alpha, steps = EPS_COMPARE, 0.25 * EPS_COMPARE, 10
    ours = pgd(shapes_clf, x, y, eps=eps, alpha=alpha, steps=steps, seed=0)
    torch.manual_seed(0)
    theirs = torchattacks.PGD(shapes_clf, eps=eps, alpha=alpha, steps=steps, random_start=True)(x, y)
    with torch.no_grad():
        ours_acc = (shapes_clf(ours.x_adv).argmax(1) == y).float().mean().item()
        theirs_acc = (shapes_clf(theirs).argmax(1) == y).float().mean().item()
    assert 0.02 < theirs_acc, "vacuous comparison: both attacks saturate at this eps"
    assert ours_acc <= theirs_acc + 0.02, f"cliplab robust acc {ours_acc:.1%} vs torchattacks {theirs_acc:.1%}"

