"""Worst-case evaluations shared within one run: ``cliplab reproduce`` runs 05 and 06, which both evaluate the
original model and FARE-full in exactly the same way, and each such evaluation is made once. An evaluation is known
by everything its result depends on (``fingerprint``); the first notebook to need it makes it, and the other reads it
(``shared``), after it has made its own evaluations if it would have to wait. The run's directory of evaluations goes
with the run, so a new run always evaluates afresh.
"""
from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .. import _torch
from .._io import atomic_write, file_lock
from ..evaluation.ensemble import RobustnessReport

Reports = dict[float, RobustnessReport]


def fingerprint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: dict) -> str:
    """A digest of everything an evaluation's result depends on: every tensor of the model's state (weights, text
    head, normalisation), the images and labels, the settings, the device and precision, torch's version and
    cliplab's own source (a changed attack is a new evaluation)."""
    digest = hashlib.sha256()
    tensors = [*model.state_dict().items(), ("x", x), ("y", y)]
    for name, tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    device = _torch.device_of(model, x.device)
    precision = getattr(model, "precision", None)  # "auto" as what it means here: machines differ
    context = {**settings, "device": device.type, "torch": torch.__version__, "cliplab": _source(),
               "precision": precision and _torch.resolve_precision(device, precision)}
    digest.update(json.dumps(context, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:32]


@functools.cache
def _source() -> str:
    """A digest of every Python file of the installed cliplab package."""
    digest = hashlib.sha256()
    package = Path(__file__).resolve().parents[1]
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def shared(directory: str | Path, key: str, evaluate: Callable[[], Reports], *, wait: bool = True) -> Reports | None:
    """``evaluate()``'s reports, made once per ``key`` in ``directory``: read from ``<key>.json`` when an earlier
    notebook of the run made them; otherwise made now, while any other process that wants them waits. With
    ``wait=False``, None when another process is making them at the time."""
    path = Path(directory) / f"{key}.json"
    if not path.is_file():
        with file_lock(Path(directory) / f".{key}.lock", wait=wait) as held:
            if not held:
                return None
            if not path.is_file():
                reports = evaluate()
                with atomic_write(path) as tmp:
                    Path(tmp).write_text(json.dumps([report.as_dict() for report in reports.values()]))
    return {report.eps: report for report in map(RobustnessReport.from_dict, json.loads(path.read_text()))}
