"""Stand-ins for what the real study downloads, so that CI runs the `cifar100` path offline.

- A randomly initialised ViT-B-32 saved to a local file: it loads through ``--pretrained PATH``, the same call
  as a downloaded checkpoint.
- CIFAR-100 in torchvision's on-disk format (``cifar-100-python/{train,test,meta}``: pickles with the real
  100 class names), read by torchvision's own ``CIFAR100``. Its files cannot match the published checksums,
  so the tests accept the stand-in's own checksums instead, in the test process (``accept_checksums``) and
  in the notebooks' kernels (``kernel_startup``): torchvision still verifies every file, against these.
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np

from cliplab.data import CIFAR100_CLASSES


def write_cifar100(root: Path, labels: dict[str, list[int]], seed: int = 0) -> dict[str, str]:
    """Write a CIFAR-100 stand-in with random images and the given labels per split; return each file's md5."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, fine in labels.items():
        data = rng.integers(0, 256, size=(len(fine), 3072), dtype=np.uint8)  # rows of CHW planes, as CIFAR
        _dump(folder / split, {"data": data, "fine_labels": list(fine), "coarse_labels": [0] * len(fine)})
    names = [name.replace(" ", "_") for name in CIFAR100_CLASSES]  # torchvision's spelling: "aquarium_fish"
    _dump(folder / "meta", {"fine_label_names": names, "coarse_label_names": [f"group_{i}" for i in range(20)]})
    return {part: hashlib.md5((folder / part).read_bytes()).hexdigest() for part in ("train", "test", "meta")}


def relabel(root: Path, split: str, labels: list[int]) -> dict[str, str]:
    """Replace the labels of one split, keeping its images; return every file's md5."""
    folder = root / "cifar-100-python"
    with open(folder / split, "rb") as f:
        entry = pickle.load(f)
    entry["fine_labels"] = [int(label) for label in labels]
    _dump(folder / split, entry)
    return {part: hashlib.md5((folder / part).read_bytes()).hexdigest() for part in ("train", "test", "meta")}


def checksum_patch(md5: dict[str, str]) -> str:
    """Python source that makes torchvision's CIFAR100 verify against the stand-in's checksums."""
    return ("from torchvision.datasets import CIFAR100\n"
            f"CIFAR100.train_list = [['train', {md5['train']!r}]]\n"
            f"CIFAR100.test_list = [['test', {md5['test']!r}]]\n"
            f"CIFAR100.meta = {{**CIFAR100.meta, 'md5': {md5['meta']!r}}}\n")


def accept_checksums(monkeypatch, md5: dict[str, str]) -> None:
    """In this process, for this test: torchvision verifies CIFAR-100 against the stand-in's checksums."""
    from torchvision.datasets import CIFAR100

    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5["meta"]})


def kernel_startup(directory: Path, md5: dict[str, str]) -> Path:
    """An IPYTHONDIR whose startup script applies ``checksum_patch`` in every kernel started with it."""
    startup = directory / "profile_default" / "startup"
    startup.mkdir(parents=True, exist_ok=True)
    (startup / "00-cifar100-standin.py").write_text(checksum_patch(md5))
    return directory


def _dump(path: Path, entry: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)  # the real files are Python 2 pickles; torchvision reads latin-1
