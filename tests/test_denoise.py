"""Denoisers: differentiable (float64 gradcheck), edge-preserving, batched sweeps, clear errors."""
import pytest
import torch
from kornia.filters import bilateral_blur

from cliplab.defences import Bilateral, Guided, Median, RandomBilateral, bilateral, bilateral_sweep, guided, median


def small(dtype=torch.float64):
    return torch.rand(2, 3, 7, 7, dtype=dtype).requires_grad_(True)


@pytest.mark.parametrize("denoise", [
    lambda x: bilateral(x, sigma_space=1.0, sigma_color=0.2, kernel_size=3),
    lambda x: guided(x, eps=0.05, kernel_size=3),
    lambda x: median(x, kernel_size=3),
], ids=["bilateral", "guided", "median"])
def test_denoisers_pass_float64_gradcheck(denoise):
    assert torch.autograd.gradcheck(denoise, (small(),), eps=1e-6, atol=1e-4)


@pytest.mark.parametrize("kernel_size", [3, 5, 7])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_bilateral_on_the_cpu_is_kornias_filter(kernel_size, dtype, tolerance):
    """The CPU's tap-by-tap filter computes kornia's ``bilateral_blur`` (per-image sigmas, reflected border), values
    and input gradients, to rounding: the same weights, summed in another order."""
    torch.manual_seed(0)
    x = torch.rand(6, 3, 12, 10, dtype=dtype, requires_grad=True)
    space, color = 0.05 + 4.9 * torch.rand(6, dtype=dtype), 0.02 + 0.3 * torch.rand(6, dtype=dtype)
    ours = bilateral(x, sigma_space=space, sigma_color=color, kernel_size=kernel_size)
    theirs = bilateral_blur(x, kernel_size, color, space[:, None].expand(-1, 2), border_type="reflect")
    assert ours.dtype == dtype and torch.allclose(ours, theirs, atol=tolerance, rtol=0)
    upstream = torch.randn_like(ours)
    (ours_grad,), (theirs_grad,) = (torch.autograd.grad(out, x, upstream) for out in (ours, theirs))
    assert torch.allclose(ours_grad, theirs_grad, atol=10 * tolerance * theirs_grad.abs().max().item(), rtol=0)


def test_bilateral_per_image_sigmas_match_separate_calls():
    x = torch.rand(3, 3, 8, 8)
    sigmas = torch.tensor([0.3, 1.0, 2.5])
    together = bilateral(x, sigma_space=sigmas)
    apart = torch.cat([bilateral(x[i:i + 1], sigma_space=float(s)) for i, s in enumerate(sigmas)])
    assert torch.allclose(together, apart, atol=1e-6)


def test_sweep_is_one_call_equal_to_a_loop():
    x = torch.rand(4, 3, 8, 8)
    sigmas = [0.2, 0.8, 3.0]
    sweep = bilateral_sweep(x, sigmas, sigma_color=0.15, kernel_size=5)
    assert sweep.shape == (3, 4, 3, 8, 8)
    for s, out in zip(sigmas, sweep):
        assert torch.allclose(out, bilateral(x, sigma_space=s, sigma_color=0.15, kernel_size=5), atol=1e-6)


def test_bilateral_smooths_noise_but_keeps_a_step_edge():
    step = torch.full((1, 3, 16, 16), 0.2)
    step[..., 8:] = 0.8
    noisy = step + 0.03 * torch.randn_like(step)  # stays inside [0, 1]
    out = bilateral(noisy, sigma_space=2.0, sigma_color=0.1, kernel_size=5)
    assert (out - step).abs().mean() < (noisy - step).abs().mean() / 2  # noise removed
    assert out[..., 7].mean() < 0.25 and out[..., 8].mean() > 0.75  # the edge survives
    blurred = bilateral(noisy, sigma_space=2.0, sigma_color=100.0, kernel_size=5)  # ~ a Gaussian blur
    assert blurred[..., 8].mean() < 0.7


def test_random_bilateral_draws_a_sigma_per_image():
    x = torch.rand(1, 3, 8, 8).repeat(6, 1, 1, 1)
    out = RandomBilateral(sigma_range=(0.05, 4.95))(x)
    assert len({round(v, 5) for v in out.flatten(1).sum(1).tolist()}) > 1  # same input, different outputs
    torch.manual_seed(0)
    first = RandomBilateral()(x)
    torch.manual_seed(0)
    assert torch.equal(first, RandomBilateral()(x))


@pytest.mark.parametrize("make, match", [
    (lambda: Bilateral(kernel_size=4), "kernel_size"), (lambda: Bilateral(kernel_size=0), "kernel_size"),
    (lambda: Bilateral(kernel_size=-3), "kernel_size"), (lambda: Median(kernel_size=2), "kernel_size"),
    (lambda: Bilateral(sigma_space=0.0), "sigma_space"), (lambda: Bilateral(sigma_color=-1.0), "sigma_color"),
    (lambda: Guided(eps=0.0), "eps"), (lambda: RandomBilateral(sigma_range=(0.0, 1.0)), "sigma_range"),
    (lambda: RandomBilateral(sigma_range=(2.0, 1.0)), "sigma_range"),
])
def test_bad_construction_names_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("call, match", [
    (lambda x: bilateral(x * float("nan"), sigma_space=1.0), "NaN"),
    (lambda x: bilateral(x, sigma_space=torch.tensor([1.0, -1.0])), "sigma_space"),
    (lambda x: bilateral(x, sigma_space=torch.ones(3)), "sigma_space"),
    (lambda x: median(x, kernel_size=4), "kernel_size"),
    (lambda x: guided(x[:, :1], eps=0.1), "3 channels"),
])
def test_bad_calls_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.rand(2, 3, 8, 8))


def test_modules_take_any_range_and_match_the_checked_functions():
    """Inside a chain (after noise) a module's input leaves [0, 1]: the modules check shape only (no host sync),
    the functions, where a user hands in images, the [0, 1] contract."""
    x = torch.rand(2, 3, 8, 8)
    noisy = x + 0.3 * torch.randn_like(x)
    assert torch.equal(Bilateral(sigma_space=1.5)(x), bilateral(x, sigma_space=1.5))
    assert torch.equal(Median(3)(x), median(x, kernel_size=3))
    assert torch.equal(Guided(0.01)(x), guided(x, eps=0.01))
    for module in (Bilateral(), Median(), Guided(), RandomBilateral()):
        assert module(noisy).shape == x.shape
        with pytest.raises(ValueError, match="3 channels"):
            module(noisy[:, :1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bilateral(noisy, sigma_space=1.0)
