"""Data sets as (x, y, class_names) tensors in the data contract: float NCHW in [0, 1], native 32x32.

- ``shapes``: Shapes-100, 10 colours x 10 shapes, rendered by cliplab deterministically from a seed (``shapes100``).
- ``cifar100``: CIFAR-100 through torchvision, with readable class names and the CLIP paper's prompts.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ._arguments import check_choice, check_int, check_seed
from ._network import ensure_reachable
from .shapes100 import (SHAPES100_CLASSES, SHAPES100_TEMPLATES, SHAPES_TEST_SIZE, SHAPES_TRAIN_SIZE, SPLIT_SEEDS,
                        render_shapes)

# The 18 CIFAR prompt templates of the CLIP paper (Radford et al. 2021, prompts for CIFAR-10/100).
CIFAR_TEMPLATES = (
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
    "a blurry photo of the {}.", "a black and white photo of the {}.", "a low contrast photo of the {}.",
    "a high contrast photo of the {}.", "a bad photo of the {}.", "a good photo of the {}.",
    "a photo of the small {}.", "a photo of the big {}.",
)
SINGLE_TEMPLATE = ("a photo of a {}.",)

DATASETS = ("shapes", "cifar100")
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


def class_names(name: str) -> list[str]:
    """Readable class names of a data set, without loading its images."""
    check_choice(name, "name", DATASETS)
    return list(SHAPES100_CLASSES if name == "shapes" else CIFAR100_CLASSES)


def templates(name: str, single: bool = False) -> list[str]:
    """Prompt templates of a data set (``single=True``: just ``"a photo of a {}."``)."""
    check_choice(name, "name", DATASETS)
    if single:
        return list(SINGLE_TEMPLATE)
    return list(SHAPES100_TEMPLATES if name == "shapes" else CIFAR_TEMPLATES)


def load_dataset(name: str, split: str = "test", n: int | None = None, root: str | os.PathLike | None = None, *,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Load a data set as tensors.

    Args:
        name: ``"shapes"`` (generated, offline) or ``"cifar100"`` (torchvision).
        split: ``"train"`` or ``"test"``.
        n: how many images (all when None). CIFAR-100's are the first ``n`` of a seeded permutation of the split
            (``sample_indices``, the one rule of every command and of the zero-shot suite, so that ``cliplab
            evaluate`` and ``cliplab benchmark`` judge a model on the same images for the same ``n`` and seed).
            Shapes-100 is rendered at random from its split's own seed, so its first ``n`` images are already a
            random sample, whatever ``seed``.
        root: CIFAR-100 cache directory; default ``$CLIPLAB_DATA`` or ``~/.cache/cliplab/data``.
        seed: the permutation's seed (CIFAR-100).

    Returns:
        x: (N, 3, 32, 32) float32 in [0, 1]; y: (N,) int64; class_names: readable names.
    """
    check_choice(name, "name", DATASETS)
    check_choice(split, "split", SPLIT_SEEDS)
    check_seed(seed)
    if n is not None:
        check_int(n, "n")
    if name == "shapes":
        size = SHAPES_TRAIN_SIZE if split == "train" else SHAPES_TEST_SIZE
        if n is not None and n > size:
            raise ValueError(f"n must be at most {size}, the size of the shapes {split} split, got {n}")
        x, y = render_shapes(n or size, seed=SPLIT_SEEDS[split])
        return x, y, list(SHAPES100_CLASSES)
    return _load_cifar100(split, n, root, seed)


def sample_indices(size: int, n: int | None, seed: int = 0, split: str = "test") -> torch.Tensor:
    """The images a command reads from a split of ``size`` images: the first ``n`` of a seeded permutation (all of
    it, permuted, when ``n`` is None). Test splits are often sorted by class, so the first ``n`` in file order
    would be a few classes only."""
    check_seed(seed)
    if n is not None:
        check_int(n, "n")
        if n > size:
            raise ValueError(f"n must be at most {size}, the size of the {split} split, got {n}")
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n]


# ------------------------------------------------------------------------------------------ CIFAR-100
def data_root(root: str | os.PathLike | None = None) -> Path:
    """Where CIFAR-100 is cached: ``root``, else ``$CLIPLAB_DATA``, else ``~/.cache/cliplab/data``."""
    return Path(root or os.environ.get("CLIPLAB_DATA") or Path.home() / ".cache" / "cliplab" / "data")


def _load_cifar100(split: str, n: int | None, root, seed: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    from torchvision.datasets import CIFAR100

    root, train = data_root(root), split == "train"
    dataset = _verified_cifar100(root, train) if _cifar100_present(root) else \
        CIFAR100(str(root), train=train, download=True)  # reachable: _cifar100_present checked
    chosen = sample_indices(len(dataset.data), n, seed, f"cifar100 {split}").numpy()
    x = torch.from_numpy(dataset.data[chosen]).permute(0, 3, 1, 2).float().div(255)  # (N, 3, 32, 32)
    y = torch.as_tensor(dataset.targets, dtype=torch.int64)[chosen]
    return x.contiguous(), y, [name.replace("_", " ") for name in dataset.classes]


def check_dataset(name: str, root: str | os.PathLike | None = None) -> None:
    """Fail fast, before any heavy work, when ``load_dataset(name, root=root)`` could not load.

    For CIFAR-100: the three files of ``cifar-100-python/`` must be there and pass torchvision's checksums
    (else the download must be possible); Shapes-100 is generated and always available.

    Raises:
        FileNotFoundError: files missing and no download possible (names the missing files).
        ValueError: files present but truncated or not the original ones.
    """
    check_choice(name, "name", DATASETS)
    if name == "cifar100":
        root = data_root(root)
        if _cifar100_present(root):
            _verified_cifar100(root, train=False)


def _cifar100_present(root: Path) -> bool:
    """Whether ``root`` holds all of CIFAR-100; when some files are missing and no download is possible,
    a FileNotFoundError names them (within seconds)."""
    from torchvision.datasets import CIFAR100

    folder = root / CIFAR100.base_folder
    missing = [part for part in ("train", "test", "meta") if not (folder / part).is_file()]
    if missing:
        ensure_reachable(CIFAR_URL, what=f"CIFAR-100 (missing {', '.join(missing)} in {folder})",
                         how=f"download {CIFAR_URL} on a machine with internet, unpack it into {root} "
                             "(it creates cifar-100-python/), and pass that directory as root=, --data or "
                             "CLIPLAB_DATA")
    return not missing


def _verified_cifar100(root: Path, train: bool):
    """torchvision's CIFAR100 over local files, which it verifies against the published checksums."""
    from torchvision.datasets import CIFAR100

    try:
        return CIFAR100(str(root), train=train, download=False)
    except RuntimeError as error:  # torchvision: "Dataset not found or corrupted"
        raise ValueError(f"CIFAR-100 in {root / CIFAR100.base_folder} failed torchvision's checksum: its files are "
                         f"truncated or not the original ones. Delete them and download again ({CIFAR_URL}), "
                         f"or point root= / --data at a good copy") from error


CIFAR100_CLASSES = (
    "apple", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl",
    "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair",
    "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin",
    "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp",
    "lawn mower", "leopard", "lion", "lizard", "lobster", "man", "maple tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak tree", "orange", "orchid", "otter", "palm tree", "pear", "pickup truck",
    "pine tree", "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet pepper", "table", "tank", "telephone", "television",
    "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow tree", "wolf",
    "woman", "worm",
)
