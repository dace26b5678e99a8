"""cliplab's adapters against Hugging Face PEFT's on open_clip's image encoder: what each reaches, how exact OFT's
rotation is, and the speed of a training step.

For the trained shapes CLIP (fp32, one thread), each adapter is applied to a copy of the image encoder, its
parameters set away from the identity (a random draw, as after training), and then:

- **reach**: the weights it adapts (open_clip's attention is an ``nn.MultiheadAttention``, whose q/k/v in-projection is
  one fused weight, not an ``nn.Linear``);
- **geometry** (OFT): after merging, the largest relative change of a neuron's norm and of an angle between two
  neurons of every adapted weight (an exact rotation keeps both; ``study.neuron_geometry``);
- **speed**: the median time of a training pass (forward, backward into the adapter's parameters, batch 64) and
  of an attack pass (forward + input gradient, the adapter frozen; what the inner PGD runs ten times a step), each
  against the same passes with cliplab's adapter in the same process.

PEFT is not a dependency of cliplab: install it beside it to run this (``pip install peft``).

    python benchmarks/bench_peft.py [--repeats 7] [--block-size 16] [--rank 4]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from types import SimpleNamespace

import torch
from open_clip.transformer import ResidualAttentionBlock
from torch import nn

import cliplab
from cliplab.study.measures import geometry_change, neuron_geometry
from cliplab.training import apply_lora, apply_oft, lora_parameters, merge_adapters, oft_parameters

LINEAR_NAMES = ["out_proj", "c_fc", "c_proj"]  # open_clip's nn.Linear layers in a ViT block


def _timed(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def pass_times(visual: nn.Module, trained: list[nn.Parameter], x: torch.Tensor, repeats: int) -> tuple[float, float]:
    """(training pass, attack pass) medians in seconds."""
    def training():
        visual.zero_grad(set_to_none=True)
        visual(x).square().sum().backward()

    def attack():
        for parameter in trained:
            parameter.requires_grad_(False)
        x_grad = x.clone().requires_grad_(True)
        torch.autograd.grad(visual(x_grad).square().sum(), x_grad)
        for parameter in trained:
            parameter.requires_grad_(True)

    return _timed(training, repeats), _timed(attack, repeats)


def nudge(parameters: list[nn.Parameter], scale: float = 0.05) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))


def geometry_kept(reference: dict, merged_visual: nn.Module) -> tuple[float, float]:
    """Largest relative neuron-norm change and angle change (degrees) of the merged encoder against ``reference``
    (``neuron_geometry`` of the original)."""
    merged = SimpleNamespace(model=SimpleNamespace(visual=merged_visual))
    norm_change, angle_change = geometry_change(reference, neuron_geometry(merged))
    return float(norm_change.max()), float(angle_change.max())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=4)
    args = parser.parse_args(argv)
    import peft
    from peft import LoraConfig, OFTConfig, inject_adapter_in_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    classifier = cliplab.load_classifier("shapes", device="cpu", precision="fp32")
    visual = classifier.model.visual.requires_grad_(False)
    # open_clip's own last block: PEFT's LoRA wraps the attention in a module of its own, which has none of the
    # methods cliplab's class-token block calls, so every row runs the same blocks
    visual.transformer.resblocks[-1].__class__ = ResidualAttentionBlock
    reference = neuron_geometry(classifier)
    x = cliplab.load_dataset("shapes", n=64)[0]
    x = (x - torch.tensor(visual.image_mean).view(1, 3, 1, 1)) / torch.tensor(visual.image_std).view(1, 3, 1, 1)
    print(f"torch {torch.__version__}, peft {peft.__version__}; shapes CLIP image encoder, batch 64, fp32, 1 thread, "
          f"median of {args.repeats}\n")
    print("| adapter | weights adapted | trained parameters | largest norm change | largest angle change (deg) | "
          "training pass, ms (vs cliplab's) | attack pass, ms (vs cliplab's) |")
    print("|---|---:|---:|---:|---:|---:|---:|")

    def ours(apply, parameters_of, linear_only=False):
        model = copy.deepcopy(visual)
        targets = (lambda name, module: isinstance(module, nn.Linear)) if linear_only else None
        names = apply(model, targets) if targets else apply(model, None)
        trained = parameters_of(model)
        return model, len(names), trained

    def theirs(config):
        model = inject_adapter_in_model(config, copy.deepcopy(visual))
        trained = [p for p in model.parameters() if p.requires_grad]
        adapted = sum(1 for m in model.modules() if hasattr(m, "base_layer") and not hasattr(m.base_layer, "base_layer"))
        return model, adapted, trained

    b, r = args.block_size, args.rank
    oft = lambda model, targets: apply_oft(model, block_size=b, **({"targets": targets} if targets else {}))  # noqa: E731
    rows = {
        f"cliplab OFT b={b}": ours(oft, oft_parameters),
        f"cliplab OFT b={b}, nn.Linear only": ours(oft, oft_parameters, linear_only=True),
        f"PEFT OFT b={b} (Cayley-Neumann, its default)": theirs(OFTConfig(oft_block_size=b, r=0,
                                                                          target_modules=LINEAR_NAMES)),
        f"PEFT OFT b={b}, exact Cayley": theirs(OFTConfig(oft_block_size=b, r=0, target_modules=LINEAR_NAMES,
                                                          use_cayley_neumann=False)),
        f"cliplab LoRA r={r}": ours(lambda model, _: apply_lora(model, rank=r), lora_parameters),
        f"PEFT LoRA r={r} (attn: its MultiheadAttention layer)": theirs(LoraConfig(
            r=r, lora_alpha=r, target_modules=["attn", "c_fc", "c_proj"])),
    }
    baseline = {}
    for label, (model, adapted, trained) in rows.items():
        nudge(trained)
        training, attack = pass_times(model, trained, x, args.repeats)
        family = "OFT" if "OFT" in label else "LoRA"
        if label.startswith("cliplab") and family not in baseline:
            baseline[family] = training, attack
        base_training, base_attack = baseline[family]
        if label.startswith("PEFT"):
            for module in model.modules():
                if hasattr(module, "merge") and hasattr(module, "base_layer"):
                    module.merge()
            merged = model
        else:
            merged = merge_adapters(copy.deepcopy(model))
        norms, angles = geometry_kept(reference, plain_copy(merged, visual)) if family == "OFT" else (float("nan"),) * 2
        count = sum(p.numel() for p in trained)
        if label.startswith("cliplab OFT"):  # its b x b generators act through their skew part: b(b-1)/2 angles
            count = count // (b * b) * (b * (b - 1) // 2)
        print(f"| {label} | {adapted} | {count:,} | {norms:.2e} | {angles:.2e} | {1000 * training:.1f} "
              f"({training / base_training:.2f}x) | {1000 * attack:.1f} ({attack / base_attack:.2f}x) |", flush=True)


def plain_copy(merged: nn.Module, architecture: nn.Module) -> nn.Module:
    """``architecture`` (copied) holding ``merged``'s weights: PEFT's merged layers keep their base layer inside a
    wrapper, so their state dict's keys are mapped back to open_clip's."""
    state = {key.replace(".base_layer", ""): value for key, value in merged.state_dict().items()
             if "oft_" not in key and "lora_" not in key}
    plain = copy.deepcopy(architecture)
    plain.load_state_dict(state)
    return plain


if __name__ == "__main__":
    main()
