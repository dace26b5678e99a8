"""Randomized smoothing on base classifiers whose answer is known, EOT, and the defence wrappers."""
import math

import pytest
import torch
from scipy.stats import norm
from torch import nn

import cliplab
from cliplab.defences import ABSTAIN, Denoised, GaussianNoise, RandomizedSmoothing


class Constant(nn.Module):
    """Always answers ``label``, whatever the noise: pA = 1."""

    num_classes = 4

    def __init__(self, label=2):
        super().__init__()
        self.label = label

    def forward(self, x):
        return nn.functional.one_hot(torch.full((len(x),), self.label), self.num_classes).float()


class SignOfFirstPixel(nn.Module):
    """Class 0 when the (noisy) first pixel is below its clean value of 0.5, class 1 above: under Gaussian
    noise both have probability 1/2, a vote that can never be called."""

    num_classes = 2

    def forward(self, x):
        above = (x[:, 0, 0, 0] > 0.5).long()
        return nn.functional.one_hot(above, 2).float()


class MeanThreshold(nn.Module):
    """Class 1 when the image mean exceeds 0.5. Under N(0, s^2) pixel noise the mean has std s/sqrt(d), so
    P(class 1) = Phi((m - 0.5) sqrt(d) / s) is known in closed form."""

    num_classes = 2

    def forward(self, x):
        return nn.functional.one_hot((x.flatten(1).mean(1) > 0.5).long(), 2).float()


def images(n=3, value=0.5, size=4):
    return torch.full((n, 3, size, size), value)


def test_constant_classifier_is_certified_with_the_exact_clopper_pearson_radius():
    smoothed = RandomizedSmoothing(Constant(2), sigma=0.25, batch_size=7)
    n, alpha = 200, 0.001
    classes, radii = smoothed.certify(images(), n0=10, n=n, alpha=alpha, seed=0)
    assert classes.tolist() == [2, 2, 2]
    # all n draws agree: the one-sided lower bound is alpha^(1/n), the radius sigma * PhiInv of it
    expected = 0.25 * norm.ppf(alpha ** (1 / n))
    assert torch.allclose(radii, torch.full((3,), expected, dtype=torch.float32), rtol=1e-5)
    assert smoothed.predict(images(), n=50, alpha=alpha, seed=0).tolist() == [2, 2, 2]


def test_coin_flip_classifier_abstains():
    smoothed = RandomizedSmoothing(SignOfFirstPixel(), sigma=0.5, batch_size=64)
    assert smoothed.predict(images(4), n=400, alpha=0.001, seed=0).tolist() == [ABSTAIN] * 4
    classes, radii = smoothed.certify(images(4), n0=50, n=400, alpha=0.001, seed=0)
    assert classes.tolist() == [ABSTAIN] * 4 and radii.eq(0).all()


def test_counts_match_the_closed_form_probability():
    sigma, size, mean = 1.0, 4, 0.53
    d = 3 * size * size
    p_one = norm.cdf((mean - 0.5) * math.sqrt(d) / sigma)  # ~0.60
    smoothed = RandomizedSmoothing(MeanThreshold(), sigma=sigma, batch_size=1000)
    counts = smoothed.sample_counts(images(2, mean, size), n=20_000, seed=0)
    assert counts.sum(1).tolist() == [20_000, 20_000]
    estimate = counts[:, 1].float() / 20_000
    assert torch.allclose(estimate, torch.full((2,), p_one, dtype=torch.float32), atol=0.015)  # ~4 std


def test_draws_of_many_images_are_batched_together():
    calls = []

    class Recording(Constant):
        def forward(self, x):
            calls.append(len(x))
            return super().forward(x)

    RandomizedSmoothing(Recording(), sigma=0.1, batch_size=100).sample_counts(images(7), n=30)
    assert calls == [100, 100, 10]  # 7 x 30 = 210 noisy images, mixed across images


def test_seed_reproducibility(random_shapes_clf, batch):
    x, _ = batch
    smoothed = RandomizedSmoothing(random_shapes_clf, sigma=0.5, batch_size=64)
    first = smoothed.sample_counts(x[:4], n=32, seed=3)
    assert torch.equal(first, smoothed.sample_counts(x[:4], n=32, seed=3))
    assert not torch.equal(first, smoothed.sample_counts(x[:4], n=32, seed=4))
    assert torch.equal(*(smoothed.certify(x[:4], n0=8, n=32, seed=5)[1] for _ in range(2)))


def test_soft_smoothed_classifier_is_differentiable_log_probabilities(random_shapes_clf, batch):
    x, y = batch
    smoothed = RandomizedSmoothing(random_shapes_clf, sigma=0.25, num_noise=4)
    out = smoothed(x[:4])
    assert out.shape == (4, 100)
    assert torch.allclose(out.exp().sum(1), torch.ones(4), atol=1e-4)
    grad = cliplab.eot_gradient(smoothed, x[:4], y[:4], eot_samples=2)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


class CyclingShift(nn.Module):
    """A 'random' transformation with known draws: the j-th block of a batch of k*N gets shift j."""

    num_classes = 10

    def __init__(self, base, shifts):
        super().__init__()
        self.base, self.shifts = base, shifts

    def forward(self, x):
        blocks = x.chunk(len(self.shifts))  # (k*N) -> k blocks of N, one per draw
        return torch.cat([self.base(b + s) for b, s in zip(blocks, self.shifts)])


