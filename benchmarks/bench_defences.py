"""Defence throughput: batched randomized smoothing and a batched bilateral sweep against loops, and cliplab's
bilateral filter against kornia's, in one process.

Three benchmarks, run together by default (``--bench`` picks one):

1. **Randomized smoothing** (``--bench smoothing``): noisy samples per second of the Monte Carlo step
   of Cohen et al.'s PREDICT/CERTIFY (add N(0, sigma^2) noise, sigma 0.25, classify, count the argmax)
   on a randomly initialised ViT-B-32 zero-shot classifier (``cliplab.load_classifier("ViT-B-32",
   pretrained=None)``, no download) with the 100 CIFAR-100 class names and the 18 CIFAR prompt templates.
   Inputs are random 32x32 images in [0, 1], resized to 224x224 inside the classifier. Methods:

   - ``RandomizedSmoothing.sample_counts``: the noisy samples of all the images are batched together,
     ``--batch-size`` per forward pass, and the text head is a buffer computed once.
   - naive full-CLIP loop (baseline a, "the original study's style"): for each image, for each noise
     draw, one noisy image per forward pass through the full CLIP forward, text encoder over all
     1800 class x template prompts included (``bench_attacks.naive_full_clip_logits``), argmax, count.
   - per-image loop, cached text head (baseline b, not a target of the issue): the same loop, but
     each forward is ``ZeroShotClassifier(noisy)``. It tells the two gains apart: (a)/(b) is what
     caching the text head saves, (b)/cliplab what batching saves.

   Everything runs under ``torch.no_grad()``. The warm-up of (a) is one full-CLIP forward of one noisy
   image, and its logits are checked against the classifier's (same math, so they must agree). One
   naive forward costs a text-encoder pass over all 1800 prompts (one to two minutes on one CPU core)
   and every draw costs the same, so on CPU the naive loop is timed on one image and one draw by default.

2. **Bilateral sweep** (``--bench denoise``): ``cliplab.defences.bilateral_sweep(x, sigmas)``, every
   image with each of 15 spatial sigmas (0.2, 0.4, ..., 3.0; colour sigma 0.1, kernel 5) in one
   batched call, against a Python loop over the sigmas calling ``bilateral(x, sigma_space=s)``, on
   ``--sweep-images`` random 32x32 images. Timed twice: forward only (under ``torch.no_grad()``), and
   forward+backward (input with ``requires_grad``, ``.sum().backward()``; in the loop, after each
   call), since attacks differentiate through the denoiser. Both do the same arithmetic; the batched
   call saves the per-call overhead (argument checks, kernel construction) and, on CUDA, kernel
   launches, but its temporaries are 15 times larger (kornia unfolds every 5x5 window: about 2 GB
   per temporary for 7500 images), which on CPU costs page faults (see ``benchmarks/RESULTS.md``).

3. **Bilateral filter** (``--bench filter``): ``cliplab.defences.bilateral`` (on the CPU tap by tap,
   ``denoise._bilateral_taps``) against kornia's ``bilateral_blur``, with the same per-image spatial sigmas
   drawn as ``RandomBilateral`` draws them (0.05..4.95; colour sigma 0.1, kernel 5), on ``--filter-images``
   random 32x32 images (2,000 by default: a batch of 02's EOT through the random bilateral blur, 100 images x
   20 draws), forward+backward (``torch.autograd.grad`` of the sum: what an attack through the filter runs).
   Without a gradient ``bilateral`` is kornia's own call (kornia 0.9 loops over the taps in place on the CPU).

Each method is warmed up once before it is timed (the denoisers on the first 50 images, where their
outputs and input gradients are also checked to agree); on CUDA the clock is read after
``torch.cuda.synchronize``. The batched methods and the loops other than (a) are timed ``--repeats``
times, interleaved so that they share any background load, and the fastest time of each is kept.
A CPU run with the defaults takes about 5-8 minutes on two shared cores: 2-4 in the text encoder
(the classifier's construction, the naive warm-up and the naive draw), 2-3 in the denoising
forward+backward passes.

Run (from the repository root, with the venv active)::

    python benchmarks/bench_defences.py                       # CUDA if available, else CPU
    python benchmarks/bench_defences.py --device cpu --threads 1
    python benchmarks/bench_defences.py --bench denoise --sweep-images 2000
    python benchmarks/bench_defences.py --bench filter --device cpu --threads 1

The tables are printed in Markdown, ready for ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import kornia
import open_clip
import torch

import cliplab
from bench_attacks import IMAGE_SIZE, MODEL, best_of, cpu_name, naive_full_clip_logits, setup, timed
from cliplab.defences import RandomizedSmoothing
from cliplab.defences import bilateral, bilateral_sweep

SIGMA = 0.25  # randomized smoothing noise, [0, 1] pixel units
SWEEP_SIGMAS = tuple(round(0.2 * k, 1) for k in range(1, 16))  # 0.2, 0.4, ..., 3.0
WARMUP_IMAGES = 50  # images of the denoising warm-up and agreement check


@dataclass
class Timing:
    """One timed method.

    Attributes:
        method: name shown in the table.
        batch: images per forward pass (smoothing) or per call (denoising).
        work: noisy samples classified (smoothing) or images filtered, counting each sigma (denoising).
        seconds: wall-clock time of the timed call(s).
        calls: calls of the timed function (denoising: 1 for the batched sweep, 15 for the loop).
    """

    method: str
    batch: int
    work: int
    seconds: float
    calls: int = 1

    @property
    def rate(self) -> float:
        """Work units per second."""
        return self.work / self.seconds


def speedup(ours: Timing, theirs: Timing) -> str:
    ratio = ours.rate / theirs.rate
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.0f}x"


# --- randomized smoothing --------------------------------------------------------------------------------


def naive_sample_counts(clf: cliplab.ZeroShotClassifier, tokenizer: Callable, x: torch.Tensor, n: int,
                        sigma: float, *, full_clip: bool = True) -> torch.Tensor:
    """Class counts over ``n`` noise draws per image, one noisy image per forward pass.

    Args:
        clf: the base classifier.
        tokenizer: the open_clip tokenizer of its model (used when ``full_clip``).
        x: (N, 3, H, W) images in [0, 1].
        n: noise draws per image.
        sigma: noise standard deviation.
        full_clip: run the full CLIP forward, text encoder included, on every draw (baseline a);
            otherwise call the classifier, whose text head is cached (baseline b).

    Returns:
        (N, num_classes) int64 counts.
    """
    counts = torch.zeros(len(x), clf.num_classes, dtype=torch.int64, device=x.device)
    with torch.no_grad():
        for i, image in enumerate(x.split(1)):
            for _ in range(n):
                noisy = image + sigma * torch.randn_like(image)
                logits = naive_full_clip_logits(clf, tokenizer, noisy) if full_clip else clf(noisy)
                counts[i, logits.argmax(dim=1)] += 1
    return counts


def check_naive_logits(clf: cliplab.ZeroShotClassifier, tokenizer: Callable, x: torch.Tensor) -> str:
    """Warm-up of baseline (a): one full-CLIP forward of one noisy image, compared with the classifier's."""
    noisy = x[:1] + SIGMA * torch.randn_like(x[:1])
    with torch.no_grad():
        naive, cached = naive_full_clip_logits(clf, tokenizer, noisy), clf(noisy)
    difference = (naive - cached).abs().max().item()
    agree = torch.equal(naive.argmax(dim=1), cached.argmax(dim=1))
    if not agree or difference > 1e-3 * cached.abs().max().item():
        raise AssertionError(f"naive full-CLIP logits disagree with the classifier's "
                             f"(max |diff| {difference:.3g})")
    return f"naive full-CLIP logits match the classifier's (max |diff| {difference:.2g})"


