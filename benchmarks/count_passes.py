"""Where the worst-case evaluations of notebooks 05 and 06 spend their passes: counted, not modelled.

For each model the notebooks evaluate, each radius and each attack of ``FinetuneStudy.evaluate`` (the PGD quick
look, APGD-CE, APGD-T, Square, each with the judgement of what it attacked), a forward hook on the classifier
counts the images it sees, split into forward-only passes (F) and forward passes whose input gradient is taken (B:
forward + input-backward), and a clock takes each attack's wall time. One process, the profile's budgets and the
notebooks' cached encoders (``notebooks/encoders/<profile>/``): the figures are what ``cliplab reproduce`` runs.

Usage:
    python benchmarks/count_passes.py                      # shapes, 06's six models (05's three are among them)
    python benchmarks/count_passes.py --n 200 --models original,FARE-full
    python benchmarks/count_passes.py --n 200 --precision bf16    # bf16 autocast on the CPU, against the default
"""
from __future__ import annotations

import argparse
import collections
import copy
import os
import time
from pathlib import Path

import torch

import cliplab
from cliplab.evaluation import ensemble
from cliplab.study import FinetuneStudy

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
# the encoders of 06's cache (05's FARE-full and TeCoA-full among them), by the notebooks' names
ENCODERS = {"FARE-full": "fare-full", "TeCoA-full": "tecoa-full", "FARE-OFT b=16 cw=1": "fare-oft16",
            "FARE-OFT b=128 cw=1": "fare-oft128", "FARE-OFT b=128 cw=2": "fare-oft128-cw2",
            "FARE-OFT b=128 cw=3": "fare-oft128-cw3"}


class PassCounter:
    """Counts the images a module's forward passes see, with and without grad, and the wall time, per label: each
    ``switch(label)`` closes the previous label's time."""

    def __init__(self, module: torch.nn.Module):
        self.passes = collections.defaultdict(lambda: [0, 0])  # label -> [forward-only, forward + input-backward]
        self.seconds = collections.defaultdict(float)
        self.label, self.since = None, time.perf_counter()
        module.register_forward_hook(self._count)

    def switch(self, label: str | None) -> None:
        now = time.perf_counter()
        if self.label is not None:
            self.seconds[self.label] += now - self.since
        self.label, self.since = label, now

    def _count(self, module, inputs, output) -> None:
        self.passes[self.label][torch.is_grad_enabled()] += len(inputs[0])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="shapes")
    parser.add_argument("--n", type=int, default=None, help="test images (default: the profile's n_eval)")
    parser.add_argument("--models", default=None, help="comma-separated model names (default: all)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("--precision", default="auto", help="the classifier's: auto (fp32 on a CPU), fp32 or bf16")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    profile = cliplab.get_profile(args.profile, encoder_cache=NOTEBOOKS / "encoders" / args.profile,
                                  precision=args.precision)
    study = FinetuneStudy(profile)
    if args.n:
        study.x_test, study.y_test = study.x_test[:args.n], study.y_test[:args.n]
    names = ["original", *ENCODERS] if args.models is None else args.models.split(",")

    model = study.original
    pristine = copy.deepcopy(model.state_dict())
    counter = PassCounter(model)
    run_attack = ensemble._run_attack

    def labelled_attack(name, *a, eps, **kw):  # an attack's passes and time run until the next attack starts, so
        counter.switch((eps, name))  # its label also holds the judgement of the images it attacked
        return run_attack(name, *a, eps=eps, **kw)

    ensemble._run_attack = labelled_attack  # evaluate_robustness looks it up in its module
    rows, started = [], time.perf_counter()
    for name in names:
        model.load_state_dict(pristine)
        if name != "original":
            cliplab.study.load_encoder(model, profile.encoder_cache_dir / f"{ENCODERS[name]}.safetensors")
        counter.passes.clear(), counter.seconds.clear()
        counter.switch((0, "clean"))
        start = time.perf_counter()
        reports = study.evaluate({name: model})[name]
        counter.switch(None)
        rows.append((name, "all", "(total)", None, None, time.perf_counter() - start, None))
        for (eps, attack), (forward, backward) in counter.passes.items():
            report = reports[eps] if eps else next(iter(reports.values()))
            after = report.per_attack.get(attack, report.clean).value
            rows.append((name, f"{255 * eps:g}/255" if eps else "-", attack, forward, backward,
                         counter.seconds[eps, attack], after))
    print(f"profile {profile.name}, n={len(study.y_test)}, threads {args.threads}, precision {profile.runtime.precision}, "
          f"{time.perf_counter() - started:.0f} s in all\n")
    print("| model | eps | attack | F images | B images | seconds | robust after |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, eps, attack, forward, backward, seconds, robust in rows:
        counts = "| |" if forward is None else f"| {forward:,} | {backward:,} |"
        after = "" if robust is None else f"{100 * robust:.1f}%"
        print(f"| {name} | {eps} | {attack} {counts} {seconds:.1f} | {after} |")


if __name__ == "__main__":
    main()
