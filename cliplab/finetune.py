"""Adversarial fine-tuning of CLIP's image encoder, the text head frozen.

- FARE (Schlarmann et al., ICML 2024), unsupervised: the inner attack maximises ||f(x + delta) - f0(x)||^2,
  f0 the frozen original encoder; the outer step minimises it (plus, optionally, the clean term
  ||f(x) - f0(x)||^2). No labels needed, and the embedding stays compatible with the text encoder.
- TeCoA (Mao et al., ICLR 2023), supervised baseline: cross-entropy of the adversarial zero-shot logits.

Either adapts all image-encoder weights (``adapter="full"``) or only orthogonal rotations of them
(``adapter="oft"``, ``cliplab.oft``). Training is resumable: a run killed at any moment restarts from its
last checkpoint and ends with exactly the weights of an uninterrupted run with the same seed.

Under ``torchrun`` the same code runs data-parallel: every process draws the same global batch (and inner-attack
random start) from the run's generator and trains on its own rows, DistributedDataParallel averages the gradients
before they are clipped, and only rank 0 writes checkpoints; every rank reads them to resume.

This module is the trainer and its checkpoints only; the study's settings (``Profile.finetune_config``) and the
notebooks' cache of fine-tuned encoders (``cliplab.study``) build on it.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import json
import os
import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

from . import _distributed, _torch
from ._checks import check_choice, check_directory, check_int, check_positive
from ._io import TEMPORARY_GLOB, atomic_write, save_tensors
from ._train import adamw
from .attacks import pgd, pgd_maximize, random_delta
from .classifier import ZeroShotClassifier
from .evaluation import robust_accuracy
from .oft import apply_oft, oft_parameters

METHODS, ADAPTERS = ("fare", "tecoa"), ("full", "oft")
_CHECKPOINT_FILE = re.compile(r"checkpoint-\d+\.(safetensors|state\.pt)")
_LOCK = ".lock"


@dataclass
class FinetuneConfig:
    method: str = "fare"  # "fare" (unsupervised) or "tecoa" (supervised)
    adapter: str = "full"  # "full": every image-encoder weight; "oft": orthogonal fine-tuning
    block_size: int = 8  # OFT block size (must divide the encoder's widths)
    eps: float = 4 / 255  # L-inf radius of the inner attack, on [0, 1] images
    attack_steps: int = 10  # inner PGD steps
    clean_weight: float = 0.0  # FARE: weight of the clean term ||f(x) - f0(x)||^2
    steps: int = 300  # optimiser steps
    batch_size: int = 64  # images per step: the global batch, over all processes under torchrun
    lr: float = 1e-4  # peak AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay on matrices (not on 1-D parameters)
    warmup: int = 30  # linear warm-up steps before the cosine decay
    grad_clip: float = 1.0  # maximum gradient norm
    save_every: int = 50  # checkpoint period in steps
    eval_every: int = 0  # clean and robust accuracy on held-out images every this many steps (0: never)
    seed: int = 0  # seeds batch order and attack starts
    progress: bool = True  # tqdm bar with loss and running clean/robust accuracy

    def validate(self) -> None:
        check_choice(self.method, "method", METHODS)
        check_choice(self.adapter, "adapter", ADAPTERS)
        check_int(self.block_size, "block_size")
        check_positive(self.eps, "eps", allow_zero=True)
        if not 0 < self.eps <= 1:  # radius 0 would train on clean images and call the result adversarial
            raise ValueError(f"eps must be in (0, 1] (pixel values are in [0, 1]; adversarial fine-tuning needs a "
                             f"radius), got {self.eps}")
        for name in ("attack_steps", "steps", "batch_size", "save_every"):
            check_int(getattr(self, name), name)
        check_int(self.warmup, "warmup", minimum=0)
        check_int(self.eval_every, "eval_every", minimum=0)
        check_positive(self.lr, "lr")
        check_positive(self.weight_decay, "weight_decay", allow_zero=True)
        check_positive(self.clean_weight, "clean_weight", allow_zero=True)
        check_positive(self.grad_clip, "grad_clip")
        world = _distributed.rank_and_size()[1]
        if self.batch_size % world:
            raise ValueError(f"batch_size is the global batch, split evenly over the {world} processes: it must be "
                             f"a multiple of {world}, got {self.batch_size}")


def prepare(classifier: ZeroShotClassifier, config: FinetuneConfig) -> list[torch.nn.Parameter]:
    """Freeze the classifier except what ``config.adapter`` trains in the image encoder; return that."""
    for parameter in classifier.parameters():
        parameter.requires_grad_(False)
    visual = classifier.model.visual
    if config.adapter == "oft":
        apply_oft(visual, block_size=config.block_size)
        return oft_parameters(visual)
    for parameter in visual.parameters():
        parameter.requires_grad_(True)
    return list(visual.parameters())


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
        The fine-tuned classifier (OFT rotations still unmerged; ``merge_oft`` folds them in).
    """
    out = Path(out)
    # every check passes in every process or fails in all of them (torchrun), before the model is touched
    _distributed.on_every_rank(lambda: _check_arguments(config, eval_data), "fine-tuning's settings")
    _distributed.check_same_everywhere(
        {**run_settings(config), "images": tuple(x.shape), "resume": resume,
         "eval_images": None if eval_data is None else tuple(eval_data[0].shape)}, "fine-tuning's settings")
    with contextlib.ExitStack() as held:
        checkpoint = _distributed.on_every_rank(lambda: _open_run(held, out, config, resume), f"opening {out}")
        _train(classifier, x, y, config, out, checkpoint, eval_data)
    return classifier


