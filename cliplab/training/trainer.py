"""Adversarial fine-tuning of CLIP's image encoder (``objectives``), the text head frozen.

It trains what ``config.adapter`` names (``training.adapters``): every image-encoder weight, orthogonal rotations
or low-rank updates of them, the last blocks, or the biases and norms. Training is resumable: a run killed at any
moment restarts from its last checkpoint (``runs``) and ends with exactly the weights of an uninterrupted run with
the same seed.

Under ``torchrun`` the same code runs data-parallel: every process draws the same global batch (and inner-attack
random start) from the run's generator and trains on its own rows, DistributedDataParallel averages the gradients
before they are clipped, and only rank 0 writes checkpoints; every rank reads them to resume.

The study's settings (``Profile.finetune_config``) and the notebooks' cache of fine-tuned encoders
(``study.finetuning``) build on it.
"""
from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import _distributed, _torch
from .._io import run_lock
from ..attacks.common import random_delta
from ..classifier import ZeroShotClassifier
from ..evaluation.sweeps import pgd_accuracy
from .adapters import apply_adapter, check_adapter
from .config import FinetuneConfig
from .objectives import objective_config, training_objective
from .optimizer import adamw
from .runs import check_run_directory, read_checkpoint, remove_temporary_files, run_settings, save_checkpoint


def prepare(classifier: ZeroShotClassifier, config: FinetuneConfig) -> list[torch.nn.Parameter]:
    """Freeze the classifier except what ``config.adapter`` trains in the image encoder (``apply_adapter``); return
    that."""
    classifier.requires_grad_(False)
    return apply_adapter(classifier.model.visual, config)


def finetune(classifier: ZeroShotClassifier, x: torch.Tensor, y: torch.Tensor, config: FinetuneConfig,
             out: str | os.PathLike, *, resume: bool = False,
             eval_data: tuple[torch.Tensor, torch.Tensor] | None = None) -> ZeroShotClassifier:
    """Adversarially fine-tune ``classifier``'s image encoder in place on images ``x`` (labels ``y``
    are used by TeCoA only), checkpointing into ``out``.

    Args:
        classifier: the zero-shot classifier; its text head and logit scale stay frozen.
        x: (N, 3, H, W) training images in [0, 1]; y: (N,) labels.
        config: the run's settings.
        out: directory for checkpoints (``checkpoint-<step>.safetensors`` + ``.state.pt``, ``latest.json``).
        resume: continue from ``out``'s last checkpoint (an error when there is none).
        eval_data: held-out images and labels, evaluated every ``config.eval_every`` steps (PGD with the
            inner attack's eps and steps, margin loss); the results join that step's history entry.

    Returns:
        The fine-tuned classifier (OFT and LoRA still unmerged; ``merge_adapters`` folds them in).
    """
    out = Path(out)
    # every check passes in every process or fails in all of them (torchrun), before the model is touched
    _distributed.on_every_rank(lambda: _check_arguments(classifier, config, eval_data), "fine-tuning's settings")
    _distributed.check_same_everywhere(
        {**run_settings(config), "images": tuple(x.shape), "resume": resume,
         "eval_images": None if eval_data is None else tuple(eval_data[0].shape)}, "fine-tuning's settings")
    with contextlib.ExitStack() as held:
        checkpoint = _distributed.on_every_rank(lambda: _open_run(held, out, config, resume), f"opening {out}")
        _train(classifier, x, y, config, out, checkpoint, eval_data)
    return classifier


def _check_arguments(classifier: ZeroShotClassifier, config: FinetuneConfig, eval_data) -> None:
    config.validate()
    check_adapter(classifier.model.visual, config)
    if config.eval_every and eval_data is None:
        raise ValueError("eval_every needs eval_data: pass held-out (images, labels), or set eval_every=0")


def _open_run(held: contextlib.ExitStack, out: Path, config: FinetuneConfig, resume: bool):
    """Lock ``out`` for the whole run, check it, and read the checkpoint to resume from (None for a new run).

    Only the main process locks and writes ``out``; when resuming, every process checks it and reads the
    checkpoint itself (a multi-node run needs ``out`` on a shared file system)."""
    main = _distributed.is_main()
    if main:
        held.enter_context(run_lock(out))  # one run per directory, for the whole run
    check_run_directory(out, config, resume)
    checkpoint = read_checkpoint(out) if resume else None
    if main:
        remove_temporary_files(out)  # what a killed run left half-written
    return checkpoint


