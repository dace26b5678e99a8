"""PGD throughput on CLIP: cliplab's batched ``pgd`` against two baselines, in one process.

What is measured: image-steps per second (images x gradient steps / wall-clock seconds) of an
L-inf PGD attack (eps 8/255, step 2/255, random start, cross-entropy) on a randomly initialised
ViT-B-32 zero-shot classifier (``cliplab.load_classifier("ViT-B-32", pretrained=None)``, no download)
with the 100 CIFAR-100 class names and the 18 CIFAR prompt templates. Inputs are random 32x32 images
in [0, 1], resized to 224x224 inside the classifier. Three methods run on the same classifier:

- ``cliplab.pgd``: batched; the text head is a buffer computed once, so no step runs the text
  encoder. It also evaluates the final iterate and tracks the strongest iterate per sample, so it
  does one forward pass more than ``steps`` per run and some bookkeeping; both are counted against it.
- ``naive_clip_pgd`` (baseline a, "the original study's style"): one image at a time, and every step
  runs the full CLIP forward: tokenize all class x template prompts, ``encode_text``, encode the image,
  cosine logits, cross-entropy, ``loss.backward()``, sign step, projection. The text encoder runs
  under ``torch.no_grad()``: recording its graph for 1800 prompts would need tens of GB, and it
  makes this baseline the cheapest version of the style, so the ratio against it is a lower bound.
- ``torchattacks.PGD`` (baseline b) on the same ``ZeroShotClassifier`` at the same batch size.

Each method is warmed up once (one step) before it is timed; on CUDA the clock is read after
``torch.cuda.synchronize``. cliplab and torchattacks are timed ``--repeats`` times, interleaved so
that they share any background load, and the fastest time of each is kept. One naive step costs a
text-encoder pass over all 1800 prompts (about two minutes on one busy CPU core) and every step costs
the same, so on CPU the naive loop is timed on one image and one step by default; a CPU run with the
defaults takes about 5-8 minutes, most of it in the text encoder (the classifier's construction, the
naive warm-up and the naive step).

Run (from the repository root, with the venv active)::

    python benchmarks/bench_attacks.py                        # CUDA if available, else CPU
    python benchmarks/bench_attacks.py --device cpu --threads 2
    python benchmarks/bench_attacks.py --device cuda --batch-size 64 --bf16

The table is printed in Markdown, ready for ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import platform
import time
from dataclasses import dataclass
from typing import Callable

import open_clip
import torch
import torch.nn.functional as F
import torchattacks

import cliplab

MODEL = "ViT-B-32"
EPS, ALPHA = 8 / 255, 2 / 255
IMAGE_SIZE = 32


@dataclass
class Timing:
    """One timed method.

    Attributes:
        method: name shown in the table.
        batch: images per call.
        image_steps: images x gradient steps done in the timed call(s).
        seconds: wall-clock time of the timed call(s).
    """

    method: str
    batch: int
    image_steps: int
    seconds: float

    @property
    def rate(self) -> float:
        """Image-steps per second."""
        return self.image_steps / self.seconds


def naive_full_clip_logits(clf: cliplab.ZeroShotClassifier, tokenizer: Callable,
                           x: torch.Tensor) -> torch.Tensor:
    """Zero-shot logits the naive way: the text encoder runs again on every call.

    Same math as ``ZeroShotClassifier.forward`` (mean of the normalised template embeddings per class,
    cosine similarity times the logit scale), but the class prompts are tokenized and encoded anew.

    Args:
        clf: the classifier whose CLIP model, class names, templates and preprocessing are used.
        tokenizer: the open_clip tokenizer of the model.
        x: (N, 3, H, W) images in [0, 1].

    Returns:
        (N, num_classes) logits, differentiable with respect to ``x``.
    """
    model = clf.model
    prompts = [template.format(name) for name in clf.class_names for template in clf.templates]
    tokens = tokenizer(prompts).to(x.device)
    with torch.no_grad():  # with a graph, 1800 prompts x 77 tokens would need tens of GB
        text = model.encode_text(tokens, normalize=True).float()
    text = F.normalize(text.view(len(clf.class_names), len(clf.templates), -1).mean(dim=1), dim=-1)
    image = F.normalize(model.encode_image(clf.preprocess(x)).float(), dim=-1)
    return model.logit_scale.exp().float() * image @ text.T


def naive_clip_pgd(clf: cliplab.ZeroShotClassifier, tokenizer: Callable, x: torch.Tensor, y: torch.Tensor,
                   *, eps: float, alpha: float, steps: int) -> torch.Tensor:
    """L-inf PGD in the original study's style: one image at a time, full CLIP forward every step.

    Args:
        clf: the classifier to attack.
        tokenizer: the open_clip tokenizer of its model.
        x: (N, 3, H, W) clean images in [0, 1].
        y: (N,) true labels.
        eps: L-inf radius.
        alpha: step size.
        steps: gradient steps per image.

    Returns:
        (N, 3, H, W) adversarial images.
    """
    adversarial = []
    for image, label in zip(x.split(1), y.split(1)):
        x_adv = (image + torch.empty_like(image).uniform_(-eps, eps)).clamp(0, 1)
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            loss = F.cross_entropy(naive_full_clip_logits(clf, tokenizer, x_adv), label)
            loss.backward()
            x_adv = x_adv.detach() + alpha * x_adv.grad.sign()
            x_adv = torch.min(torch.max(x_adv, image - eps), image + eps).clamp(0, 1)
            clf.model.zero_grad(set_to_none=True)
        adversarial.append(x_adv.detach())
    return torch.cat(adversarial)


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work, so that the clock measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, synchronised on CUDA."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def best_of(runs: dict[str, Callable[[], object]], device: torch.device, repeats: int) -> dict[str, float]:
    """Fastest of ``repeats`` timings of each run, the runs interleaved so that they share any load."""
    seconds = {name: float("inf") for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            seconds[name] = min(seconds[name], timed(run, device))
    return seconds


def bench_batched(clf, x, y, steps: int, bf16: bool, repeats: int) -> tuple[Timing, Timing]:
    """Time ``cliplab.pgd`` and ``torchattacks.PGD`` on the whole batch, each warmed up with one step.

    Returns:
        The timings of cliplab and of torchattacks.
    """
    def ours(n_steps):
        return lambda: cliplab.pgd(clf, x, y, eps=EPS, alpha=ALPHA, steps=n_steps)

    def theirs(n_steps):
        attack = torchattacks.PGD(clf, eps=EPS, alpha=ALPHA, steps=n_steps, random_start=True)
        return lambda: attack(x, y)

    ours(1)()
    theirs(1)()
    name = "cliplab.pgd" + (" (bf16 autocast)" if bf16 else "")
    seconds = best_of({name: ours(steps), "torchattacks.PGD": theirs(steps)}, x.device, repeats)
    return tuple(Timing(method, len(x), len(x) * steps, time_) for method, time_ in seconds.items())


def bench_naive(clf, x, y, steps: int, images: int) -> Timing:
    """Time ``naive_clip_pgd`` on ``images`` images, after a one-image, one-step warm-up."""
    tokenizer = open_clip.get_tokenizer(MODEL)
    naive_clip_pgd(clf, tokenizer, x[:1], y[:1], eps=EPS, alpha=ALPHA, steps=1)
    x, y = x[:images], y[:images]
    seconds = timed(lambda: naive_clip_pgd(clf, tokenizer, x, y, eps=EPS, alpha=ALPHA, steps=steps), x.device)
    return Timing("naive full-CLIP loop (a)", 1, len(x) * steps, seconds)


def format_table(cliplab_timing: Timing, baselines: list[Timing]) -> str:
    """Markdown table: one row per method, with cliplab's speed-up over each baseline."""
    lines = ["| method | batch | image-steps | seconds | image-steps/s | cliplab speed-up |",
             "|---|---:|---:|---:|---:|---:|"]
    for timing in [cliplab_timing, *baselines]:
        speedup = cliplab_timing.rate / timing.rate
        ratio = "—" if timing is cliplab_timing else f"{speedup:.2f}x" if speedup < 10 else f"{speedup:.0f}x"
        lines.append(f"| {timing.method} | {timing.batch} | {timing.image_steps} | {timing.seconds:.2f} "
                     f"| {timing.rate:.3g} | {ratio} |")
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU's model name (Linux), else whatever ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def describe(device: torch.device, args: argparse.Namespace) -> str:
    """One line on the software, the hardware and the settings of the run."""
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return (f"torch {torch.__version__}, open_clip {open_clip.__version__}, torchattacks "
            f"{torchattacks.__version__}; {device.type} ({hardware}), {torch.get_num_threads()} threads; "
            f"{MODEL} random init, 100 classes x 18 templates, {IMAGE_SIZE}x{IMAGE_SIZE} inputs; "
            f"batch {args.batch_size}, steps {args.steps}, best of {args.repeats}; "
            f"naive loop {args.baseline_images} image(s) x {args.baseline_steps} step(s)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line; defaults depend on the device (CPU runs are kept to a few minutes)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16 on cpu, 32 on cuda")
    parser.add_argument("--steps", type=int, default=5, help="PGD steps of cliplab and torchattacks")
    parser.add_argument("--baseline-images", type=int, default=None,
                        help="images the naive loop (a) attacks; default: 1 on cpu, 2 on cuda")
    parser.add_argument("--baseline-steps", type=int, default=None,
                        help="steps per image of the naive loop; default: 1 on cpu, --steps on cuda")
    parser.add_argument("--repeats", type=int, default=2,
                        help="timings of cliplab and torchattacks, interleaved; the fastest is kept")
    parser.add_argument("--bf16", action="store_true", help="cliplab.pgd under bfloat16 autocast")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    args = parser.parse_args(argv)
    on_cpu = args.device == "cpu"
    args.batch_size = args.batch_size or (16 if on_cpu else 32)
    args.baseline_images = args.baseline_images or (1 if on_cpu else 2)
    args.baseline_steps = args.baseline_steps or (1 if on_cpu else args.steps)
    if args.baseline_images > args.batch_size:
        parser.error("--baseline-images must not exceed --batch-size")
    return args


def setup(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads``, seed torch, and return the ``--device`` every benchmark runs on."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return torch.device(args.device)


def main(argv: list[str] | None = None) -> None:
    """Build the classifier, time the three methods, print the table."""
    args = parse_args(argv)
    device = setup(args)
    # the classifier's precision: bf16 autocast with --bf16, else fp32 (also on CUDA, where bf16 is its default)
    clf = cliplab.load_classifier(MODEL, pretrained=None, device=device, precision="bf16" if args.bf16 else "fp32")
    x = torch.rand(args.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    y = torch.randint(clf.num_classes, (args.batch_size,), device=device)
    print(describe(device, args), flush=True)
    ours, theirs = bench_batched(clf, x, y, args.steps, args.bf16, args.repeats)
    print(f"{ours.method}: {ours.rate:.3g} image-steps/s; {theirs.method}: {theirs.rate:.3g}", flush=True)
    naive = bench_naive(clf, x, y, args.baseline_steps, args.baseline_images)
    print(format_table(ours, [theirs, naive]))


if __name__ == "__main__":
    main()