def _check_arguments(config: FinetuneConfig, eval_data) -> None:
    config.validate()
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
    checkpoint = _read_checkpoint(out) if resume else None
    if main:
        _remove_temporary_files(out)  # what a killed run left half-written
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
        classifier.model.load_state_dict(weights)
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
            _save_checkpoint(out, step + 1, classifier, optimizer, schedule, generator, config, history)


class TrainingObjective(torch.nn.Module):
    """One step's loss on a batch, inner attack included: a module, so that ``DistributedDataParallel`` can wrap it
    (its forward is where DDP prepares the gradient all-reduce of the backward that follows).

    ``forward(x, y, start)`` returns the loss and the batch's clean and adversarial zero-shot accuracy (0-d
    tensors); ``start`` is the inner attack's random start."""

    def __init__(self, classifier: ZeroShotClassifier, original: torch.nn.Module, config: FinetuneConfig):
        super().__init__()
        self.classifier, self.original, self.config = classifier, original, config

    def forward(self, x, y, start):
        return _loss(self.classifier, self.original, x, y, self.config, start)


def training_objective(classifier: ZeroShotClassifier, original: torch.nn.Module,
                       config: FinetuneConfig) -> torch.nn.Module:
    """The ``TrainingObjective`` of ``classifier`` (``prepare``-d), wrapped in ``DistributedDataParallel`` in a
    process group (torchrun, a group of one included): only the trained parameters take part, and their gradients
    are averaged over the processes during the backward pass."""
    objective = TrainingObjective(classifier, original, config)
    if not _distributed.active():
        return objective
    device = _torch.device_of(classifier, torch.device("cpu"))
    return torch.nn.parallel.DistributedDataParallel(objective, device_ids=[device] if device.type == "cuda" else None)


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
    config = _config(objective)
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


def _config(objective: torch.nn.Module) -> FinetuneConfig:
    return getattr(objective, "module", objective).config  # DDP keeps the wrapped module as .module


def _evaluate(classifier, x, y, config) -> dict:
    """Held-out clean and robust accuracy, the attack seeded on its own so that training is unaffected."""
    result = robust_accuracy(classifier, x, y, eps=config.eps, steps=config.attack_steps, loss="margin", seed=0,
                             progress=False)
    return {"eval_clean": result.clean.value, "eval_robust": result.robust.value, "eval_n": len(y)}