def _train(classifier, x, y, config, out, checkpoint, eval_data) -> None:
    """The training loop of ``finetune``, from ``checkpoint`` (weights and state) or from the start (None)."""
    original = copy.deepcopy(classifier.model.visual).eval().requires_grad_(False)  # f0, frozen
    trainable = prepare(classifier, config)
    optimizer, schedule = adamw(trainable, lr=config.lr, weight_decay=config.weight_decay,
                                warmup=config.warmup, total=config.steps)
    generator = torch.Generator().manual_seed(config.seed)  # batch order and attack starts, the same in every process
    start, history = 0, []  # history, per step: loss and the batch's clean / adversarial accuracy
    if checkpoint is not None:
        weights, state = checkpoint
        # the image encoder alone (all a checkpoint holds, or of an older one's whole model): the rest never trains,
        # and may be another model's (06's fine-tuned copies share the original's)
        classifier.model.visual.load_state_dict(
            {name.removeprefix("visual."): tensor for name, tensor in weights.items() if name.startswith("visual.")})
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        start, history = state["step"], state["history"]
    objective = training_objective(classifier, original, config)
    device = x.device
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps,
               disable=not (config.progress and _distributed.is_main()), desc=f"{config.method}-{config.adapter}")
    running = {"clean": 0.0, "robust": 0.0}
    for step in bar:
        # the global batch: every process draws the same indices and takes its own rows of them (train_step)
        index = torch.randint(len(x), (config.batch_size,), generator=generator).to(device)
        attack_seed = int(torch.randint(2**62, (1,), generator=generator))
        loss, clean_hit, robust_hit = train_step(objective, x[index], y[index], optimizer, trainable, attack_seed)
        schedule.step()
        history.append({"step": step + 1, "loss": loss, "clean": clean_hit, "robust": robust_hit})
        if config.eval_every and (step + 1) % config.eval_every == 0:
            history[-1].update(_evaluate(classifier, *eval_data, config))
            if config.progress and _distributed.is_main():
                bar.write(f"step {step + 1}: held-out clean {history[-1]['eval_clean']:.1%}, robust "
                          f"{history[-1]['eval_robust']:.1%} (n={history[-1]['eval_n']})")
        for key, value in (("clean", clean_hit), ("robust", robust_hit)):
            running[key] = 0.9 * running[key] + 0.1 * value if step > start else value
        bar.set_postfix(loss=f"{loss:.4f}", clean=f"{running['clean']:.2f}", robust=f"{running['robust']:.2f}")
        if ((step + 1) % config.save_every == 0 or step + 1 == config.steps) and _distributed.is_main():
            save_checkpoint(out, step + 1, classifier, optimizer, schedule, generator, config, history)


def train_step(objective: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, optimizer: torch.optim.Optimizer,
               trainable: list[torch.nn.Parameter], attack_seed: int) -> tuple[float, float, float]:
    """One optimiser step on a global batch: inner attack, loss, backward, gradient clipping, update (no schedule
    step). Under ``torch.distributed`` each process takes its own rows of the batch; the gradients are averaged
    over the processes before they are clipped, and the returned figures are those of the whole batch.

    Args:
        objective: ``training_objective(classifier, original, config)``.
        x: (B, 3, H, W) the global batch's images in [0, 1]; y: (B,) labels (TeCoA only).
        optimizer: the optimizer of ``trainable``.
        trainable: the trained parameters, whose gradient norm is clipped.
        attack_seed: seeds the inner attack's random start, drawn for the whole batch (so that the processes share
            one draw, that of a single process).

    Returns:
        The loss, and the batch's clean and adversarial zero-shot accuracy.
    """
    config = objective_config(objective)
    start = random_delta(x, config.eps, "linf", torch.Generator(x.device).manual_seed(attack_seed))
    rows = _distributed.my_rows(len(x))
    with _torch.cast_cache(x.device):  # the inner attack's passes share one bf16 copy of each trained weight
        loss, clean_hit, robust_hit = objective(x[rows], y[rows], start[rows])
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # under DDP, averages the gradients over the processes
    torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
    optimizer.step()
    figures = torch.stack([loss.detach(), clean_hit, robust_hit])
    loss, clean_hit, robust_hit = (_distributed.sum_over_ranks(figures) / _distributed.rank_and_size()[1]).tolist()
    return loss, clean_hit, robust_hit  # one host sync


def _evaluate(classifier, x, y, config) -> dict:
    """Held-out clean and robust accuracy, the attack seeded on its own so that training is unaffected."""
    result = pgd_accuracy(classifier, x, y, eps=config.eps, steps=config.attack_steps, loss="margin", seed=0,
                          progress=False)
    return {"eval_clean": result.clean.value, "eval_robust": result.robust.value, "eval_n": len(y)}