def bench_smoothing(clf, x: torch.Tensor, args: argparse.Namespace, tokenizer: Callable | None = None
                    ) -> list[Timing]:
    """Time ``sample_counts``, the cached per-image loop (b) and the naive full-CLIP loop (a).

    Returns:
        The timings of cliplab, (a) and (b), in table order.
    """
    device = x.device
    smoothing = RandomizedSmoothing(clf, SIGMA, batch_size=args.batch_size)
    tokenizer = tokenizer or open_clip.get_tokenizer(MODEL)
    few = x[:args.cached_images]

    def ours():
        counts = smoothing.sample_counts(x, args.draws)
        assert (counts.sum(dim=1) == args.draws).all()

    def cached():
        naive_sample_counts(clf, tokenizer, few, args.cached_draws, SIGMA, full_clip=False)

    smoothing.sample_counts(x[:1], min(args.batch_size, args.draws))  # warm-up: one full batch
    naive_sample_counts(clf, tokenizer, x[:1], 1, SIGMA, full_clip=False)
    seconds = best_of({"ours": ours, "cached": cached}, device, args.repeats)
    ours_timing = Timing("RandomizedSmoothing.sample_counts", args.batch_size, len(x) * args.draws,
                         seconds["ours"])
    cached_timing = Timing("per-image loop, cached text head (b)", 1, len(few) * args.cached_draws,
                           seconds["cached"])
    print(f"{ours_timing.method}: {ours_timing.rate:.3g} samples/s; {cached_timing.method}: "
          f"{cached_timing.rate:.3g}", flush=True)

    print(check_naive_logits(clf, tokenizer, x), flush=True)  # the warm-up of (a)
    naive_x = x[:args.baseline_images]
    seconds = timed(lambda: naive_sample_counts(clf, tokenizer, naive_x, args.baseline_draws, SIGMA), device)
    naive_timing = Timing("naive full-CLIP loop (a)", 1, len(naive_x) * args.baseline_draws, seconds)
    return [ours_timing, naive_timing, cached_timing]


