"""Randomized smoothing: Cohen et al. (2019) prediction with abstention and certified L2 radius, plus the soft
smoothed classifier (mean softmax over noise draws, Salman et al. 2019) as its differentiable forward.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import binom, norm
from torch import nn
from tqdm.auto import tqdm

from .. import _torch
from .._arguments import check_images, check_int, check_positive
from .._stats import clopper_pearson
from .wrappers import Wrapper

ABSTAIN = -1


class RandomizedSmoothing(Wrapper):
    """Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019) of a classifier, noise in [0,1] pixel space.

    The smoothed classifier g(x) = argmax_c P(f(x + N(0, sigma^2 I)) = c) is certifiably robust in L2 with
    radius sigma * PhiInv(pA). ``predict`` and ``certify`` estimate it by Monte Carlo; ``forward`` is the soft
    smoothed classifier, log of the mean softmax over ``num_noise`` draws, which attacks can differentiate.

    Args:
        classifier: base classifier, (N, 3, H, W) -> (N, C) logits.
        sigma: noise standard deviation in [0, 1] pixel units.
        batch_size: forward passes per batch in ``predict``/``certify`` (noise draws of several images
            are batched together).
        num_noise: noise draws per image in ``forward``.
        progress: show tqdm bars in ``predict``/``certify``.
    """

    def __init__(self, classifier: nn.Module, sigma: float, *, batch_size: int = 256, num_noise: int = 8,
                 progress: bool = False):
        super().__init__()
        check_positive(sigma, "sigma")
        check_int(batch_size, "batch_size")
        check_int(num_noise, "num_noise")
        self.classifier, self.sigma = classifier, sigma
        self.batch_size, self.num_noise, self.progress = batch_size, num_noise, progress

    def _classify(self, noisy: torch.Tensor) -> torch.Tensor:
        """Base-classifier logits in fp32. (B, 3, H, W) -> (B, C)."""
        return self.classifier(noisy).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Soft smoothed classifier: log E[softmax(f(x + noise))]. (N, 3, H, W) -> (N, C) log-probabilities."""
        noisy = x.repeat(self.num_noise, 1, 1, 1)  # (k*N, 3, H, W)
        noisy = noisy + self.sigma * torch.randn_like(noisy)
        probabilities = F.softmax(self._classify(noisy), dim=1).view(self.num_noise, len(x), -1)
        return probabilities.mean(dim=0).clamp_min(1e-12).log()

    @torch.no_grad()
    def sample_counts(self, x: torch.Tensor, n: int, *, seed: int | None = None) -> torch.Tensor:
        """Class counts of the base classifier over ``n`` noise draws per image. (N,3,H,W) -> (N, C) int64.

        The N*n noisy images are processed in batches of ``batch_size`` that mix draws of several
        images, so the cost is the same for many small images as for few large ones. ``x`` is moved to the
        classifier's device; the counts stay there.
        """
        check_images(x)
        check_int(n, "n")
        x = x.to(_torch.device_of(self.classifier, x.device))
        num_classes = _torch.num_classes(self.classifier, x)  # any classifier, with a num_classes attribute or not
        generator = torch.Generator(x.device).manual_seed(seed) if seed is not None else None
        counts = torch.zeros(len(x) * num_classes, dtype=torch.int64, device=x.device)  # flattened (N, C)
        with _torch.cast_cache(x.device):
            self._count(x, n, counts.view(len(x), num_classes), generator)
        return counts.view(len(x), num_classes)

    def _count(self, x, n, counts, generator) -> None:
        """Add the predictions on the N*n noisy images to ``counts`` (N, C), batch by batch."""
        total, flat = len(x) * n, counts.view(-1)
        for start in tqdm(range(0, total, self.batch_size), disable=not self.progress, desc="noise samples"):
            image = torch.arange(start, min(start + self.batch_size, total), device=x.device) // n  # (B,)
            noisy = x[image] + self.sigma * torch.randn(
                (len(image), *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
            prediction = self._classify(noisy).argmax(dim=1)
            flat.index_add_(0, image * counts.shape[1] + prediction, torch.ones_like(prediction))

    def predict(self, x: torch.Tensor, n: int, alpha: float = 0.001, *, seed: int | None = None) -> torch.Tensor:
        """Cohen et al.'s PREDICT: the top class, or -1 (abstain) when a two-sided binomial test cannot
        tell the top two counts apart at level ``alpha``. (N,3,H,W) -> (N,) int64.

        The returned class differs from g(x) with probability at most ``alpha``.
        """
        _check_alpha(alpha)
        counts = self.sample_counts(x, n, seed=seed)
        top2 = counts.topk(2, dim=1)
        n_a, n_b = top2.values.cpu().numpy().T
        # two-sided binomial test of n_a against p = 1/2 among n_a + n_b draws (symmetric, n_b <= n_a)
        p_values = np.minimum(1.0, 2 * binom.cdf(n_b, n_a + n_b, 0.5))
        classes = top2.indices[:, 0].cpu()
        return torch.where(torch.as_tensor(p_values <= alpha), classes, torch.full_like(classes, ABSTAIN))

    def certify(self, x: torch.Tensor, n0: int, n: int, alpha: float = 0.001, *, seed: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cohen et al.'s CERTIFY: guess the class from ``n0`` draws, bound its probability pA from below
        with ``n`` fresh draws (one-sided Clopper-Pearson at level ``alpha``), radius sigma * PhiInv(pA).

        Returns:
            classes (N,) int64, -1 where it abstains (pA <= 0.5); radii (N,) float L2 radii, 0 when abstaining.
        """
        _check_alpha(alpha)
        check_int(n0, "n0")
        check_int(n, "n")
        guess = self.sample_counts(x, n0, seed=seed).argmax(dim=1)
        counts = self.sample_counts(x, n, seed=None if seed is None else seed + 1)
        n_a = counts.gather(1, guess[:, None]).squeeze(1).cpu().numpy()
        p_a = torch.as_tensor(clopper_pearson(n_a, n, alpha)[0], dtype=torch.float64)  # one-sided lower bound
        certified = p_a > 0.5
        radii = torch.where(certified, self.sigma * torch.as_tensor(norm.ppf(p_a.numpy())), torch.zeros_like(p_a))
        classes = torch.where(certified, guess.cpu(), torch.full_like(guess.cpu(), ABSTAIN))
        return classes, radii.float()

    def largest_certifiable_radius(self, n: int, alpha: float = 0.001) -> float:
        """The largest L2 radius ``certify`` can return with ``n`` draws at ``alpha``, reached when every draw votes
        for the class: sigma * PhiInv(alpha^(1/n)), the one-sided Clopper-Pearson bound of n hits out of n. A limit
        of the Monte-Carlo budget, not of the model: nothing is certified beyond it (0 when even n agreeing draws
        certify nothing, alpha^(1/n) <= 1/2)."""
        _check_alpha(alpha)
        check_int(n, "n")
        return max(0.0, float(self.sigma * norm.ppf(clopper_pearson(n, n, alpha)[0])))


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