def _loss(classifier, original, x, y, config, start):
    """One training step's loss; also the batch's clean and adversarial zero-shot accuracy (0-d tensors)."""
    alpha = 2.5 * config.eps / config.attack_steps
    with torch.no_grad(), classifier.autocast(x.device):  # f0 in the classifier's precision
        target = original(classifier.preprocess(x)).float()  # f0(x), (B, D)
    with _torch.eval_mode(classifier), parametrize.cached():  # OFT: each rotation is built once for the whole attack
        if config.method == "fare":
            distance = lambda images: (classifier.image_features(images) - target).pow(2).sum(1)  # noqa: E731
            x_adv = pgd_maximize(distance, x, eps=config.eps, alpha=alpha, steps=config.attack_steps, start=start)
        else:
            x_adv = pgd(classifier, x, y, eps=config.eps, alpha=alpha, steps=config.attack_steps, start=start).x_adv
    features_clean = None  # f(x): part of the loss with FARE's clean term, else only for the statistics
    # image_features runs in the classifier's precision (bf16 autocast on CUDA); the losses stay fp32
    features_adv = classifier.image_features(x_adv)
    logits_adv = classifier.logits_from_features(features_adv)
    if config.method == "fare":
        loss = (features_adv - target).pow(2).sum(1).mean()
        if config.clean_weight:
            features_clean = classifier.image_features(x)
            loss = loss + config.clean_weight * (features_clean - target).pow(2).sum(1).mean()
    else:
        loss = F.cross_entropy(logits_adv, y)
    with torch.no_grad():
        if features_clean is None:
            features_clean = classifier.image_features(x)
        clean_hit = (classifier.logits_from_features(features_clean).argmax(1) == y).float().mean()
    robust_hit = (logits_adv.argmax(1) == y).float().mean()
    return loss, clean_hit, robust_hit


# ------------------------------------------------------------------------------------------ checkpoints
def _save_checkpoint(out: Path, step: int, classifier, optimizer, schedule, generator, config, history) -> None:
    """Write weights (safetensors) and optimiser/scheduler/RNG state atomically, then point
    ``latest.json`` at them, then drop older checkpoints: a crash at any moment leaves a complete one."""
    save_tensors(classifier.model.state_dict(), out / f"checkpoint-{step}.safetensors")
    with atomic_write(out / f"checkpoint-{step}.state.pt") as tmp:
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "generator": generator.get_state(), "config": asdict(config), "history": history}, tmp)
    with atomic_write(out / "history.json") as tmp:  # training curves, readable without torch
        Path(tmp).write_text(json.dumps(history))
    with atomic_write(out / "latest.json") as tmp:
        Path(tmp).write_text(json.dumps({"step": step}))
    for old in out.glob("checkpoint-*"):  # only this trainer's own files: a user's checkpoint-best.pt stays
        if _CHECKPOINT_FILE.fullmatch(old.name) and not old.name.startswith(f"checkpoint-{step}."):
            old.unlink()


