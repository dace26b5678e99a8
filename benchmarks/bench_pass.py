"""One attack pass (forward + input gradient, what every attack step is) against its matrix products' rate.

For the trained shapes CLIP (250 images) and a random ViT-B-32 (8 images at 224 px), one torch thread:

- the pass through open_clip's own modules (``nn.MultiheadAttention``, every token through the last block), as
  cliplab ran it before ``SelfAttention`` took every precision and ``ClassTokenBlock`` the last block;
- the pass through cliplab's modules (what ``load_classifier`` builds);
- the same pass's matrix products alone: every ``mm``/``addmm``/``bmm`` the profiler records in it, replayed on
  fresh tensors of the same shapes, one after the other.

Each line gives the median of ``--repeats`` passes, the GFLOP of the pass's matrix products (the profiler's count)
and their rate (GFLOP / pass time), next to the rate of the products alone: how near the pass runs to them.

    python benchmarks/bench_pass.py [--threads 1] [--repeats 9] [--precision fp32]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch.profiler import ProfilerActivity, profile

import cliplab
from cliplab.data import CIFAR100_CLASSES, CIFAR_TEMPLATES

PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm")


def one_pass(clf, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    x_grad = x.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(clf(x_grad), y)
    torch.autograd.grad(loss, x_grad)
    return time.perf_counter() - start


def median_pass(clf, x, y, repeats: int) -> float:
    one_pass(clf, x, y)  # warm-up
    return statistics.median(one_pass(clf, x, y) for _ in range(repeats))


def products_of_a_pass(clf, x, y) -> list[tuple[str, list]]:
    """The matrix products one pass runs: (op, input shapes) each."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        one_pass(clf, x, y)
    return [(event.name, event.input_shapes) for event in prof.events() if event.name in PRODUCTS]


def replay(products, dtype: torch.dtype, repeats: int) -> tuple[float, float]:
    """(seconds, GFLOP) of ``products`` run alone, on fresh tensors of their shapes (median of ``repeats``)."""
    calls, flop = [], 0.0
    for name, shapes in products:
        if name == "aten::addmm":
            bias, a, b = (torch.randn(s, dtype=dtype) for s in shapes[:3])
            calls.append(lambda bias=bias, a=a, b=b: torch.addmm(bias, a, b))
            flop += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        else:
            a, b = (torch.randn(s, dtype=dtype) for s in shapes[:2])
            calls.append(lambda a=a, b=b: a @ b)
            flop += 2 * a.shape[:-1].numel() * a.shape[-1] * b.shape[-1]

    def run() -> float:
        start = time.perf_counter()
        for call in calls:
            call()
        return time.perf_counter() - start

    run()
    return statistics.median(run() for _ in range(repeats)), flop / 1e9


def as_open_clip_built_it(clf) -> dict:
    """Switch ``clf``'s modules back to open_clip's own classes; returns what to switch back."""
    changed = {}
    for module in clf.model.visual.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            changed[module], module.__class__ = module.__class__, torch.nn.MultiheadAttention
        elif isinstance(module, ResidualAttentionBlock):
            changed[module], module.__class__ = module.__class__, ResidualAttentionBlock
    return changed


def compare(name: str, clf, x, y, repeats: int, dtype: torch.dtype) -> None:
    for parameter in clf.parameters():
        parameter.requires_grad_(False)  # as in an attack on a frozen model
    rows = []
    for modules in ("open_clip's", "cliplab's"):
        changed = as_open_clip_built_it(clf) if modules == "open_clip's" else {}
        seconds = median_pass(clf, x, y, repeats)
        alone, flop = replay(products_of_a_pass(clf, x, y), dtype, repeats)
        for module, cls in changed.items():
            module.__class__ = cls
        rows.append((modules, seconds, flop, alone))
    before = rows[0][1]
    for modules, seconds, flop, alone in rows:
        print(f"| {name} | {modules} | {1000 * seconds:.0f} ({before / seconds:.2f}x) | {flop:.2f} | "
              f"{flop / seconds:.0f} | {1000 * alone:.0f} | {flop / alone:.0f} | {100 * alone / seconds:.0f}% |",
              flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.precision}; one forward + input-backward "
          f"pass, median of {args.repeats}:\n")
    print("| model | modules | pass, ms (speed-up) | GFLOP in products | GFLOP/s of the pass | products alone, ms "
          "| GFLOP/s alone | products alone / pass |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    x, y, _ = cliplab.load_dataset("shapes", split="test", n=250)
    compare("shapes CLIP, 250 images", cliplab.load_classifier("shapes", device="cpu", precision=args.precision),
            x, y, args.repeats, dtype)
    torch.manual_seed(0)
    vit = cliplab.load_classifier("ViT-B-32", pretrained=None, class_names=list(CIFAR100_CLASSES[:10]),
                                  templates=list(CIFAR_TEMPLATES[:1]), device="cpu", precision=args.precision)
    compare("ViT-B-32 (random), 8 images", vit, x[:8], y[:8] % 10, args.repeats, dtype)


if __name__ == "__main__":
    main()
