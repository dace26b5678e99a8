"""What the study costs at a profile's budgets: passes of the image encoder per notebook, and the time they imply.

A cost model, not a timing: for each notebook it counts the forward passes (F) and the forward + input-backward
passes (B) of the image encoder that its cells run at the profile's budgets, and the fine-tuning steps, then turns
them into time with throughputs measured by ``bench_gpu.py`` on one NVIDIA H200 (torch 2.11, 2026-11-27;
random-init ViT-B/32 at 224x224, 100 classes x 18 templates; benchmarks/RESULTS.md):

- PGD-10 over 10,000 images: 9.17 s under bf16 autocast; fp32 9.59 s over 2,048 images, i.e. 46.8 s per 10,000.
  That is 100,000 B + 10,000 F; with F = B / 2 (an input-only backward costs what the forward does) it gives the
  rates of B and F below.
- One FARE step (batch 128, PGD-10 inner attack): 0.224 s bf16 (0.807 s fp32); FARE with OFT: 0.497 s bf16 (its
  fp32 time was not measured: scaled from full fine-tuning's by the bf16 ratio).

An H100 SXM has the H200's compute (same GH100 chip, less and slower memory), so the bf16 column is the estimate
for one H100 too. Attacks run on the correctly classified images only: the model assumes CLIP ViT-B/32's
zero-shot CIFAR-100 accuracy of 65% (Radford et al. 2021) everywhere, and no early stopping in the PGD sweeps (an
upper bound).

A worst-case evaluation (``evaluate_robustness``) judges every image clean, then runs its first attack on the
correctly classified ones and each later attack only on the images still standing; over several radii
(``robustness_vs_eps``) each radius attacks only the survivors of the one below. How many stand is unknown for
the real model, so it is counted twice: the lower bound has the first attack fool every image (the later ones cost
nothing), the upper bound has every correctly classified image survive every attack (``Cost.ensemble``; a test
holds both against counted runs). Per image attacked, with S
steps and k EOT draws: APGD-CE or APGD-DLR S B and 1 F (its final iterate) per restart, times k; APGD-T
num_targets * (S B + 1 F), times k, plus k F to rank the targets; Square its queries in F; PGD as below; and a
judgement after each attack, one F per vote (randomized smoothing: per noise draw).

Usage:
    python benchmarks/study_budget.py                 # the cifar100 profile, as a markdown table (lower-upper bound)
    python benchmarks/study_budget.py --profile shapes
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import cliplab
from cliplab.evaluation import ENSEMBLES, AttackBudget

B_PER_S = {"bf16": 105_000 / 9.17, "fp32": 105_000 / (9.585 * 10_000 / 2_048)}  # forward + input-backward passes per second
STEP_S = {"bf16": {"full": 0.224, "oft": 0.497}, "fp32": {"full": 0.807, "oft": 0.807 * 0.497 / 0.224}}
ACCURACY = 0.65  # zero-shot CIFAR-100 accuracy of CLIP ViT-B/32 (Radford et al. 2021, prompt ensemble)


@dataclass
class Cost:
    forward: float = 0.0  # F: forward passes of one image at 224x224
    backward: float = 0.0  # B: forward + input-backward passes of one image
    finetune: dict = None  # adapter -> optimiser steps, scaled to batch 128 and a 10-step inner attack
    upper: bool = False  # the upper bound of a worst-case evaluation: every image survives every attack
    accuracy: float = ACCURACY  # the clean accuracy: the share of the images a worst-case evaluation attacks

    def __post_init__(self):
        self.finetune = self.finetune or {}

    def predict(self, n, votes=1):
        self.forward += n * votes

    def attack(self, n, steps, eot=1, restarts=1):
        """PGD: ``steps`` gradient steps and one final evaluation per restart, each over ``eot`` draws."""
        self.backward += n * restarts * steps * eot
        self.forward += n * restarts * eot

    def ensemble(self, n, attacks, budget: AttackBudget, votes=1, noise=1, radii=1, early_stop=None):
        """``evaluate_robustness`` (``radii`` == 1) or ``robustness_vs_eps`` over ``radii`` radii on ``n`` images,
        judged by ``votes`` passes; ``noise``: passes per model forward.

        It judges the images once (and runs 8 images to check the logits), then at each radius each attack on the
        images still standing, judging what it attacked. Upper bound: every correctly classified image survives
        every attack at every radius, so each attack runs its whole budget on all of them. Lower bound: the first
        attack of the first radius fools them all, at its first pass when attacks stop early (a model judged by one
        pass: ``evaluation._success_is_final``), and the larger radii, nested, attack nothing."""
        if early_stop is None:
            early_stop = votes == 1 and budget.eot_samples == 1 and noise == 1
        self.predict(8 * noise + n, votes)
        k = budget.eot_samples * noise
        for radius in range(radii):
            for i, name in enumerate(attacks):
                first = radius == 0 and i == 0
                m = self.accuracy * n if self.upper or first else 0  # the images still standing
                if first and not self.upper and early_stop:  # each image falls at the attack's first pass
                    self.forward += m * (name == "square") * noise
                    self.backward += m * (name != "square") * k
                elif name == "pgd":
                    self.attack(m, budget.pgd_steps, k, restarts=budget.pgd_restarts)
                elif name == "square":
                    self.forward += m * budget.queries * noise
                else:  # apgd-ce, apgd-dlr, apgd-t: a gradient at each step, none at the final iterate
                    runs = budget.num_targets if name == "apgd-t" else budget.restarts
                    self.forward += m * (runs + (name == "apgd-t")) * k
                    self.backward += m * runs * budget.steps * k
                self.predict(m, votes)

    def masking_report(self, n, steps, eot=1, votes=1, transfer=True):
        """gradient_masking_report: a gradient, attacks at eps/2, eps, 2 eps and 1, a 4x-steps attack with
        2 restarts, a transfer attack; each scored with ``votes``."""
        self.backward += n * eot
        for _ in range(4):
            self.attack(n, steps, eot)
        self.attack(n, 4 * steps, eot, restarts=2)
        if transfer:
            self.attack(n, steps)
        self.predict(n, votes * (6 if transfer else 5))

    def seconds(self, precision):
        passes = self.backward + self.forward / 2
        steps = sum(count * STEP_S[precision][adapter] for adapter, count in self.finetune.items())
        return passes / B_PER_S[precision] + steps


def notebook_costs(p: cliplab.Profile, upper: bool = False) -> dict[str, Cost]:
    costs = {name: Cost(upper=upper) for name in ("01_attacks", "02_eot", "03_randomized_smoothing",
                                                  "04_denoising", "05_adversarial_finetune", "06_orthogonal_finetune",
                                                  "07_every_defence")}
    right = lambda n: ACCURACY * n  # noqa: E731 - the images an evaluation attacks

    c = costs["01_attacks"]
    c.predict(p.sweeps.images, 2)  # accuracy, then the probabilities of the example
    c.attack(1, 4 * p.sweeps.steps)
    c.attack(p.sweeps.batch_size, p.sweeps.steps, restarts=2)  # the two loss-curve runs
    for _ in range(2 * len(p.sweeps.eps_255)):  # untargeted and targeted success at every eps
        c.predict(p.sweeps.images)
        c.attack(right(p.sweeps.images), p.sweeps.steps)
        c.predict(right(p.sweeps.images))

    c, n, v = costs["02_eot"], p.defences.images, p.defences.votes
    c.predict(n, 1 + 2 * v)
    runs = [k for k in p.defences.eot_grid for _ in range(2)] + [1, 1] + [k for k in (1, p.defences.eot_samples) for _ in range(4)]
    for k in runs:  # EOT sweep (2 modes), transfer (2 modes, on the undefended model), Gaussian noise at 4 eps
        c.predict(n, v)
        c.attack(right(n), p.sweeps.steps, eot=k)
        c.predict(right(n), v)
    c.ensemble(n, ENSEMBLES["rand"], p.attack_budget(randomised=True), votes=v)  # the Gaussian noise's worst case

    c, noise = costs["03_randomized_smoothing"], 8  # RandomizedSmoothing(num_noise=8) in every soft forward
    c.predict(n)
    for _ in p.certification.sigmas:
        c.ensemble(n, ENSEMBLES["rand"], AttackBudget(steps=p.evaluation.steps, eot_samples=p.defences.eot_samples // noise + 1),
                   votes=p.certification.n0, noise=noise)  # judged by the smoothed prediction
        c.predict(p.certification.images, p.certification.n0 + p.certification.n)  # certify
    c.masking_report(min(40, n), p.sweeps.steps, eot=2 * 4, votes=p.defences.votes * 4)

    c, n = costs["04_denoising"], p.sweeps.images
    c.attack(n, p.sweeps.steps)
    c.predict(n, 2 + 2 * 15)  # undefended, then 15 bilateral sigmas on adversarial and clean images
    for _ in range(5):  # adaptive attacks through 5 of the sigmas
        c.attack(n, p.sweeps.steps)
        c.predict(n)
    c.attack(p.defences.images, p.sweeps.steps, eot=p.defences.eot_samples)  # random sigma, EOT
    c.predict(p.defences.images, 2 * p.defences.votes)
    for _ in range(16):  # colour x spatial sigma grid
        c.ensemble(p.defences.images, ENSEMBLES["standard"], p.attack_budget())
    c.masking_report(p.defences.images, p.sweeps.steps)

    scale = p.finetuning.batch_size / 128 * (p.finetuning.attack_steps + 2) / 12  # a step's cost vs the measured one
    # 06 evaluates six models, but its original and FARE-full are 05's evaluations, shared within a run (study/shared.py)
    for name, runs, models in (("05_adversarial_finetune", {"full": 2}, 3), ("06_orthogonal_finetune",
                                                                          {"oft": 4}, 4)):
        c = costs[name]
        c.finetune = {adapter: count * p.finetuning.steps * scale for adapter, count in runs.items()}
        for _ in range(models):  # FinetuneStudy.evaluate: robustness_vs_eps at 1, 2, 4 / 255
            c.ensemble(p.sweeps.images, p.threat_model().attacks, p.attack_budget(), radii=len(p.threat_model().eps))
    # 06's frontier: LoRA at two ranks, the last one and two blocks and BitFit, each evaluated at the largest radius
    # alone; their steps are counted at full fine-tuning's time (the same inner attack; on the 2-core CPU within 15%)
    c, frontier = costs["06_orthogonal_finetune"], 5
    c.finetune["full"] = c.finetune.get("full", 0) + frontier * p.finetuning.steps * scale
    for _ in range(frontier):
        c.ensemble(p.sweeps.images, p.threat_model().attacks, p.attack_budget(), radii=1)
    costs["05_adversarial_finetune"].masking_report(100, p.sweeps.steps)

    # 07: the three inference-time defences at one radius; the fine-tuned models' evaluations are 05 and 06's, shared
    c, n = costs["07_every_defence"], p.defences.images
    c.ensemble(n, ENSEMBLES["standard"], p.attack_budget())  # the bilateral filter
    c.ensemble(n, ENSEMBLES["rand"], p.attack_budget(randomised=True), votes=p.defences.votes)  # the Gaussian noise
    smoothing = AttackBudget(steps=p.evaluation.steps, eot_samples=p.defences.eot_samples // noise + 1)
    c.ensemble(n, ENSEMBLES["rand"], smoothing, votes=p.certification.n0, noise=noise)  # smoothing at one sigma
    return costs


def format_table(lower: dict[str, Cost], upper: dict[str, Cost]) -> str:
    """One row per notebook and the total; each count and time as its lower-upper bound."""
    lines = ["| notebook | forward passes | fwd + input-bwd passes | fine-tuning steps (batch 128) | bf16, one H100 | fp32 |",
             "|---|---:|---:|---:|---:|---:|"]
    rows = [*zip(lower, lower.values(), upper.values()), ("**total**", _total(lower.values()), _total(upper.values()))]
    for name, low, high in rows:
        steps = sum(low.finetune.values())
        lines.append(f"| {name} | {_range(low.forward / 1e6, high.forward / 1e6, '.2f')} M | "
                     f"{_range(low.backward / 1e6, high.backward / 1e6, '.2f')} M | {steps:,.0f} | "
                     + " | ".join(f"{_range(low.seconds(x) / 60, high.seconds(x) / 60, '.1f')} min"
                                  for x in ("bf16", "fp32")) + " |")
    return "\n".join(lines)


def _total(costs) -> Cost:
    total = Cost()
    for c in costs:
        total.forward += c.forward
        total.backward += c.backward
        for adapter, steps in c.finetune.items():
            total.finetune[adapter] = total.finetune.get(adapter, 0) + steps
    return total


def _range(low: float, high: float, spec: str) -> str:
    """``low-high`` (en dash), or one number where the bounds agree at this precision."""
    low, high = format(low, spec), format(high, spec)
    return low if low == high else f"{low}\u2013{high}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cifar100", choices=sorted(cliplab.study.profiles.PROFILES))
    args = parser.parse_args(argv)
    profile = cliplab.study.profiles.PROFILES[args.profile]
    print(format_table(notebook_costs(profile), notebook_costs(profile, upper=True)))


if __name__ == "__main__":
    main()
