"""Adversarial fine-tuning cost: cliplab's FARE step against a naive one, and OFT before vs after merging.

Two measurements on a randomly initialised ViT-B-32 zero-shot classifier
(``cliplab.load_classifier("ViT-B-32", pretrained=None)``, no download; 100 CIFAR-100 class names and
one prompt template, since the text side is frozen and only sets the 100 logits), random 32x32 inputs
in [0, 1], resized to 224x224 inside the classifier:

1. **Fine-tuning step time** (``--bench step``): one FARE optimiser step (PGD-``--attack-steps`` inner
   attack at eps 4/255 maximising ||f(x + delta) - f0(x)||^2, then the FARE loss, backward, gradient
   clipping, AdamW update) on a batch of ``--batch-size`` images. Methods:

   - ``cliplab.training.train_step``, full fine-tuning: the inner attack differentiates with
     ``torch.autograd.grad`` with respect to the input only, so its backward passes skip the weight
     gradients; bfloat16 autocast with ``--bf16`` (CUDA).
   - naive step (baseline): the same step written the common way, the inner attack calling
     ``loss.backward()`` through the trainable encoder, so each inner step also computes and then
     discards the weight gradients; float32.
   - ``train_step`` with OFT (block size ``--block-size``) instead of full fine-tuning: not a
     baseline, shown for the cost of the rotations (every forward rebuilds the Cayley blocks).

   Each method is warmed up with a one-step inner attack, then timed ``--repeats`` times,
   interleaved; the fastest is kept.

2. **OFT forward overhead** (``--bench oft``): images per second of the image encoder's forward pass
   under ``torch.no_grad()`` with OFT rotations applied (``apply_oft``, unmerged: each linear weight
   is W0 R^T, recomputed every call) against the same encoder after ``merge_adapters`` (plain weights),
   batch ``--batch-size``; the outputs of the two are checked to agree.

Run (from the repository root, with the venv active)::

    python benchmarks/bench_finetune.py --device cpu --threads 1
    python benchmarks/bench_finetune.py --device cuda --batch-size 32 --bf16

The tables are printed in Markdown, ready for ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import copy
from dataclasses import replace

import open_clip
import torch

import cliplab
from bench_attacks import IMAGE_SIZE, MODEL, best_of, cpu_name, setup
from cliplab import training as ft
from cliplab.training import apply_oft, merge_adapters, oft_parameters

EPS = 4 / 255


def naive_fare_step(classifier: cliplab.ZeroShotClassifier, original: torch.nn.Module, x: torch.Tensor,
                    config: ft.FinetuneConfig, optimizer: torch.optim.Optimizer) -> float:
    """A FARE step as commonly written: the inner attack's ``loss.backward()`` also fills weight gradients.

    Args:
        classifier: the classifier being trained (all image-encoder weights trainable).
        original: the frozen original image encoder f0.
        x: (B, 3, H, W) images in [0, 1].
        config: eps, inner steps and gradient clipping of the step.
        optimizer: the optimizer of the image encoder's weights.

    Returns:
        The loss.
    """
    visual = classifier.model.visual
    with torch.no_grad():
        target = original(classifier.preprocess(x))  # (B, D)
    alpha = 2.5 * config.eps / config.attack_steps
    x_adv = (x + torch.empty_like(x).uniform_(-config.eps, config.eps)).clamp(0, 1)
    for _ in range(config.attack_steps):
        x_adv = x_adv.detach().requires_grad_(True)
        (visual(classifier.preprocess(x_adv)) - target).pow(2).sum(1).mean().backward()
        x_adv = torch.min(torch.max(x_adv + alpha * x_adv.grad.sign(), x - config.eps), x + config.eps).clamp(0, 1)
        optimizer.zero_grad(set_to_none=True)  # the weight gradients of the attack are thrown away
    loss = (visual(classifier.preprocess(x_adv.detach())) - target).pow(2).sum(1).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(visual.parameters(), config.grad_clip)
    optimizer.step()
    return loss.item()


def trainer(base: cliplab.ZeroShotClassifier, config: ft.FinetuneConfig, naive: bool = False):
    """A fresh copy of ``base`` prepared for ``config``, and a function ``step(x, attack_steps)``."""
    classifier = copy.deepcopy(base)
    original = copy.deepcopy(base.model.visual).requires_grad_(False)
    trainable = ft.prepare(classifier, config)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr)

    def step(x: torch.Tensor, attack_steps: int) -> float:
        settings = replace(config, attack_steps=attack_steps)
        if naive:
            return naive_fare_step(classifier, original, x, settings, optimizer)
        objective = ft.training_objective(classifier, original, settings)
        return ft.train_step(objective, x, x.new_zeros(len(x), dtype=torch.long), optimizer, trainable,
                             attack_seed=0)[0]

    return step


def bench_step(base: cliplab.ZeroShotClassifier, x: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """Seconds of one fine-tuning step per method (fastest of ``args.repeats``, interleaved)."""
    config = ft.FinetuneConfig(method="fare", eps=EPS, attack_steps=args.attack_steps, lr=1e-5)
    steps = {
        "cliplab train_step, full" + (" (bf16 autocast)" if args.bf16 else ""): trainer(base, config),
        "naive step, full (baseline)": trainer(base, config, naive=True),
        f"cliplab train_step, OFT block {args.block_size}": trainer(
            base, replace(config, adapter="oft", block_size=args.block_size)),
    }
    for step in steps.values():
        step(x, 1)  # warm-up
    return best_of({name: (lambda step=step: step(x, args.attack_steps)) for name, step in steps.items()},
                   x.device, args.repeats)


def bench_oft(base: cliplab.ZeroShotClassifier, x: torch.Tensor, args: argparse.Namespace) -> dict[str, float]:
    """Seconds of one no-grad image-encoder forward with OFT unmerged and merged."""
    visual = copy.deepcopy(base.model.visual)
    apply_oft(visual, block_size=args.block_size)
    with torch.no_grad():
        for parameter in oft_parameters(visual):  # rotate away from the identity, as after training
            parameter.normal_(std=0.01)
    merged = merge_adapters(copy.deepcopy(visual))
    images = base.preprocess(x)
    with torch.no_grad():
        difference = (visual(images) - merged(images)).abs().max().item()
        rotated = (visual(images) - base.model.visual(images)).abs().max().item()
        runs = {"OFT merged (plain weights)": lambda: merged(images),
                f"OFT block {args.block_size}, unmerged": lambda: visual(images)}
        for run in runs.values():
            run()  # warm-up
        seconds = best_of(runs, x.device, args.repeats)
    print(f"max |unmerged - merged| feature difference: {difference:.2e} (the rotations themselves move "
          f"the features by up to {rotated:.2e})", flush=True)
    return seconds


def format_table(seconds: dict[str, float], images: int, unit: str) -> str:
    """Markdown table: one row per method, with the first row's speed-up over each other row."""
    reference = next(iter(seconds.values()))
    lines = [f"| method | batch | seconds | {unit} | first row's speed-up |", "|---|---:|---:|---:|---:|"]
    for index, (name, time_) in enumerate(seconds.items()):
        ratio = "—" if index == 0 else f"{time_ / reference:.2f}x"
        lines.append(f"| {name} | {images} | {time_:.2f} | {images / time_:.3g} | {ratio} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bench", choices=("all", "step", "oft"), default="all")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--attack-steps", type=int, default=10, help="inner PGD steps of a fine-tuning step")
    parser.add_argument("--block-size", type=int, default=16, help="OFT block size (divides 768 and 3072)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved timings; the fastest is kept")
    parser.add_argument("--bf16", action="store_true", help="cliplab's step under bfloat16 autocast")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build the classifier, run the chosen benchmarks, print their tables."""
    args = parse_args(argv)
    device = setup(args)
    base = cliplab.load_classifier(MODEL, pretrained=None, templates=("a photo of a {}.",), device=device,
                                   precision="bf16" if args.bf16 else "fp32")
    x = torch.rand(args.batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"torch {torch.__version__}, open_clip {open_clip.__version__}; {device.type} ({hardware}), "
          f"{torch.get_num_threads()} threads; {MODEL} random init, {IMAGE_SIZE}x{IMAGE_SIZE} inputs; "
          f"batch {args.batch_size}, PGD-{args.attack_steps} inner attack, OFT block {args.block_size}, "
          f"best of {args.repeats}", flush=True)
    if args.bench in ("all", "step"):
        print(format_table(bench_step(base, x, args), args.batch_size, "images/s"), flush=True)
    if args.bench in ("all", "oft"):
        print(format_table(bench_oft(base, x, args), args.batch_size, "images/s"), flush=True)


if __name__ == "__main__":
    main()
