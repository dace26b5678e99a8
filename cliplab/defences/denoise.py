"""Edge-preserving denoisers on [0, 1] images, built on kornia: functions, and modules for ``Denoised`` to wrap. An
attack through the bilateral filter on the CPU differentiates kornia's filter summed tap by tap
(``_bilateral_taps``), whose backward is faster than that through kornia's unfolded windows.

Every denoiser is differentiable, so ``pgd(Denoised(classifier, denoiser), ...)`` is an adaptive attack
through the denoiser (Athalye et al. 2018); a random denoiser plus ``eot_samples`` is EOT.

The functions (``bilateral``, ...) are the boundary a user crosses with images: they check the [0, 1] contract
and their sigmas. The modules (``Bilateral``, ...) check their settings once, when built, and then only the
shape of what they receive, which needs no host sync: inside an attack they run at every step, and after
``GaussianNoise`` in a chain their input legitimately leaves [0, 1].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from kornia.filters import bilateral_blur, get_gaussian_kernel2d, guided_blur, median_blur
from torch import nn

from .._arguments import check_images, check_positive


def check_kernel_size(kernel_size: int) -> None:
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int (3, 5, 7, ...), got {kernel_size!r}")


def _sigma_tensor(sigma, name: str, x: torch.Tensor) -> torch.Tensor:
    """A scalar or per-sample (N,) sigma as an (N,) tensor on x's device, validated > 0."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(len(x))
    if sigma.shape != (len(x),):
        raise ValueError(f"{name} must be a number or a tensor of shape ({len(x)},), got shape {tuple(sigma.shape)}")
    if not torch.isfinite(sigma).all() or (sigma <= 0).any():
        raise ValueError(f"{name} must be > 0 and finite, got values in [{sigma.min().item():.3g}, {sigma.max().item():.3g}]")
    return sigma


def bilateral(x: torch.Tensor, *, sigma_space, sigma_color=0.1, kernel_size: int = 5) -> torch.Tensor:
    """Bilateral filter (Tomasi & Manduchi 1998): a Gaussian blur whose weights fall with colour distance.

    Args:
        x: (N, 3, H, W) images in [0, 1].
        sigma_space: spatial sigma in pixels; a number, or an (N,) tensor (one sigma per image).
        sigma_color: colour sigma in [0, 1] intensity units (L1 distance over channels); number or (N,).
        kernel_size: odd window size.

    Returns:
        (N, 3, H, W) filtered images.
    """
    check_images(x)
    check_kernel_size(kernel_size)
    return _bilateral(x, _sigma_tensor(sigma_space, "sigma_space", x), _sigma_tensor(sigma_color, "sigma_color", x),
                      kernel_size)


