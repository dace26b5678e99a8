"""The study's GPU workloads on ViT-B/32, each against the device's peak and, where one exists, a baseline.

Every row of the throughput table of RESULTS.md ("GPU throughput"), on a randomly initialised ViT-B-32
zero-shot classifier (``cliplab.load_classifier("ViT-B-32", pretrained=None)``, no download) with the 100 CIFAR-100 class names and the 18 CIFAR prompt templates, random 32x32
inputs in [0, 1] resized to 224x224 inside the classifier:

1. ``pgd-bf16``: PGD-10 (L-inf 4/255, cross-entropy, random start) over ``--images`` images in batches of
   ``--batch-size``, bf16 autocast, the study's kernel (``cliplab.pgd``).
2. ``pgd-vs-torchattacks``: PGD-10 on ``--compare-images`` images, fp32 and bf16, ``cliplab.pgd`` against
   ``torchattacks.PGD`` on the same classifier, the same batches, in this process (the ratio is the
   speed-up; cliplab also evaluates the final iterate, one forward pass more per run, counted against it).
3. ``smoothing``: noisy samples per second of ``RandomizedSmoothing.sample_counts`` (sigma 0.25), bf16 and
   fp32, batches of ``--smoothing-batch``.
4. ``fare``: seconds of one FARE step (batch ``--fare-batch``, PGD-10 inner attack): full fine-tuning in
   bf16 and fp32, OFT (block 128) in bf16.

FLOPs are counted with the formulas of ``torch.utils.flop_counter`` on the same call at a small batch and
scaled linearly (every FLOP of these workloads is per image); TFLOP/s is that count over the measured time,
shown against the dense peak of the device (bf16 tensor cores for bf16 rows, fp32 without TF32 for fp32
rows) when the device is one whose peak this script knows.

``--profile DIR`` also writes ``torch.profiler`` tables (self device time by operator, top 30) of one PGD
batch, one smoothing batch and one FARE step, and ``--sync-check`` counts host synchronisations per PGD step
(``torch.cuda.set_sync_debug_mode``): it must be 0.

Run (from the repository root)::

    python benchmarks/bench_gpu.py --profile results/gpu-profile --sync-check
    python benchmarks/bench_gpu.py --device cpu --images 8 --batch-size 4 --compare-images 4 \\
        --smoothing-images 2 --smoothing-n 8 --fare-batch 2   # a dry run of every path on the CPU

The tables are printed in Markdown, ready for ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path
from typing import Callable

import open_clip
import torch
import torchattacks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import cliplab
from bench_attacks import IMAGE_SIZE, MODEL, cpu_name, synchronize, timed
from cliplab import training as ft

EPS, STEPS = 4 / 255, 10
# dense peaks in FLOP/s (NVIDIA data sheets, SXM parts): bf16 tensor cores, and fp32 without TF32
PEAKS = {"H100": {"bf16": 989e12, "fp32": 67e12}, "H200": {"bf16": 989e12, "fp32": 67e12},
         "A100": {"bf16": 312e12, "fp32": 19.5e12}}


def peak(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peaks[precision] for key, peaks in PEAKS.items() if key in name), None)


class FlopCount(TorchDispatchMode):
    """Counts the FLOPs of every operator torch's ``FlopCounterMode`` knows (matmuls, convolutions, attention),
    forward and backward, with its formulas; without its per-module tracking, whose hooks do not support the
    ``torch.autograd.grad`` calls of the attacks."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def flops_per_image(fn: Callable[[int], object], images: int = 4) -> float:
    """FLOPs of ``fn(images)`` divided by ``images``."""
    with FlopCount() as counter:
        fn(images)
    return counter.total / images


class Report:
    """Collects the rows and prints them as one Markdown table."""

    def __init__(self, device: torch.device):
        self.device, self.rows = device, []

    def add(self, workload: str, precision: str, images: int, seconds: float, flops: float, note: str = "") -> None:
        rate = flops * images / seconds
        top = peak(self.device, precision)
        share = f"{rate / top:.0%}" if top else "—"
        self.rows.append(f"| {workload} | {precision} | {images} | {seconds:.3f} | {rate / 1e12:.1f} | {share} "
                         f"| {note} |")
        print(self.rows[-1], flush=True)

    def table(self) -> str:
        return "\n".join(["| workload | precision | images | seconds | TFLOP/s | of peak | note |",
                          "|---|---|---:|---:|---:|---:|---|", *self.rows])


def classifiers(device: torch.device, templates=None) -> dict[str, cliplab.ZeroShotClassifier]:
    """One random ViT-B-32 classifier per precision, sharing the weights' values."""
    kwargs = {"templates": templates} if templates else {}
    bf16 = cliplab.load_classifier(MODEL, pretrained=None, device=device, precision="bf16", **kwargs)
    fp32 = copy.deepcopy(bf16)
    fp32.precision = "fp32"
    return {"bf16": bf16, "fp32": fp32}