def format_smoothing_table(timings: list[Timing], draws: dict[str, tuple[int, int]]) -> str:
    """Markdown table: one row per method, with cliplab's speed-up over each baseline."""
    ours = timings[0]
    lines = ["| method | batch | images x draws | noisy samples | seconds | samples/s | cliplab speed-up |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for timing in timings:
        images, n = draws[timing.method]
        ratio = "—" if timing is ours else speedup(ours, timing)
        lines.append(f"| {timing.method} | {timing.batch} | {images} x {n} | {timing.work} | {timing.seconds:.2f} "
                     f"| {timing.rate:.3g} | {ratio} |")
    return "\n".join(lines)


# --- bilateral sweep -------------------------------------------------------------------------------------


def bench_denoise(x: torch.Tensor, repeats: int) -> dict[str, tuple[Timing, Timing]]:
    """Time ``bilateral_sweep`` against a loop of ``bilateral`` calls, forward and forward+backward.

    Returns:
        For "forward" and "forward+backward": the timings of the batched sweep and of the loop.
    """
    sigmas, device = SWEEP_SIGMAS, x.device
    leaf = x.clone().requires_grad_(True)

    def sweep_forward():
        with torch.no_grad():
            return bilateral_sweep(x, sigmas)

    def loop_forward():
        with torch.no_grad():
            return [bilateral(x, sigma_space=s) for s in sigmas]

    def sweep_backward():
        leaf.grad = None
        bilateral_sweep(leaf, sigmas).sum().backward()
        return leaf.grad

    def loop_backward():
        leaf.grad = None
        for s in sigmas:
            bilateral(leaf, sigma_space=s).sum().backward()
        return leaf.grad

    # warm-up on a few images (the full size costs a minute on CPU), and the check that both methods
    # compute the same outputs and input gradients
    few = x[:WARMUP_IMAGES].clone().requires_grad_(True)
    outputs, gradients = [], []
    for method in (lambda z: bilateral_sweep(z, sigmas),
                   lambda z: torch.stack([bilateral(z, sigma_space=s) for s in sigmas])):
        few.grad = None
        output = method(few)
        output.sum().backward()
        outputs.append(output.detach())
        gradients.append(few.grad)
    torch.testing.assert_close(*outputs)
    torch.testing.assert_close(*gradients)

    work = len(x) * len(sigmas)
    results = {}
    for name, (batched, looped) in {"forward": (sweep_forward, loop_forward),
                                    "forward+backward": (sweep_backward, loop_backward)}.items():
        seconds = best_of({"batched": batched, "loop": looped}, device, repeats)
        results[name] = (Timing("bilateral_sweep", work, work, seconds["batched"]),
                         Timing("loop of bilateral", len(x), work, seconds["loop"], calls=len(sigmas)))
    return results


# --- the bilateral filter against kornia's -----------------------------------------------------------------


def bench_filter(x: torch.Tensor, repeats: int) -> dict[str, tuple[Timing, Timing]]:
    """Time cliplab's ``bilateral`` against kornia's ``bilateral_blur`` with the same per-image sigmas, forward and
    backward, after a warm-up on a few images that checks both give the same outputs and input gradients.

    Returns:
        For "forward+backward": the timings of cliplab's filter and of kornia's.
    """
    space = 0.05 + 4.9 * torch.rand(len(x), device=x.device)  # as RandomBilateral draws them
    color = torch.full_like(space, 0.1)
    filters = {"ours": lambda z: bilateral(z, sigma_space=space[:len(z)], sigma_color=color[:len(z)]),
               "kornia": lambda z: kornia.filters.bilateral_blur(z, 5, color[:len(z)],
                                                                 space[:len(z), None].expand(-1, 2),
                                                                 border_type="reflect")}
    few = x[:WARMUP_IMAGES].clone().requires_grad_(True)
    outputs = [f(few) for f in filters.values()]
    torch.testing.assert_close(*(out.detach() for out in outputs))
    torch.testing.assert_close(*(torch.autograd.grad(out.sum(), few)[0] for out in outputs))
    leaf = x.clone().requires_grad_(True)

    seconds = best_of({key: lambda f=f: torch.autograd.grad(f(leaf).sum(), leaf)[0] for key, f in filters.items()},
                      x.device, repeats)
    return {"forward+backward": (Timing("cliplab bilateral", len(x), len(x), seconds["ours"]),
                                 Timing("kornia bilateral_blur", len(x), len(x), seconds["kornia"]))}


def format_denoise_table(results: dict[str, tuple[Timing, Timing]], speedup_of: str = "batched") -> str:
    """Markdown table: one row per pass and method, with the first method's speed-up over the second."""
    lines = ["| pass | method | calls | images per call | filtered images | seconds | images/s "
             f"| {speedup_of} speed-up |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, (batched, looped) in results.items():
        for timing in (batched, looped):
            ratio = "—" if timing is batched else speedup(batched, looped)
            lines.append(f"| {name} | {timing.method} | {timing.calls} | {timing.batch} | {timing.work} "
                         f"| {timing.seconds:.3f} | {timing.rate:.3g} | {ratio} |")
    return "\n".join(lines)


# --- command line ----------------------------------------------------------------------------------------


def describe(device: torch.device, args: argparse.Namespace) -> str:
    """One line on the software, the hardware and the settings of the run."""
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    parts = [f"torch {torch.__version__}, open_clip {open_clip.__version__}, kornia {kornia.__version__}; "
             f"{device.type} ({hardware}), {torch.get_num_threads()} threads; best of {args.repeats}"]
    if args.bench in ("smoothing", "all"):
        parts.append(f"smoothing: {MODEL} random init, 100 classes x 18 templates, {IMAGE_SIZE}x{IMAGE_SIZE} "
                     f"inputs, sigma {SIGMA}, {args.images} images x {args.draws} draws, batch {args.batch_size}; "
                     f"naive loop (a) {args.baseline_images} image(s) x {args.baseline_draws} draw(s); "
                     f"cached loop (b) {args.cached_images} image(s) x {args.cached_draws} draws")
    if args.bench in ("denoise", "all"):
        parts.append(f"denoise: {args.sweep_images} images {IMAGE_SIZE}x{IMAGE_SIZE}, {len(SWEEP_SIGMAS)} spatial "
                     f"sigmas {SWEEP_SIGMAS[0]}..{SWEEP_SIGMAS[-1]}, colour sigma 0.1, kernel 5")
    if args.bench in ("filter", "all"):
        parts.append(f"filter: {args.filter_images} images {IMAGE_SIZE}x{IMAGE_SIZE}, a spatial sigma per image "
                     f"in 0.05..4.95, colour sigma 0.1, kernel 5")
    return "; ".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; defaults depend on the device (CPU runs are kept to a few minutes)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--bench", choices=("all", "smoothing", "denoise", "filter"), default="all")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=None,
                        help="images of sample_counts; default: 4 on cpu, 10 on cuda")
    parser.add_argument("--draws", type=int, default=None,
                        help="noise draws per image of sample_counts; default: 16 on cpu, 1000 on cuda")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="noisy samples per forward pass of sample_counts; default: 32 on cpu, 500 on cuda")
    parser.add_argument("--baseline-images", type=int, default=None,
                        help="images of the naive full-CLIP loop (a); default: 1 on cpu, 2 on cuda")
    parser.add_argument("--baseline-draws", type=int, default=None,
                        help="draws per image of the naive loop (a); default: 1 on cpu, 10 on cuda")
    parser.add_argument("--cached-images", type=int, default=None,
                        help="images of the cached per-image loop (b); default: 1 on cpu, 2 on cuda")
    parser.add_argument("--cached-draws", type=int, default=None,
                        help="draws per image of the cached loop (b); default: 16 on cpu, 200 on cuda")
    parser.add_argument("--sweep-images", type=int, default=500, help="images of the bilateral sweep")
    parser.add_argument("--filter-images", type=int, default=2000, help="images of the filter against kornia's")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved timings of the batched methods and of the cheap loops, the fastest "
                             "kept; default: 2 for smoothing, 3 for denoise only")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args(argv)
    on_cpu = args.device == "cpu"
    args.images = args.images or (4 if on_cpu else 10)
    args.draws = args.draws or (16 if on_cpu else 1000)
    args.batch_size = args.batch_size or (32 if on_cpu else 500)
    args.baseline_images = args.baseline_images or (1 if on_cpu else 2)
    args.baseline_draws = args.baseline_draws or (1 if on_cpu else 10)
    args.cached_images = args.cached_images or (1 if on_cpu else 2)
    args.cached_draws = args.cached_draws or (16 if on_cpu else 200)
    args.repeats = args.repeats or (3 if args.bench in ("denoise", "filter") else 2)
    if max(args.baseline_images, args.cached_images) > args.images:
        parser.error("--baseline-images and --cached-images must not exceed --images")
    return args


def main(argv: list[str] | None = None) -> None:
    """Build the inputs (and the classifier), time the methods, print the tables."""
    args = parse_args(argv)
    device = setup(args)
    print(describe(device, args), flush=True)
    if args.bench in ("denoise", "all"):
        x = torch.rand(args.sweep_images, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
        print(format_denoise_table(bench_denoise(x, args.repeats)), flush=True)
    if args.bench in ("filter", "all"):
        x = torch.rand(args.filter_images, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
        print(format_denoise_table(bench_filter(x, args.repeats), "cliplab"), flush=True)
    if args.bench in ("smoothing", "all"):
        clf = cliplab.load_classifier(MODEL, pretrained=None, device=device, precision="fp32")
        x = torch.rand(args.images, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
        timings = bench_smoothing(clf, x, args)
        draws = {timings[0].method: (args.images, args.draws),
                 timings[1].method: (args.baseline_images, args.baseline_draws),
                 timings[2].method: (args.cached_images, args.cached_draws)}
        print(format_smoothing_table(timings, draws))


if __name__ == "__main__":
    main()
