"""What DistributedDataParallel costs cliplab's fine-tuning step on one device, against the plain step in this process.

Run under torchrun with one process (the NCCL path on a GPU, gloo on the CPU)::

    torchrun --standalone --nproc_per_node=1 benchmarks/bench_distributed.py              # ViT-B/32, batch 128, GPU
    torchrun --standalone --nproc_per_node=1 benchmarks/bench_distributed.py --model shapes --batch 8 --device cpu

Both steps are ``cliplab.training.train_step`` (FARE, full fine-tuning, PGD-10 inner attack) on copies of one randomly
initialised classifier and the same random images; one goes through ``DistributedDataParallel`` (what a torchrun job
of any size runs: gradient hooks, bucketing, one all-reduce per bucket), the other does not. They alternate, and the
table gives the median of ``--repeats`` steps each and their ratio. With one process the all-reduce moves nothing, so
this is DDP's own overhead; the cost of moving the gradients between GPUs comes on top (see docs/torchrun.md, "Expected scaling").
"""
from __future__ import annotations

import argparse
import copy
import statistics

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import cliplab
from bench_attacks import IMAGE_SIZE, timed
from cliplab import _distributed, training as ft


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="ViT-B-32 (random init) or shapes (random init)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    _distributed.start()
    if dist.get_world_size() != 1:
        raise SystemExit("run with --nproc_per_node=1: the plain step is only right in a single process")
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = cliplab.load_classifier(args.model, pretrained=None, device=device)
    config = ft.FinetuneConfig(method="fare", attack_steps=10, lr=1e-5)
    x = torch.rand(args.batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=device)
    y = torch.zeros(args.batch, dtype=torch.long, device=device)
    steps = {"plain train_step (baseline)": trainer(base, config, wrap=False),
             "train_step through DistributedDataParallel": trainer(base, config, wrap=True)}
    for step in steps.values():
        step(x, y)  # warm-up: kernels, the optimiser's state, DDP's buckets
    seconds = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            seconds[name].append(timed(lambda: step(x, y), device))
    median = {name: statistics.median(times) for name, times in seconds.items()}
    baseline = median["plain train_step (baseline)"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{args.model}, FARE step, batch {args.batch}, PGD-10 inner attack, {name}, torch {torch.__version__}, "
          f"backend {dist.get_backend()}, median of {args.repeats}\n")
    print("| step | s / step | vs baseline |\n|---|---:|---:|")
    for method, value in median.items():
        print(f"| {method} | {value:.4f} | {baseline / value:.3f}x |")
    _distributed.stop()


def trainer(base, config, *, wrap: bool):
    """A fresh copy of ``base``, prepared for ``config``; its step function ``step(x, y)``."""
    classifier = copy.deepcopy(base)
    original = copy.deepcopy(base.model.visual).eval().requires_grad_(False)
    trainable = ft.prepare(classifier, config)
    optimizer = torch.optim.AdamW(trainable, lr=config.lr)
    objective = ft.TrainingObjective(classifier, original, config)
    if wrap:
        device = next(classifier.parameters()).device
        objective = DistributedDataParallel(objective, device_ids=[device] if device.type == "cuda" else None)
    return lambda x, y: ft.train_step(objective, x, y, optimizer, trainable, attack_seed=0)


if __name__ == "__main__":
    main()
