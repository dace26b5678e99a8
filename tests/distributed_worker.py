"""One process of the torchrun jobs of ``test_distributed.py`` (run by ``torch.distributed.run``, not by pytest).

``finetune OUT CONFIG_JSON``: fine-tune the seeded random shapes classifier on the first 64 shapes test images
(``--resume`` continues; ``--kill-at-step N`` makes rank 1 SIGKILL itself during its N-th step; ``--rank1-out`` and
``--rank1-seed`` give rank 1 another directory or seed, as a misconfigured launch would).

``evaluate RESULT_JSON``: the data-set level evaluations of the trained shapes classifier on 90 test images; rank 0
writes their counts and per-image outcomes.
"""
import argparse
import json
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

import cliplab
from cliplab import _distributed, evaluation, training as ft
from cliplab.training import objectives
from cliplab.study import random_targets


def training_data():
    x, y, _ = cliplab.load_dataset("shapes", split="test", n=64)
    return x, y


def random_classifier():
    torch.manual_seed(0)
    classifier = cliplab.load_classifier("shapes", pretrained=None, device="cpu", precision="fp32")
    torch.manual_seed(0)
    return classifier


def finetune(args, rank: int) -> None:
    config = ft.FinetuneConfig(**json.loads(args.config))
    if rank == 1 and args.rank1_seed is not None:
        config.seed = args.rank1_seed
    out = Path(args.rank1_out if rank == 1 and args.rank1_out else args.out)
    if rank == 1 and args.kill_at_step:
        real_loss, calls = objectives.adversarial_loss, []

        def killed(*loss_args):
            calls.append(1)
            if len(calls) == args.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)  # kill -9: no cleanup, no exception, mid-run
            return real_loss(*loss_args)

        objectives.adversarial_loss = killed
    x, y = training_data()
    ft.finetune(random_classifier(), x, y, config, out, resume=args.resume, eval_data=(x[:16], y[:16]))


def evaluate(args, rank: int) -> None:
    classifier = cliplab.load_classifier("shapes", device="cpu", precision="fp32")
    x, y, _ = cliplab.load_dataset("shapes", split="test", n=90)
    eps = 4 / 255
    budget = evaluation.AttackBudget(steps=5, num_targets=2, queries=20)
    report = evaluation.evaluate_robustness(classifier, x, y, eps=eps, budget=budget, batch_size=16, progress=False)
    targets = random_targets(y, classifier.num_classes, seed=0)
    targeted = evaluation.attack_success_rate(classifier, x, y, eps=eps, targets=targets, batch_size=16, steps=3,
                                              seed=0, progress=False)
    robust = evaluation.pgd_accuracy(classifier, x, y, eps=eps, batch_size=16, steps=3, seed=0, progress=False)
    attacked = evaluation.attack_dataset(classifier, x, y, eps=eps, batch_size=16, steps=3, seed=0, progress=False)
    if rank == 0:
        Path(args.out).write_text(json.dumps(summary(report, targeted, robust, attacked)))


def summary(report, targeted, robust, attacked) -> dict:
    """Everything the single-process run is compared with, exactly."""
    return {"clean": report.clean.as_dict(), "robust": report.robust.as_dict(),
            "per_attack": {name: p.as_dict() for name, p in report.per_attack.items()},
            "standing": report.standing.tolist(), "targeted": targeted.as_dict(),
            "robust_accuracy": {"clean": robust.clean.as_dict(), "robust": robust.robust.as_dict()},
            "prediction": attacked.prediction.tolist(), "x_adv_sum": attacked.x_adv.double().sum().item()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("task", choices=("finetune", "evaluate"))
    parser.add_argument("out")
    parser.add_argument("config", nargs="?", default="{}")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-at-step", type=int, default=0)
    parser.add_argument("--rank1-out")
    parser.add_argument("--rank1-seed", type=int)
    args = parser.parse_args()
    torch.set_num_threads(1)
    _distributed.start()
    try:
        (finetune if args.task == "finetune" else evaluate)(args, dist.get_rank())
    finally:
        _distributed.stop()


if __name__ == "__main__":
    main()