def _bilateral(x: torch.Tensor, space: torch.Tensor, color: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """``bilateral`` without checks: (N,) spatial and colour sigmas, already valid. Where autograd records the filter
    on the CPU (an attack through it), ``_bilateral_taps``; elsewhere kornia's ``bilateral_blur``, which without a
    gradient loops over the taps in place on the CPU itself, and whose few large kernels suit a GPU."""
    if x.device.type == "cpu" and torch.is_grad_enabled() and x.requires_grad:
        return _bilateral_taps(x, space, color, kernel_size)
    return bilateral_blur(x, kernel_size, color, space[:, None].expand(-1, 2), border_type="reflect")


def _bilateral_taps(x: torch.Tensor, space: torch.Tensor, color: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """kornia's ``bilateral_blur`` (reflected border, L1 colour distance over the channels, the spatial kernel of
    ``get_gaussian_kernel2d``), each of the k x k taps in turn: its weight from a shifted view of the padded image,
    with kornia's expression, added to the weighted sum and to the normaliser. The same weights, summed in another
    order: fp32 results agree with kornia's to about 1e-6, gradients to about 1e-5 (tests/test_denoise.py).

    kornia differentiates every k x k window unfolded into (N, C, H, k, W, k) temporaries: forward and backward through
    them took 2.6x as long as through these taps on one CPU thread (2,000 images of 32x32,
    ``benchmarks/bench_defences.py --bench filter``). Every temporary here is one image's size."""
    height, width = x.shape[-2:]
    pad = kernel_size // 2
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    spatial = get_gaussian_kernel2d(kernel_size, space[:, None].expand(-1, 2), device=x.device, dtype=x.dtype)
    spatial = spatial.view(-1, kernel_size * kernel_size, 1, 1)  # (N, k*k, 1, 1), a tap's weight in space per image
    scale = (-0.5 / color**2).view(-1, 1, 1, 1)
    weighted = normaliser = None
    for tap in range(kernel_size * kernel_size):
        dy, dx = divmod(tap, kernel_size)
        shifted = padded[..., dy:dy + height, dx:dx + width]
        distance = (shifted - x).abs().sum(1, keepdim=True).square()
        weight = spatial[:, tap:tap + 1] * (scale * distance).exp()  # (N, 1, H, W)
        if weighted is None:
            weighted, normaliser = shifted * weight, weight
        else:
            weighted, normaliser = weighted.addcmul(shifted, weight), normaliser + weight
    return weighted / normaliser


def _per_image(sigma: float, x: torch.Tensor) -> torch.Tensor:
    """A sigma checked at construction, as the (N,) tensor the kernels take."""
    return torch.full((len(x),), sigma, dtype=x.dtype, device=x.device)


def guided(x: torch.Tensor, *, eps: float = 0.01, kernel_size: int = 5) -> torch.Tensor:
    """Self-guided filter (He et al. 2013): locally linear in the image itself, edge-preserving.

    ``eps`` (> 0) is the regularisation: edges with local variance well above it are kept.
    """
    check_images(x)
    check_kernel_size(kernel_size)
    check_positive(eps, "eps")
    return guided_blur(x, x, kernel_size, eps)


def median(x: torch.Tensor, *, kernel_size: int = 3) -> torch.Tensor:
    """Median filter, the classic non-linear denoiser (its gradient flows through the selected pixel)."""
    check_images(x)
    check_kernel_size(kernel_size)
    return median_blur(x, kernel_size)


def bilateral_sweep(x: torch.Tensor, sigmas_space, *, sigma_color=0.1, kernel_size: int = 5) -> torch.Tensor:
    """Filter every image with every spatial sigma in one batched call. (N,3,H,W), S sigmas -> (S,N,3,H,W).

    One call saves kernel launches on a GPU, where kornia's window unfolding makes its memory grow with
    N * S (benchmarks/RESULTS.md). On a CPU it is the same arithmetic as a loop over sigmas.
    """
    sigmas = torch.as_tensor(sigmas_space, dtype=x.dtype, device=x.device).flatten()
    batch = x.repeat(len(sigmas), 1, 1, 1)  # (S*N, 3, H, W), sigma-major
    out = bilateral(batch, sigma_space=sigmas.repeat_interleave(len(x)), sigma_color=sigma_color,
                    kernel_size=kernel_size)
    return out.view(len(sigmas), *x.shape)


class Bilateral(nn.Module):
    """``bilateral`` as a module with fixed sigmas."""

    def __init__(self, sigma_space: float = 1.0, sigma_color: float = 0.1, kernel_size: int = 5):
        super().__init__()
        check_positive(sigma_space, "sigma_space")
        check_positive(sigma_color, "sigma_color")
        check_kernel_size(kernel_size)
        self.sigma_space, self.sigma_color, self.kernel_size = sigma_space, sigma_color, kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, values=False)
        return _bilateral(x, _per_image(self.sigma_space, x), _per_image(self.sigma_color, x), self.kernel_size)


class RandomBilateral(nn.Module):
    """Bilateral filter with a spatial sigma drawn uniformly per image at every call, as in the original
    study (kernel 5, sigma in [0.05, 4.95]): a randomised defence, to be attacked with EOT."""

    def __init__(self, sigma_range: tuple[float, float] = (0.05, 4.95), sigma_color: float = 0.1,
                 kernel_size: int = 5):
        super().__init__()
        low, high = sigma_range
        check_positive(low, "sigma_range[0]")
        if not high >= low:
            raise ValueError(f"sigma_range must be (low, high) with high >= low, got {sigma_range}")
        check_positive(sigma_color, "sigma_color")
        check_kernel_size(kernel_size)
        self.sigma_range, self.sigma_color, self.kernel_size = (low, high), sigma_color, kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self.sigma_range
        check_images(x, values=False)
        sigma = low + (high - low) * torch.rand(len(x), device=x.device, dtype=x.dtype)
        return _bilateral(x, sigma, _per_image(self.sigma_color, x), self.kernel_size)


class Median(nn.Module):
    def __init__(self, kernel_size: int = 3):
        super().__init__()
        check_kernel_size(kernel_size)
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, values=False)
        return median_blur(x, self.kernel_size)


class Guided(nn.Module):
    def __init__(self, eps: float = 0.01, kernel_size: int = 5):
        super().__init__()
        check_positive(eps, "eps")
        check_kernel_size(kernel_size)
        self.eps, self.kernel_size = eps, kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, values=False)
        return guided_blur(x, x, self.kernel_size, self.eps)