def _latest(out: Path) -> Path:
    """The weights file of ``out``'s last complete checkpoint, with clear errors when there is none."""
    latest = out / "latest.json"
    if not latest.is_file():
        raise FileNotFoundError(f"cannot resume: no checkpoint in {out} (missing {latest.name})")
    try:
        step = int(json.loads(latest.read_text())["step"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"cannot resume: {latest} is corrupted ({error})") from error
    weights = out / f"checkpoint-{step}.safetensors"
    if not weights.is_file() or not weights.with_suffix(".state.pt").is_file():
        raise FileNotFoundError(f"cannot resume: {latest} names step {step}, whose files are missing in {out}")
    return weights


def check_out(out: str | os.PathLike, config: FinetuneConfig, resume: bool) -> None:
    """What ``finetune`` checks of ``out`` before it touches the model, cheap enough to run before any model or
    data is loaded (the CLI does): a directory; when resuming, a complete run trained with ``config``'s settings
    whose state file loads; otherwise no other run and no files of the user's in it."""
    out = Path(out)
    check_directory(out, "out")
    if not resume:
        _check_fresh(out)
        return
    weights = _latest(out)
    state_file = weights.with_suffix(".state.pt")
    try:  # weights_only: a state file holding pickled objects is refused, not executed; mmap: no tensor is read
        stored = torch.load(state_file, weights_only=True, mmap=True)["config"]
    except Exception as error:  # a truncated, foreign or malicious file: say which, not a deep trace
        raise ValueError(f"cannot resume: {state_file} is corrupted or not a cliplab checkpoint ({error})") from error
    _check_weights_file(weights)
    check_same_run(stored, config, f"cannot resume from {out}")


def _check_weights_file(weights: Path) -> None:
    """A checkpoint's weights file whose header and size agree (safetensors reads the header alone and checks that
    the file covers every tensor), so a truncated file is refused before any model loads, not after."""
    from safetensors import safe_open

    try:
        with safe_open(weights, framework="pt"):
            pass
    except Exception as error:
        raise ValueError(f"cannot resume: {weights} is corrupted or truncated ({error})") from error


def check_run_directory(out: str | os.PathLike, config: FinetuneConfig, resume: bool) -> None:
    """``check_out`` as this process needs it: every process checks the run it resumes (each reads the checkpoint);
    only the main process checks a new run's directory (it alone writes there)."""
    if resume or _distributed.is_main():
        check_out(out, config, resume)


def _read_checkpoint(out: Path) -> tuple[dict, dict]:
    """The weights and optimiser/scheduler/RNG state of ``out``'s last checkpoint (checked by ``check_out``)."""
    from safetensors.torch import load_file

    weights = _latest(out)
    try:
        tensors = load_file(weights)
    except Exception as error:
        raise ValueError(f"cannot resume: {weights} is corrupted or not a cliplab checkpoint ({error})") from error
    return tensors, torch.load(weights.with_suffix(".state.pt"), weights_only=True)


def _check_fresh(out: Path) -> None:
    """A new run goes into a new, empty or half-started directory; never over another run or a user's files."""
    if (out / "latest.json").exists():
        raise FileExistsError(f"{out} already holds a run: resume it (resume=True, --resume) or choose another out")
    foreign = sorted(p.name for p in out.iterdir() if not _is_run_file(p.name)) if out.is_dir() else []
    if foreign:
        raise FileExistsError(f"{out} holds files that are not a cliplab run ({', '.join(foreign[:5])}"
                              f"{', ...' if len(foreign) > 5 else ''}): choose an empty or new directory")


def _is_run_file(name: str) -> bool:
    """Files a run writes: its checkpoints, history, pointer, lock and temporary files."""
    return (bool(_CHECKPOINT_FILE.fullmatch(name)) or name in ("latest.json", "history.json", _LOCK)
            or fnmatch.fnmatch(name, TEMPORARY_GLOB))


def _remove_temporary_files(out: Path) -> None:
    for tmp in out.glob(TEMPORARY_GLOB):
        tmp.unlink(missing_ok=True)


class RunLocked(FileExistsError):
    """Another process is training into the same directory (a run that exists, in progress)."""


_HELD: set[tuple[Path, int]] = set()  # (run directory, thread) for each lock this process holds


@contextlib.contextmanager
def run_lock(out: Path):
    """Hold an exclusive lock on ``out`` (its ``.lock`` file, which records the holder's pid) for the block; a
    second run into the same directory fails at once, naming the holder. The kernel drops the lock when the
    holder exits, killed or not. Re-entrant within a thread: ``finetune_and_evaluate`` takes it before loading
    anything, and the ``finetune`` it calls finds it held; another thread, like another process, is refused."""
    import fcntl

    key = (Path(out).resolve(), threading.get_ident())
    if key in _HELD:
        yield
        return
    check_directory(out, "out")
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / _LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise RunLocked(f"{out} is in use by another fine-tuning run (pid {holder}): wait for it to end, "
                            f"or choose another directory") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
    finally:
        os.close(fd)


def run_settings(config: FinetuneConfig | dict) -> dict:
    """The settings that define a run: all but how often it saves or evaluates and whether it shows a bar. Older
    records also hold a ``bf16`` flag, ignored: precision is the classifier's now, and it changes rounding, not
    the method (a run cached on a CPU stays usable on a GPU)."""
    settings = asdict(config) if isinstance(config, FinetuneConfig) else dict(config)
    return {k: v for k, v in settings.items() if k not in ("save_every", "eval_every", "progress", "bf16")}


def check_same_run(stored: dict, config: FinetuneConfig, context: str) -> None:
    """Refuse to mix runs: ``stored`` (a saved config) must match ``config`` in every weight-relevant setting."""
    stored, wanted = run_settings(stored), run_settings(config)
    if stored != wanted:
        differing = ", ".join(f"{k}={stored.get(k)!r} there, {wanted.get(k)!r} now"
                              for k in sorted(stored.keys() | wanted.keys()) if stored.get(k) != wanted.get(k))
        raise ValueError(f"{context}: it was trained with other settings ({differing})")
