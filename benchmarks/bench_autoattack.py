"""The worst-case evaluation against AutoAttack: cost, robust accuracy and the images each breaks, in one process.

What is measured, on the same model and the same images, with the peer's budget:
- ``--peer torchattacks``: ``torchattacks.AutoAttack(version="standard")``: APGD-CE, APGD-T (9 targets), FAB-T
  (9 targets) and Square (5,000 queries), each on the images the earlier ones left standing (its MultiAttack).
  Note that torchattacks' port runs its APGD, APGD-T and FAB with their default of 10 iterations, not the 100 of
  the original AutoAttack.
- ``--peer autoattack``: fra31's AutoAttack itself (``pyautoattack``, its PyPI packaging; install it with
  ``pip install --no-deps pyautoattack``, for this benchmark only), ``version="standard"``: the same four attacks
  with 100 iterations.
- ``cliplab.evaluate_robustness(attacks="standard")`` with the peer's budget: APGD-CE, APGD-T (9 targets), Square
  (5,000 queries), each on the images still standing; no FAB-T.

Both are timed on the CPU clock of this process (``torch.cuda.synchronize`` before each reading on CUDA); the
table gives seconds, the ratio peer / cliplab, the robust accuracy each finds (n and 95% CI), and the images
only one of the two breaks (image for image: robust by one, broken by the other).

Models:
- ``shapes``: the shipped trained `shapes` CLIP ("original") and, where present, the FARE-OFT b=128 cw=2 encoder
  cached by notebook 06 (a model with robust images left after APGD-CE, where the later attacks cost);
  Shapes-100 test images.
- ``vit``: a randomly initialised ViT-B-32 (no download) on random 32x32 images labelled with its own predictions
  (every image correct when clean); for speed only, its robust accuracy means nothing.

Run from the repository root::

    python benchmarks/bench_autoattack.py --model shapes --n 200          # CPU, about 5 minutes on 2 cores
    python benchmarks/bench_autoattack.py --peer autoattack --n 100        # fra31's AutoAttack, 100 iterations
    python benchmarks/bench_autoattack.py --model vit --device cuda --n 256
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
import torchattacks

import cliplab
from cliplab.evaluation import AttackBudget, Proportion

# what each peer's AutoAttack(version="standard") runs: torchattacks' port 10 iterations, fra31's original 100
BUDGETS = {"torchattacks": AttackBudget(steps=10, num_targets=9, queries=5000),
           "autoattack": AttackBudget(steps=100, num_targets=9, queries=5000)}
CHECKPOINTS = Path(__file__).resolve().parents[1] / "notebooks" / "encoders" / "shapes"


def models(kind: str, n: int, device: str):
    """``{name: (model, x, y)}`` for the benchmark."""
    if kind == "vit":
        torch.manual_seed(0)
        model = cliplab.load_classifier("ViT-B-32", pretrained=None, device=device)
        x = torch.rand(n, 3, 32, 32, device=device)
        return {"random ViT-B-32": (model, x, cliplab.predict(model, x).to(device))}
    original = cliplab.load_classifier("shapes", device=device)
    x, y, _ = cliplab.load_dataset("shapes", n=n)
    found = {"original": (original, x.to(device), y.to(device))}
    weights = CHECKPOINTS / "fare-oft128-cw2.safetensors"
    if weights.is_file():
        from cliplab.study import load_encoder

        oft = load_encoder(cliplab.load_classifier("shapes", device=device), weights)
        found["FARE-OFT b=128 cw=2"] = (oft, x.to(device), y.to(device))
    return found


def timed(function):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = function()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def peer_attack(peer: str, model, eps: float, device: str):
    """The peer's AutoAttack(version="standard") as a function (x, y) -> adversarial images."""
    if peer == "torchattacks":
        return torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard", n_classes=model.num_classes,
                                       seed=0)
    from pyautoattack import AutoAttack

    attack = AutoAttack(model, norm="Linf", eps=eps, version="standard", device=device, seed=0)
    return lambda x, y: attack.run_standard_evaluation(x, y, batch_size=len(x))[0]  # (x_adv, y_adv)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("shapes", "vit"), default="shapes")
    parser.add_argument("--peer", choices=tuple(BUDGETS), default="torchattacks")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--eps", type=float, default=4 / 255)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device {args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else platform.processor()}),"
          f" torch {torch.__version__}, {torch.get_num_threads()} threads, n={args.n}, eps={255 * args.eps:g}/255, "
          f"peer {args.peer}")
    print("| model | cliplab s | peer AutoAttack s | ratio | cliplab robust | AutoAttack robust | broken by cliplab "
          "only | by AutoAttack only |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (model, x, y) in models(args.model, args.n, args.device).items():
        def ours_on(images, labels):
            return cliplab.evaluate_robustness(model, images, labels, eps=args.eps, budget=BUDGETS[args.peer],
                                               batch_size=args.n, progress=False)

        reference = peer_attack(args.peer, model, args.eps, args.device)
        ours_on(x[:4], y[:4]), reference(x[:4], y[:4])  # warm-up: CUDA context, kernels, caches for both
        ours, ours_s = timed(lambda: ours_on(x, y))
        x_adv, theirs_s = timed(lambda: reference(x, y))
        standing = cliplab.predict(model, x_adv) == y.cpu()
        theirs = Proportion(int(standing.sum()), len(y))
        print(f"| {name} | {ours_s:.1f} | {theirs_s:.1f} | {theirs_s / ours_s:.2f}x | {ours.robust} | {theirs} | "
              f"{int((standing & ~ours.standing).sum())} | {int((ours.standing & ~standing).sum())} |", flush=True)


if __name__ == "__main__":
    main()
