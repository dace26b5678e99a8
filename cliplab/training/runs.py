"""A fine-tuning run's directory: its checkpoints (written atomically, fsynced, old ones pruned), the check that a
directory holds this run and nothing else, and the lock that keeps a second run out.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
from dataclasses import asdict
from pathlib import Path

import torch

from .. import _distributed
from .._arguments import check_directory
from .._io import LOCK_FILE, TEMPORARY_GLOB, atomic_write, save_tensors
from .config import FinetuneConfig, unused_sizes

_CHECKPOINT_FILE = re.compile(r"checkpoint-\d+\.(safetensors|state\.pt)")


# ------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(out: Path, step: int, classifier, optimizer, schedule, generator, config, history) -> None:
    """Write the image encoder's weights (safetensors, named as in the whole model: ``visual.*``) and the
    optimiser/scheduler/RNG state atomically, then point ``latest.json`` at them, then drop older checkpoints: a crash
    at any moment leaves a complete one. The text tower never trains, so it is not written (ViT-B/32's is 250 MB)."""
    save_tensors(classifier.model.visual.state_dict(prefix="visual."), out / f"checkpoint-{step}.safetensors")
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


def check_run_directory(out: str | os.PathLike, config: FinetuneConfig, resume: bool) -> None:
    """What ``finetune`` checks of ``out`` before it touches the model, cheap enough to run before any model or
    data is loaded (the CLI does): a directory; when resuming, a complete run trained with ``config``'s settings
    whose state file loads; otherwise no other run and no files of the user's in it.

    Under torchrun every process checks the run it resumes (each reads the checkpoint); only the main process checks
    a new run's directory (it alone writes there)."""
    if not (resume or _distributed.is_main()):
        return
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


def read_checkpoint(out: Path) -> tuple[dict, dict]:
    """The weights and optimiser/scheduler/RNG state of ``out``'s last checkpoint (checked by ``check_run_directory``)."""
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
    return (bool(_CHECKPOINT_FILE.fullmatch(name)) or name in ("latest.json", "history.json", LOCK_FILE)
            or fnmatch.fnmatch(name, TEMPORARY_GLOB))


def remove_temporary_files(out: Path) -> None:
    for tmp in out.glob(TEMPORARY_GLOB):
        tmp.unlink(missing_ok=True)


def run_settings(config: FinetuneConfig | dict) -> dict:
    """The settings that define a run: all but how often it saves or evaluates, whether it shows a bar, and the size
    settings of the adapters it does not use (``block_size`` means nothing to LoRA). Precision is not one of them: it
    is the classifier's, and it changes rounding, not the method (a run cached on a CPU stays usable on a GPU)."""
    settings = asdict(config) if isinstance(config, FinetuneConfig) else dict(config)
    unused = unused_sizes(settings.get("adapter"))
    return {k: v for k, v in settings.items() if k not in {"save_every", "eval_every", "progress", *unused}}


def check_same_run(stored: dict, config: FinetuneConfig, context: str) -> None:
    """Refuse to mix runs: ``stored`` (a saved config) must match ``config`` in every weight-relevant setting."""
    stored, wanted = run_settings(stored), run_settings(config)
    if stored != wanted:
        differing = ", ".join(f"{k}={stored.get(k)!r} there, {wanted.get(k)!r} now"
                              for k in sorted(stored.keys() | wanted.keys()) if stored.get(k) != wanted.get(k))
        raise ValueError(f"{context}: it was trained with other settings ({differing})")
