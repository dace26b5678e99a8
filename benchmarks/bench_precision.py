"""bf16 on the CPU (``--precision bf16``): what it buys, and what it changes in the worst-case numbers.

1. One forward + input-backward pass (what every attack step is) of the trained shapes CLIP (250 images) and of a
   random ViT-B-32 (8 images), in fp32 (cliplab's modules), then in bf16 autocast through open_clip's own modules
   (``nn.MultiheadAttention``, every token through the last block: cliplab before ``SelfAttention`` and
   ``ClassTokenBlock``), then through cliplab's: the median of ``--repeats`` passes each, with the ratio to fp32.
   (``bench_pass.py`` sets each pass beside its matrix products.)
2. The worst-case evaluation of notebooks 05 and 06 (``FinetuneStudy.evaluate``: the profile's attacks, budget and
   radii) of the committed models, in fp32 and in bf16: seconds, the robust accuracy per radius, and the images whose
   standing differs.

All in one process, one torch thread by default (how ``cliplab reproduce`` runs two notebooks on 2 cores). bf16 pays
only on CPUs with native bf16 arithmetic (AVX512-BF16, AMX); elsewhere torch emulates it, slowly.

    python benchmarks/bench_precision.py [--n 100] [--models original,fare-oft128-cw2] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from open_clip.transformer import ResidualAttentionBlock

import cliplab
from cliplab._torch import cast_cache
from cliplab.vit import SelfAttention
from cliplab.data import CIFAR100_CLASSES, CIFAR_TEMPLATES
from cliplab.study import FinetuneStudy, load_encoder

ENCODERS = Path(__file__).resolve().parent.parent / "notebooks" / "encoders" / "shapes"


def pass_seconds(clf, x: torch.Tensor, y: torch.Tensor, repeats: int) -> float:
    """The median time of one forward + input-backward pass of ``clf`` on ``x`` (after one warm-up pass)."""
    def one() -> float:
        start = time.perf_counter()
        x_grad = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(clf(x_grad), y)
        torch.autograd.grad(loss, x_grad)
        return time.perf_counter() - start

    with cast_cache(x.device):  # as the attacks run them (autocast casts a frozen weight again in every pass)
        one()
        return statistics.median(one() for _ in range(repeats))


def compare_passes(name: str, clf, x: torch.Tensor, y: torch.Tensor, repeats: int) -> None:
    for parameter in clf.parameters():
        parameter.requires_grad_(False)  # as in an attack on a frozen model
    ours = {module: type(module) for module in clf.modules()
            if isinstance(module, (SelfAttention, ResidualAttentionBlock))}
    clf.precision = "fp32"
    fp32 = pass_seconds(clf, x, y, repeats)
    clf.precision = "bf16"
    for module in ours:  # open_clip's own modules
        module.__class__ = (torch.nn.MultiheadAttention if isinstance(module, SelfAttention)
                            else ResidualAttentionBlock)
    before = pass_seconds(clf, x, y, repeats)
    for module, cls in ours.items():
        module.__class__ = cls
    after = pass_seconds(clf, x, y, repeats)
    print(f"| {name} | {len(x)} | {fp32:.3f} | {before:.3f} ({fp32 / before:.2f}x) | {after:.3f} "
          f"({fp32 / after:.2f}x) |", flush=True)


def compare_evaluations(names: list[str], n: int) -> None:
    study = FinetuneStudy(cliplab.get_profile("shapes", precision="fp32"))
    study.x_test, study.y_test = study.x_test[:n], study.y_test[:n]
    print(f"\nThe worst-case evaluation of notebooks 05/06 (shapes profile's attacks and budget), n={n}:\n")
    print("| model | precision | seconds | robust at " + ", ".join(f"{255 * e:g}" for e in study.threat.eps)
          + " /255 | images whose standing differs |")
    print("|---|---|---:|---|---|")
    for name in names:
        model = copy.deepcopy(study.original)
        if name != "original":
            load_encoder(model, ENCODERS / f"{name}.safetensors")
        reports = {}
        for precision in ("fp32", "bf16"):
            model.precision = precision
            start = time.perf_counter()
            reports[precision] = study.evaluate({name: model})[name]
            seconds = time.perf_counter() - start
            robust = ", ".join(f"{100 * report.robust.value:.1f}%" for report in reports[precision].values())
            differs = ", ".join(str(int((reports["fp32"][eps].standing != report.standing).sum()))
                                for eps, report in reports[precision].items())
            print(f"| {name} | {precision} | {seconds:.1f} | {robust} | "
                  f"{differs if precision == 'bf16' else ''} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n", type=int, default=100, help="test images of the worst-case evaluation (0: skip it)")
    parser.add_argument("--models", default="original,fare-oft128-cw2",
                        help="the evaluation's models: original and encoders of notebooks/encoders/shapes/")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); one forward + input-backward pass, seconds "
          f"(median of {args.repeats}), speed-up over fp32:\n")
    print("| model | images | fp32 | bf16, open_clip's modules | bf16, cliplab's modules |")
    print("|---|---:|---:|---:|---:|")
    x, y, _ = cliplab.load_dataset("shapes", split="test", n=250)
    compare_passes("shapes CLIP (trained)", cliplab.load_classifier("shapes", device="cpu"), x, y, args.repeats)
    torch.manual_seed(0)
    vit = cliplab.load_classifier("ViT-B-32", pretrained=None, class_names=list(CIFAR100_CLASSES[:10]),
                                  templates=list(CIFAR_TEMPLATES[:1]), device="cpu")
    compare_passes("ViT-B-32 (random, 224 px)", vit, x[:8], y[:8] % 10, args.repeats)
    if args.n:
        compare_evaluations(args.models.split(","), args.n)


if __name__ == "__main__":
    main()