def test_eot_gradient_is_the_mean_of_per_draw_gradients(toy_model):
    x, y = torch.rand(3, 3, 32, 32), torch.tensor([1, 4, 7])
    shifts = [torch.randn(1, 3, 32, 32) * 0.1 for _ in range(4)]
    model = CyclingShift(toy_model, shifts)
    eot = cliplab.eot_gradient(model, x, y, eot_samples=4)
    per_draw = [cliplab.eot_gradient(CyclingShift(toy_model, [s]), x, y) for s in shifts]
    assert torch.allclose(eot, torch.stack(per_draw).mean(0), atol=1e-6)


def test_defences_expose_the_classifier_and_attacks_run_through_them(random_shapes_clf, batch):
    x, y = batch
    defended = Denoised(random_shapes_clf, GaussianNoise(0.1))
    assert defended.num_classes == 100
    result = cliplab.pgd(defended, x, y, eps=4 / 255, steps=2, eot_samples=3, seed=0)
    assert (result.x_adv - x).abs().max() <= 4 / 255 + 1e-6
    votes = cliplab.predict(defended, x, votes=5)
    assert votes.shape == (16,) and votes.dtype == torch.int64


@pytest.mark.parametrize("kwargs, match", [
    (dict(sigma=0.0), "sigma"), (dict(sigma=-1.0), "sigma"), (dict(sigma=0.1, batch_size=0), "batch_size"),
    (dict(sigma=0.1, num_noise=0), "num_noise"),
])
def test_smoothing_rejects_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RandomizedSmoothing(Constant(), **kwargs)


@pytest.mark.parametrize("call, match", [
    (lambda s, x: s.predict(x, n=0), "n"), (lambda s, x: s.certify(x, n0=0, n=10), "n0"),
    (lambda s, x: s.certify(x, n0=10, n=0), "n"), (lambda s, x: s.predict(x, n=10, alpha=0.0), "alpha"),
    (lambda s, x: s.certify(x, n0=1, n=10, alpha=1.0), "alpha"),
    (lambda s, x: s.predict(x * float("nan"), n=10), "NaN"),
])
def test_smoothing_rejects_bad_calls(call, match):
    with pytest.raises(ValueError, match=match):
        call(RandomizedSmoothing(Constant(), sigma=0.1), images())


def test_gaussian_noise_rejects_bad_sigma():
    with pytest.raises(ValueError, match="sigma"):
        GaussianNoise(0)


def test_attacking_a_fresh_wrapper_leaves_the_wrapped_classifier_in_eval_mode(random_shapes_clf, batch):
    x, y = batch
    assert not random_shapes_clf.training
    defended = Denoised(random_shapes_clf, GaussianNoise(0.1))  # a new module starts in training mode
    cliplab.pgd(defended, x[:2], y[:2], eps=2 / 255, steps=1)
    assert defended.training and not random_shapes_clf.training
    assert not any(m.training for m in random_shapes_clf.modules())


class PlainWrapper(nn.Module):
    """Maps images to logits and nothing more: no ``num_classes``, as a user's own wrapper or a torchvision model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)


def test_noise_then_denoise_chains_attack_cleanly(random_shapes_clf, batch):
    from cliplab.defences import Bilateral, Median

    x, y = batch
    for denoiser in (Bilateral(), Median()):
        chain = Denoised(random_shapes_clf, nn.Sequential(GaussianNoise(0.1), denoiser))
        assert chain.denoiser(x).min() < 0  # the filter receives noisy images outside [0, 1]
        result = cliplab.pgd(chain, x, y, eps=4 / 255, steps=2, eot_samples=2, seed=0)
        assert (result.x_adv - x).abs().max() <= 4 / 255 + 1e-6
        report = cliplab.evaluate_robustness(chain, x, y, eps=4 / 255, attacks="rand", votes=3, progress=False,
                                             budget=cliplab.AttackBudget(steps=2, eot_samples=2))
        assert report.robust.n == len(x)


def test_smoothing_and_attacks_work_on_any_module_that_maps_images_to_logits(toy_model):
    import torchvision

    torch.manual_seed(0)
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for model in (PlainWrapper(toy_model), torchvision.models.resnet18(num_classes=10).eval()):
        smoothed = RandomizedSmoothing(model, sigma=0.25, batch_size=16)
        classes, radii = smoothed.certify(x, n0=4, n=16, seed=0)
        assert classes.shape == radii.shape == (4,)
        assert smoothed.predict(x, n=16, seed=0).shape == (4,)
        assert smoothed(x).shape == (4, 10)
        result = cliplab.pgd(Denoised(model, GaussianNoise(0.05)), x, y, eps=2 / 255, steps=1, seed=0)
        assert (result.x_adv - x).abs().max() <= 2 / 255 + 1e-6
        assert cliplab.pgd(smoothed, x, y, eps=2 / 255, steps=1, seed=0).x_adv.shape == x.shape


def test_the_largest_certifiable_radius_is_what_unanimous_draws_certify():
    """Every draw votes for one class: the certificate reaches sigma * PhiInv(alpha^(1/n)) and no further."""
    from scipy.stats import norm

    class Constant(torch.nn.Module):
        def forward(self, x):
            return torch.tensor([5.0, 0.0, 0.0]).expand(len(x), 3)

    smoothed = RandomizedSmoothing(Constant(), sigma=0.25)
    classes, radii = smoothed.certify(torch.rand(2, 3, 8, 8), n0=10, n=500, alpha=0.001, seed=0)
    limit = smoothed.largest_certifiable_radius(500, 0.001)
    assert classes.tolist() == [0, 0] and radii.tolist() == pytest.approx([limit] * 2, rel=1e-5)
    assert limit == pytest.approx(0.25 * norm.ppf(0.001 ** (1 / 500)))
    assert smoothed.largest_certifiable_radius(8, 0.001) == 0.0  # 8 agreeing draws certify nothing at alpha=0.001
