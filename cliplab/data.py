"""Data sets as (x, y, class_names) tensors in the data contract: float NCHW in [0, 1], native 32x32.

- ``shapes``: Shapes-100, 10 colours x 10 shapes, rendered by cliplab deterministically from a seed.
- ``cifar100``: CIFAR-100 through torchvision, with readable class names and the CLIP paper's prompts.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from ._arguments import check_choice, check_int, check_seed
from ._network import ensure_reachable

# (name, RGB) in [0, 1]; far enough apart to stay distinguishable under the per-image jitter below.
COLOURS = (
    ("red", (0.85, 0.10, 0.10)), ("orange", (1.00, 0.55, 0.05)), ("yellow", (0.95, 0.90, 0.10)),
    ("green", (0.10, 0.70, 0.15)), ("cyan", (0.10, 0.85, 0.90)), ("blue", (0.10, 0.20, 0.90)),
    ("purple", (0.50, 0.10, 0.70)), ("pink", (1.00, 0.55, 0.75)), ("white", (0.97, 0.97, 0.97)),
    ("black", (0.03, 0.03, 0.03)),
)
SHAPES = ("circle", "ring", "triangle", "square", "arrow", "star", "cross", "crescent", "ellipse",
          "semicircle")
SHAPES100_CLASSES = tuple(f"{colour} {shape}" for colour, _ in COLOURS for shape in SHAPES)
SHAPES100_TEMPLATES = (
    "a photo of a {}.", "a drawing of a {}.", "a picture of the {}.", "a small {}.", "a big {}.",
    "an image of a {}.", "a rendering of a {}.", "a {} on a plain background.",
)

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
SPLIT_SEEDS = {"train": 0, "test": 1}  # disjoint random streams for the two Shapes-100 splits
SHAPES_TRAIN_SIZE, SHAPES_TEST_SIZE = 50_000, 10_000
SHAPES_CHUNK = 1000  # images rendered per seeded chunk
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


# ----------------------------------------------------------------------------------------- Shapes-100
def render_shapes(n: int, seed: int = 0, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Render ``n`` Shapes-100 images, batched, deterministically from ``seed``.

    Each image: a tinted, shaded background; one shape of a random class at a random position, size and
    rotation, its colour jittered slightly; soft (anti-aliased) edges from a signed distance. Images are
    drawn in fixed chunks with their own seeds, so the first k of n images do not depend on n.

    Returns:
        x: (n, 3, size, size) in [0, 1]; y: (n,) int64 with y = 10 * colour + shape.
    """
    check_int(n, "n")
    chunks = [_render_chunk(seed * 1_000_003 + c, size) for c in range((n + SHAPES_CHUNK - 1) // SHAPES_CHUNK)]
    return torch.cat([x for x, _ in chunks])[:n].contiguous(), torch.cat([y for _, y in chunks])[:n]


def _render_chunk(seed: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = SHAPES_CHUNK
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    y = torch.randint(len(SHAPES100_CLASSES), (n,), generator=gen)
    colour_idx, shape_idx = y // len(SHAPES), y % len(SHAPES)

    radius = size * (0.25 + 0.15 * rand(n))  # (n,) pixels
    centre = size / 2 + (rand(n, 2) - 0.5) * (size - 2 * radius[:, None] - 2).clamp(min=0)  # (n, 2)
    angle = 2 * math.pi * rand(n)
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    py, px = torch.meshgrid(coords, coords, indexing="ij")  # (S, S)
    dx, dy = px - centre[:, 0, None, None], py - centre[:, 1, None, None]  # (n, S, S)
    cos, sin = angle.cos()[:, None, None], angle.sin()[:, None, None]
    u, v = (cos * dx + sin * dy), (-sin * dx + cos * dy)  # rotated frame, pixels

    distance = torch.empty(n, size, size)
    for k, shape in enumerate(SHAPES):  # one batched call per shape class, not per image
        members = shape_idx == k
        if members.any():
            distance[members] = _signed_distance(shape, u[members], v[members], radius[members, None, None])
    coverage = (0.5 - distance).clamp(0, 1)[:, None]  # (n, 1, S, S): one pixel of anti-aliasing

    palette = torch.tensor([rgb for _, rgb in COLOURS])
    colour = (palette[colour_idx] + 0.06 * (rand(n, 3) - 0.5)).clamp(0, 1)[:, :, None, None]
    tint = 0.30 + 0.40 * rand(n, 1) + 0.08 * (rand(n, 3) - 0.5)  # mid-grey, slightly coloured
    slope = (rand(n, 2) - 0.5) * 0.3 / size  # a gentle linear shading
    shading = slope[:, 0, None, None] * (px - size / 2) + slope[:, 1, None, None] * (py - size / 2)
    background = (tint[:, :, None, None] + shading[:, None]).clamp(0, 1)
    x = coverage * colour + (1 - coverage) * background
    return x.clamp(0, 1), y


def _signed_distance(shape: str, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Approximate signed distance in pixels (negative inside) of a shape of radius ``r`` at the origin."""
    rho, theta = torch.hypot(u, v), torch.atan2(v, u)
    if shape == "circle":
        return rho - 0.9 * r
    if shape == "ring":
        return (rho - 0.7 * r).abs() - 0.28 * r
    if shape == "triangle":
        return _polygon(u, v, r, 3)
    if shape == "square":
        return _polygon(u, v, 0.95 * r, 4)
    if shape == "arrow":  # a triangular head on a shaft
        head = _polygon(u, v + 0.3 * r, 0.65 * r, 3, phase=-math.pi / 2)  # tip at v = -0.95 r
        shaft = torch.maximum(u.abs() - 0.18 * r, (v - 0.45 * r).abs() - 0.5 * r)  # v in [-0.05 r, 0.95 r]
        return torch.minimum(head, shaft)
    if shape == "star":
        phase = torch.remainder(theta, 2 * math.pi / 5) / (2 * math.pi / 5)  # in [0, 1) per branch
        edge = r * (0.38 + 0.62 * (1 - 2 * (phase - 0.5).abs()))  # five sharp points, straight-ish flanks
        return rho - edge
    if shape == "cross":
        arm, half = 0.95 * r, 0.3 * r
        bar = lambda a, b: torch.maximum(a.abs() - arm, b.abs() - half)  # noqa: E731
        return torch.minimum(bar(u, v), bar(v, u))
    if shape == "crescent":
        bite = torch.hypot(u - 0.45 * r, v) - 0.75 * r
        return torch.maximum(rho - 0.9 * r, -bite)
    if shape == "ellipse":
        a, b = r, 0.38 * r
        return (torch.sqrt((u / a) ** 2 + (v / b) ** 2) - 1) * b
    if shape == "semicircle":
        v = v + 0.4 * r  # centre the half disc on the origin
        return torch.maximum(torch.hypot(u, v) - r, -v)
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def _polygon(u: torch.Tensor, v: torch.Tensor, r, sides: int, phase: float = 0.0) -> torch.Tensor:
    """Signed distance to the edges of a regular polygon with circumradius ``r``, one vertex at ``phase``."""
    sector = 2 * math.pi / sides
    theta = torch.atan2(v, u) - phase
    return torch.hypot(u, v) * torch.cos(torch.remainder(theta, sector) - sector / 2) - r * math.cos(math.pi / sides)


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
