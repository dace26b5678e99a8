"""Zero-shot CLIP classifier on [0, 1] images: the single place where resizing and normalisation happen."""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._arguments import check_choice, check_images
from ._torch import PRECISIONS, autocast, check_device, device_of
from .vit import ClassTokenBlock, PatchEmbedding, SelfAttention


@torch.no_grad()
def build_text_head(model: nn.Module, tokenizer: Callable, class_names: Sequence[str],
                    templates: Sequence[str]) -> torch.Tensor:
    """Embed every (class, template) prompt once and average per class (Radford et al. 2021, Sec. 3.1.4).

    Args:
        model: an open_clip CLIP model.
        tokenizer: open_clip tokenizer for ``model``.
        class_names: readable class names, e.g. ``"aquarium fish"``.
        templates: format strings with one ``{}``, e.g. ``"a photo of a {}."``.

    Returns:
        (num_classes, embed_dim) class embeddings: for each class the mean of the L2-normalised
        template embeddings, renormalised.
    """
    prompts = [template.format(name) for name in class_names for template in templates]
    embeddings = encode_prompts(model, tokenizer(prompts)).float()  # (C*T, D)
    embeddings = embeddings.reshape(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(embeddings, dim=-1)  # (C, D)


# The padding cut is rounded up to a whole number of these tokens (see encode_prompts)
PROMPT_TOKENS_STEP = 16


def encode_prompts(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(tokens, normalize=True)`` without the padding that every prompt ends with, where it
    cannot reach the result: open_clip's CLIP pools the end-of-text token (``argmax``: the highest id), and under its
    causal mask no token sees those after it. ViT-B/32 pads every prompt to 77 tokens; CIFAR-100's are at most 13,
    so most of the text tower's work went into padding (100 prompts on one core: 10.9 s, and 1.6 s once cut).

    The cut is exact arithmetic but changes float rounding (about 1e-7), so it is rounded up to a multiple of
    ``PROMPT_TOKENS_STEP`` tokens: a context that short (the shapes model's 16) is never cut, and its committed
    outputs stay digit for digit. Any other text tower is encoded whole. ``tokens``: the tokenizer's, on any device
    (read on the CPU, then moved to the model's)."""
    tokens, device = tokens.cpu(), next(model.parameters()).device
    ends = tokens.argmax(dim=-1)  # each prompt's end-of-text token, the one pooled
    length = -(-(int(ends.max()) + 1) // PROMPT_TOKENS_STEP) * PROMPT_TOKENS_STEP
    if length >= tokens.shape[1] or not _pools_the_end_under_a_causal_mask(model):
        return model.encode_text(tokens.to(device), normalize=True)
    tokens = tokens[:, :length].to(device)
    cast_dtype = model.transformer.get_cast_dtype()  # open_clip's CLIP.encode_text, on the first `length` tokens
    x = model.token_embedding(tokens).to(cast_dtype) + model.positional_embedding[:length].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = x[torch.arange(len(x), device=x.device), ends.to(device)]
    if isinstance(model.text_projection, nn.Linear):
        x = model.text_projection(x)
    elif model.text_projection is not None:
        x = x @ model.text_projection
    return F.normalize(x, dim=-1)


def _pools_the_end_under_a_causal_mask(model: nn.Module) -> bool:
    """Whether ``model`` is open_clip's CLIP (whose ``encode_text`` ``encode_prompts`` follows) with argmax pooling
    and the causal mask open_clip builds (-inf above the diagonal, 0 elsewhere; a mask on the meta device holds no
    values to check, and a model there computes shapes alone)."""
    from open_clip.model import CLIP

    mask = getattr(model, "attn_mask", None)
    return (type(model) is CLIP and getattr(model, "text_pool_type", None) == "argmax" and mask is not None
            and not mask.is_meta and torch.equal(mask, torch.full_like(mask, float("-inf")).triu(1)))


@functools.lru_cache(maxsize=32)
def _resize_matrix(size: int, new_size: int, start: int, length: int, device: torch.device,
                   dtype: torch.dtype) -> torch.Tensor:
    """Rows ``start:start + length`` of the (new_size, size) matrix of torch's antialiased bicubic resize along one
    axis, on ``device``: ``R_h @ x @ R_w.T`` equals ``F.interpolate(x, mode="bicubic", antialias=True)``
    followed by the crop. The resize is separable and linear, so resizing the unit vectors (in float64, along one
    axis, the other left alone) reads the matrix off exactly."""
    other = 4  # a width that is not resized: each row of the basis stays constant along it
    basis = torch.eye(size, dtype=torch.float64).view(size, 1, size, 1).expand(size, 1, size, other)
    resized = F.interpolate(basis, size=(new_size, other), mode="bicubic", align_corners=False, antialias=True)
    return resized[:, 0, start:start + length, 0].T.to(device=device, dtype=dtype).contiguous()


class ZeroShotClassifier(nn.Module):
    """CLIP as an image classifier: [0, 1] images in, logits out.

    Owns the whole pipeline of open_clip's inference preprocessing and zero-shot recipe: resize the
    shortest side to the model's input size (bicubic, antialiased as PIL does), centre-crop,
    normalise with the model's mean/std, encode, L2-normalise and take the cosine similarity with the
    text head times the model's logit scale. The text head is computed once, at construction, and kept
    as a buffer, so attacks never run the text encoder.

    Args:
        model: an open_clip CLIP model (``model.visual.image_size`` gives the input size).
        tokenizer: its tokenizer.
        class_names: readable class names.
        templates: prompt templates, format strings with one ``{}``.
        text_head: (num_classes, embed_dim) class embeddings already computed by ``build_text_head`` for these
            class names and templates (a cache); default: computed here.
        mean, std: normalisation of the model (``model.visual.image_mean``/``image_std`` by default).
        precision: ``"auto"`` (bfloat16 autocast for the image encoder where the device computes bf16 natively,
            fp32 elsewhere; ``_torch.computes_bf16``), ``"bf16"``
            (on any device) or ``"fp32"`` (always, even inside a caller's autocast). Logits and features
            are returned in fp32 either way, so losses and statistics stay fp32. An attribute: set
            ``classifier.precision`` to switch an existing classifier.

    A ViT's patch-embedding convolution (``model.visual.conv1``) is replaced in place by ``PatchEmbedding``, the
    same map as one matmul sharing its weight (same state dict), which the GPU runs far faster; its self-attention
    modules become ``SelfAttention``, the same modules in a layout without copies, and the last block of a ViT that
    returns its class token alone becomes a ``ClassTokenBlock``, which computes that token only.

    Every buffer (normalisation, text head) is created on the device of ``model``'s parameters and
    follows the model through ``.to()``, so the classifier is wholly on one device.

    Shape:
        - Input: (N, 3, H, W), float in [0, 1], any resolution, any float dtype (computed in the model's,
          float32 unless the classifier was converted).
        - Output: (N, num_classes) logits.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable, class_names: Sequence[str],
                 templates: Sequence[str], mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, precision: str = "auto", text_head: torch.Tensor | None = None):
        super().__init__()
        check_choice(precision, "precision", PRECISIONS)
        if not class_names:
            raise ValueError("class_names must be a non-empty sequence of strings")
        if not templates or any(t.count("{}") != 1 for t in templates):
            raise ValueError("templates must be a non-empty sequence of format strings with exactly one '{}'")
        if PatchEmbedding.applies_to(getattr(model.visual, "conv1", None)):  # open_clip's ViTs
            model.visual.conv1 = PatchEmbedding.replacing(model.visual.conv1)
        for module in model.visual.modules():
            if SelfAttention.applies_to(module):
                SelfAttention.adopt(module)
        if ClassTokenBlock.applies_to(model.visual):
            ClassTokenBlock.adopt(model.visual.transformer.resblocks[-1])
        self.model, self.tokenizer = model, tokenizer
        self.class_names = list(class_names)
        self.templates = list(templates)
        self.precision = precision
        size = model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        mean = mean if mean is not None else getattr(model.visual, "image_mean", None)
        std = std if std is not None else getattr(model.visual, "image_std", None)
        if mean is None or std is None:
            raise ValueError("mean and std must be given when model.visual has no image_mean/image_std")
        device = device_of(model, torch.device("cpu"))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1))
        if text_head is None:
            text_head = build_text_head(model, tokenizer, self.class_names, self.templates)
        elif text_head.shape[0] != len(self.class_names) or text_head.ndim != 2:
            raise ValueError(f"text_head must have one row per class, ({len(self.class_names)}, embed_dim), got "
                             f"{tuple(text_head.shape)}")
        self.register_buffer("text_head", text_head.to(device=device, dtype=torch.float32))

    def for_classes(self, class_names: Sequence[str], templates: Sequence[str],
                    text_head: torch.Tensor | None = None) -> ZeroShotClassifier:
        """A classifier of other classes sharing this one's model (its weights are not copied), e.g. for the next
        data set of a benchmark; ``text_head`` as in the constructor."""
        mean, std = self.mean.flatten().tolist(), self.std.flatten().tolist()
        return ZeroShotClassifier(self.model, self.tokenizer, class_names, templates, mean, std, self.precision,
                                  text_head).eval()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Resize (shortest side), centre-crop and normalise, differentiably. (N,3,H,W) -> (N,3,S,S)."""
        height, width = x.shape[-2:]
        target_h, target_w = self.image_size
        if (height, width) != (target_h, target_w):
            # torchvision's Resize(int) arithmetic: the short side becomes the target, the long side is
            # truncated; antialias=True selects PIL's bicubic kernel (a=-0.5), which open_clip's transform
            # uses, and the clamp mirrors PIL's saturation to the valid pixel range. The resize and the centre
            # crop are one fixed linear map per axis, applied as two small fp32 matmuls: exact, and with a far
            # cheaper backward than the interpolation kernel's (see _resize_matrix).
            short = min(target_h, target_w)
            size = (short, int(short * width / height)) if height <= width else (int(short * height / width), short)
            top, left = int(round((size[0] - target_h) / 2)), int(round((size[1] - target_w) / 2))  # CenterCrop
            dtype = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64 (gradcheck)
            rows = _resize_matrix(height, size[0], top, target_h, x.device, dtype)  # (S, H)
            columns = _resize_matrix(width, size[1], left, target_w, x.device, dtype)  # (S, W)
            with autocast(x.device, "fp32"):  # ~0.3% of the encoder's FLOPs: keep the pixels exact
                x = (rows @ (x.to(dtype) @ columns.T)).clamp(0, 1)
        return (x - self.mean) / self.std

    def autocast(self, device: torch.device | None = None):
        """The autocast context of this classifier's ``precision`` on ``device`` (default: its own)."""
        return autocast(device or self.mean.device, self.precision)

    def image_features(self, x: torch.Tensor) -> torch.Tensor:
        """Raw (unnormalised) image-encoder outputs, what FARE keeps close. (N,3,H,W) in [0,1] -> (N, D) fp32."""
        check_images(x, values=False)  # noisy inputs from defences may leave [0, 1]
        check_device(self, x)
        x = x.to(self.mean.dtype)  # float16 or float64 images run in the model's dtype; gradients flow back
        with self.autocast(x.device):
            return self.model.encode_image(self.preprocess(x)).float()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings. (N,3,H,W) in [0,1] -> (N, D)."""
        return F.normalize(self.image_features(x), dim=-1)

    def logits_from_features(self, features: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits of raw image features, in fp32 even inside a caller's autocast. (N, D) -> (N, C)."""
        with autocast(features.device, "fp32"):  # a tiny matmul; bf16 here would blur close logits
            return self.model.logit_scale.exp().float() * F.normalize(features.float(), dim=-1) @ self.text_head.T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Zero-shot logits. (N,3,H,W) in [0,1] -> (N, C)."""
        return self.logits_from_features(self.image_features(x))


class WithPrecision(nn.Module):
    """Any image classifier run in ``precision``, as a ``ZeroShotClassifier`` runs in its own: the one precision
    switch, which every attack, defence and evaluation follows because each of them only calls the model.

    ``precision``: ``"auto"`` (bfloat16 autocast where the device computes bf16 natively, the caller's state
    elsewhere), ``"bf16"`` (on any device
    that has it) or ``"fp32"`` (even inside a caller's autocast). Logits come out in fp32.
    """

    def __init__(self, model: nn.Module, precision: str = "auto"):
        super().__init__()
        check_choice(precision, "precision", PRECISIONS)
        self.model, self.precision = model, precision

    @property
    def num_classes(self) -> int:
        return self.model.num_classes  # AttributeError for a model without one: _torch.num_classes then asks it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.precision):
            return self.model(x).float()