def images(n: int, device: torch.device, num_classes: int = 100, seed: int = 0):
    generator = torch.Generator(device).manual_seed(seed)
    x = torch.rand(n, 3, IMAGE_SIZE, IMAGE_SIZE, device=device, generator=generator)
    return x, torch.randint(num_classes, (n,), device=device, generator=generator)


def pgd_batches(attack: Callable, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> None:
    for start in range(0, len(x), batch_size):
        attack(x[start:start + batch_size], y[start:start + batch_size])


def cliplab_pgd(clf, steps: int = STEPS) -> Callable:
    return lambda x, y: cliplab.pgd(clf, x, y, eps=EPS, steps=steps)


def torchattacks_pgd(clf, steps: int = STEPS) -> Callable:
    return torchattacks.PGD(clf, eps=EPS, alpha=2.5 * EPS / steps, steps=steps, random_start=True)


def bench_pgd(report: Report, clfs, args) -> None:
    clf = clfs["bf16"]
    x, y = images(args.images, args.device)
    flops = flops_per_image(lambda n: cliplab_pgd(clf)(x[:n], y[:n]))
    pgd_batches(cliplab_pgd(clf, steps=1), x[:args.batch_size], y[:args.batch_size], args.batch_size)  # warm-up
    seconds = timed(lambda: pgd_batches(cliplab_pgd(clf), x, y, args.batch_size), args.device)
    report.add(f"PGD-{STEPS}, cliplab.pgd", "bf16", len(x), seconds, flops, f"batch {args.batch_size}")


def bench_pgd_against_torchattacks(report: Report, clfs, args) -> None:
    x, y = images(args.compare_images, args.device, seed=1)
    for precision, clf in clfs.items():
        flops = flops_per_image(lambda n: cliplab_pgd(clf)(x[:n], y[:n]))
        ours = lambda: pgd_batches(cliplab_pgd(clf), x, y, args.batch_size)  # noqa: E731
        theirs = lambda: pgd_batches(torchattacks_pgd(clf), x, y, args.batch_size)  # noqa: E731
        pgd_batches(cliplab_pgd(clf, 1), x[:args.batch_size], y[:args.batch_size], args.batch_size)  # warm-up
        pgd_batches(torchattacks_pgd(clf, 1), x[:args.batch_size], y[:args.batch_size], args.batch_size)
        seconds_theirs, seconds_ours = timed(theirs, args.device), timed(ours, args.device)
        report.add(f"PGD-{STEPS}, torchattacks.PGD", precision, len(x), seconds_theirs, flops * STEPS / (STEPS + 1),
                   f"batch {args.batch_size}; its 10 fwd+bwd passes")
        report.add(f"PGD-{STEPS}, cliplab.pgd", precision, len(x), seconds_ours, flops,
                   f"batch {args.batch_size}; **{seconds_theirs / seconds_ours:.2f}x** torchattacks")


def bench_smoothing(report: Report, clfs, args) -> None:
    x, _ = images(args.smoothing_images, args.device, seed=2)
    for precision, clf in clfs.items():
        smoothing = cliplab.RandomizedSmoothing(clf, sigma=0.25, batch_size=args.smoothing_batch)
        flops = flops_per_image(lambda n: smoothing.sample_counts(x[:1], n, seed=0), images=4)
        smoothing.sample_counts(x[:1], args.smoothing_batch, seed=0)  # warm-up
        samples = len(x) * args.smoothing_n
        seconds = timed(lambda: smoothing.sample_counts(x, args.smoothing_n, seed=0), args.device)
        report.add("smoothing sample_counts", precision, samples, seconds, flops,
                   f"**{samples / seconds:,.0f} noisy samples/s**, batch {args.smoothing_batch}")


def fare_step(clf, adapter: str, device: torch.device, batch: int) -> Callable[[torch.Tensor], float]:
    """A fresh trainee of ``clf`` and its FARE step (PGD-10 inner attack) on a batch."""
    config = ft.FinetuneConfig(method="fare", adapter=adapter, block_size=128, eps=EPS, attack_steps=STEPS, lr=1e-5)
    classifier = copy.deepcopy(clf)
    original = copy.deepcopy(clf.model.visual).requires_grad_(False)
    trainable = ft.prepare(classifier, config)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    objective = ft.training_objective(classifier, original, config)
    return lambda x: ft.train_step(objective, x, labels[:len(x)], optimizer, trainable, 0)


def bench_fare(report: Report, clfs, args) -> None:
    x, _ = images(args.fare_batch, args.device, seed=3)
    for precision, adapter in (("bf16", "full"), ("bf16", "oft"), ("fp32", "full")):
        step = fare_step(clfs[precision], adapter, args.device, args.fare_batch)
        flops = flops_per_image(lambda n: step(x[:n]))
        step(x)  # warm-up (and the optimiser's state)
        repeats = args.fare_repeats
        seconds = timed(lambda: [step(x) for _ in range(repeats)], args.device) / repeats
        report.add(f"FARE step, {adapter}", precision, len(x), seconds, flops,
                   f"**{seconds:.3f} s/step**, batch {len(x)}, PGD-{STEPS} inner, mean of {repeats}")


def profile(directory: Path, clfs, args) -> None:
    """torch.profiler tables of one PGD batch, one smoothing batch and one FARE step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    directory.mkdir(parents=True, exist_ok=True)
    clf = clfs["bf16"]
    x, y = images(args.batch_size, args.device, seed=4)
    smoothing = cliplab.RandomizedSmoothing(clf, sigma=0.25, batch_size=args.smoothing_batch)
    step = fare_step(clf, "full", args.device, args.fare_batch)
    step(x[:args.fare_batch])  # warm-up
    runs = {"pgd": lambda: cliplab_pgd(clf)(x, y),
            "smoothing": lambda: smoothing.sample_counts(x[:1], args.smoothing_batch, seed=0),
            "fare": lambda: step(x[:args.fare_batch])}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type == "cuda" else [])
    for name, run in runs.items():
        run()
        synchronize(args.device)
        with torch_profile(activities=activities) as prof:
            run()
            synchronize(args.device)
        table = _table(prof, args.device)
        (directory / f"profile_{name}.txt").write_text(table)
        print(f"\n### profile: {name}\n{table}", flush=True)


def _table(prof, device: torch.device) -> str:
    """Operators by self time on ``device`` (the key's name differs across torch versions)."""
    averages = prof.key_averages()
    keys = ("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" else ("self_cpu_time_total",)
    for key in keys:
        try:
            return averages.table(sort_by=key, row_limit=30, max_name_column_width=60)
        except (AttributeError, KeyError, ValueError):
            continue
    return averages.table(row_limit=30, max_name_column_width=60)


def count_syncs_per_step(clf, args) -> float:
    """Host synchronisations of one PGD step: (syncs of PGD-6 - syncs of PGD-2) / 4."""
    x, y = images(min(args.batch_size, 64), args.device, seed=5)

    def syncs(steps: int) -> int:
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                cliplab_pgd(clf, steps)(x, y)
                synchronize(args.device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    return (syncs(6) - syncs(2)) / 4


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", default="pgd,compare,smoothing,fare",
                        help="comma-separated rows: pgd, compare, smoothing, fare")
    parser.add_argument("--images", type=int, default=10_000, help="images of the PGD-10 bf16 row")
    parser.add_argument("--batch-size", type=int, default=1024, help="PGD batch size")
    parser.add_argument("--compare-images", type=int, default=2048, help="images of the torchattacks comparison")
    parser.add_argument("--smoothing-images", type=int, default=32)
    parser.add_argument("--smoothing-n", type=int, default=1000, help="noise draws per image")
    parser.add_argument("--smoothing-batch", type=int, default=1024)
    parser.add_argument("--fare-batch", type=int, default=128)
    parser.add_argument("--fare-repeats", type=int, default=5)
    parser.add_argument("--profile", type=Path, default=None, help="write torch.profiler tables into this folder")
    parser.add_argument("--sync-check", action="store_true", help="count host syncs per PGD step (CUDA)")
    args = parser.parse_args(argv)
    args.device = torch.device(args.device)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(0)
    hardware = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else cpu_name()
    print(f"torch {torch.__version__}, open_clip {open_clip.__version__}, torchattacks {torchattacks.__version__}; "
          f"{args.device.type} ({hardware}); {MODEL} random init, 100 classes x 18 templates, "
          f"{IMAGE_SIZE}x{IMAGE_SIZE} inputs", flush=True)
    clfs = classifiers(args.device)
    report = Report(args.device)
    rows = {"pgd": bench_pgd, "compare": bench_pgd_against_torchattacks, "smoothing": bench_smoothing,
            "fare": bench_fare}
    for name in args.only.split(","):
        rows[name](report, clfs, args)
    print("\n" + report.table(), flush=True)
    if args.profile:
        profile(args.profile, clfs, args)
    if args.sync_check and args.device.type == "cuda":
        print(f"\nhost synchronisations per PGD step: {count_syncs_per_step(clfs['bf16'], args):g}", flush=True)
    print("\n" + report.table(), flush=True)  # again, last: the end of the output is what a remote run returns


if __name__ == "__main__":
    sys.exit(main())
