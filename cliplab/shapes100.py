"""Shapes-100, the `shapes` profile's data set: 10 colours x 10 shapes, rendered by cliplab deterministically from a
seed (no download), in the data contract (float NCHW in [0, 1], 32x32). ``data.load_dataset("shapes")`` reads it."""
from __future__ import annotations

import math

import torch

from ._arguments import check_int

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

SPLIT_SEEDS = {"train": 0, "test": 1}  # disjoint random streams for the two Shapes-100 splits
SHAPES_TRAIN_SIZE, SHAPES_TEST_SIZE = 50_000, 10_000
SHAPES_CHUNK = 1000  # images rendered per seeded chunk


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
