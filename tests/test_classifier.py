"""ZeroShotClassifier: equivalence with open_clip's own pipeline (PIL preprocessing and
build_zero_shot_classifier), the text head, embeddings, any input resolution, differentiability, and
the trained `shapes` CLIP's zero-shot accuracy."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cliplab import ZeroShotClassifier
from cliplab.classifier import encode_prompts
from cliplab.shapes100 import render_shapes


@pytest.fixture(scope="module")
def vit(random_vit):
    """cliplab's classifier and open_clip's documented zero-shot recipe, sharing one random ViT-B-32:
    create_model_and_transforms (the eval transform, on PIL images), build_zero_shot_classifier, and
    logits = logit_scale.exp() * normalize(encode_image) @ weights."""
    import open_clip

    clf = random_vit
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    model.load_state_dict(clf.model.state_dict())  # the same weights in both
    model.eval()
    weights = open_clip.build_zero_shot_classifier(model, open_clip.get_tokenizer("ViT-B-32"), clf.class_names,
                                                   clf.templates)  # (D, C)
    return clf, model, preprocess, weights


def _uint8_images(x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The same images as float [0, 1] tensors exactly representable in uint8, and as PIL images."""
    from PIL import Image

    x8 = (x * 255).round().to(torch.uint8)
    return x8.float() / 255, [Image.fromarray(image.permute(1, 2, 0).numpy()) for image in x8]


def _reference_logits(vit, pil_images) -> torch.Tensor:
    _, model, preprocess, weights = vit
    with torch.no_grad():
        features = F.normalize(model.encode_image(torch.stack([preprocess(im) for im in pil_images])), dim=-1)
        return model.logit_scale.exp() * features @ weights


def _pixel_errors(vit, x: torch.Tensor) -> torch.Tensor:
    """|cliplab.preprocess - open_clip's PIL transform| per pixel, in units of 1/255 of the [0, 1] image."""
    clf, _, preprocess, _ = vit
    x, pil_images = _uint8_images(x)
    with torch.no_grad():
        ours = clf.preprocess(x)
    theirs = torch.stack([preprocess(im) for im in pil_images])
    assert ours.shape == theirs.shape
    return ((ours - theirs) * clf.std).abs() * 255


def test_text_head_matches_open_clip(vit):
    clf, _, _, weights = vit
    assert clf.text_head.shape == (len(clf.class_names), weights.shape[0])
    torch.testing.assert_close(clf.text_head, weights.T, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(clf.text_head.norm(dim=1), torch.ones(len(clf.class_names)))


def _tokens_seen(model, tokens) -> int:
    """How many tokens per prompt ``encode_prompts`` sends through ``model``'s text transformer."""
    seen = []
    handle = model.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            encode_prompts(model, tokens)
    finally:
        handle.remove()
    return seen[0]


def test_prompts_are_encoded_without_their_shared_padding(vit, random_shapes_clf):
    import open_clip

    clf, model, _, _ = vit
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat.", "a blurry photo of a sweet pepper."])
    assert tokens.shape[1] == 77 and _tokens_seen(clf.model, tokens) == 16  # 13 tokens at most, rounded up to 16
    with torch.no_grad():
        torch.testing.assert_close(encode_prompts(clf.model, tokens), model.encode_text(tokens, normalize=True),
                                   atol=1e-6, rtol=0)
    # the shapes model's context is 16 tokens: never cut, so its committed outputs keep every digit
    shapes = random_shapes_clf.model
    short = torch.zeros(2, shapes.positional_embedding.shape[0], dtype=torch.long)
    short[:, :3] = torch.tensor([49406, 320, 49407])
    assert _tokens_seen(shapes, short) == short.shape[1]


def test_a_text_tower_that_pools_another_token_is_encoded_whole(vit, monkeypatch):
    import open_clip

    clf = vit[0]
    tokens = open_clip.get_tokenizer("ViT-B-32")(["a photo of a cat."])
    monkeypatch.setattr(clf.model, "text_pool_type", "last")  # the last position: the padding reaches it
    assert _tokens_seen(clf.model, tokens) == 77
    monkeypatch.setattr(clf.model, "text_pool_type", "argmax")
    monkeypatch.setattr(clf.model, "attn_mask", None)  # no causal mask: every token sees the padding
    assert _tokens_seen(clf.model, tokens) == 77


def test_logits_match_open_clip_pipeline(vit):
    clf, _, _, _ = vit
    x, pil_images = _uint8_images(render_shapes(4, seed=3)[0])
    with torch.no_grad():
        ours = clf(x)
    theirs = _reference_logits(vit, pil_images)
    assert ours.shape == theirs.shape == (4, len(clf.class_names))
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    # Measured: up to 3e-3 depending on the images (PIL rounds to uint8 between its resize passes).
    # This end-to-end check catches recipe mistakes (ImageNet mean/std 2e-2, no normalisation 0.5, a
    # wrong text head or scale); resize details are pinned down pixel by pixel by the tests below.
    torch.testing.assert_close(ours, theirs, atol=6e-3, rtol=0)


def test_preprocess_matches_open_clip_transform_on_native_images(vit):
    errors = _pixel_errors(vit, render_shapes(4, seed=3)[0])  # 32x32, as CIFAR
    # PIL's uint8 rounding gives 1/4 of a level on average; its intermediate clipping gives rare
    # larger errors at saturated edges. A wrong kernel (no antialias) puts ~10% of pixels above 1.5.
    assert errors.mean() < 0.35
    assert (errors > 1.5).float().mean() < 0.005


@pytest.mark.parametrize("size", [(48, 40), (40, 48), (33, 32), (64, 64), (300, 260)])
def test_preprocess_matches_open_clip_transform_at_other_resolutions(vit, size):
    """open_clip's eval transform (torchvision Resize(int) + CenterCrop) at non-square sizes: the long
    side becomes int(S * long / short) (truncated) and the crop offset int(round((h - S) / 2))."""
    x = F.interpolate(render_shapes(4, seed=3)[0], size=size, mode="bilinear").clamp(0, 1)
    errors = _pixel_errors(vit, x)
    far = (errors > 1.5).float().mean().item()
    assert far < 0.005, f"{far:.1%} of pixels differ from open_clip's by > 1.5/255 at {size[0]}x{size[1]}"
    assert errors.mean() < 0.35


@pytest.mark.parametrize("size", [(32, 32), (48, 40), (40, 48), (300, 260)])
def test_preprocess_equals_torch_resize_kernel(vit, size):
    """The resize runs as two matmuls (cheaper backward); it must equal torch's antialiased bicubic kernel,
    clamp and centre crop to float rounding, up- and downsampling, including the gradient."""
    clf = vit[0]
    x = torch.rand(2, 3, *size, dtype=torch.float64, requires_grad=True)
    short = 224
    new = (short, int(short * size[1] / size[0])) if size[0] <= size[1] else (int(short * size[0] / size[1]), short)
    top, left = int(round((new[0] - short) / 2)), int(round((new[1] - short) / 2))
    reference = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    reference = (reference[..., top:top + short, left:left + short] - clf.mean.double()) / clf.std.double()
    ours = clf.preprocess(x)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    weights = torch.randn_like(ours)
    grad_ours, = torch.autograd.grad((ours * weights).sum(), x)
    grad_reference, = torch.autograd.grad((reference * weights).sum(), x)
    torch.testing.assert_close(grad_ours, grad_reference, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kernel, size", [(32, (224, 224)), (8, (32, 32)), (16, (50, 37))])
def test_patch_embedding_is_the_convolution(kernel, size):
    """The classifier swaps a ViT's stride=kernel convolution for a matmul: same outputs and input gradients,
    same parameters (shared, so the state dict and optimisers see no change)."""
    from cliplab.vit import PatchEmbedding

    conv = torch.nn.Conv2d(3, 16, kernel, stride=kernel, bias=False).double()
    embedding = PatchEmbedding.replacing(conv)
    assert PatchEmbedding.applies_to(conv) and embedding.weight is conv.weight
    assert not PatchEmbedding.applies_to(torch.nn.Conv2d(3, 16, 3, stride=1))
    x = torch.rand(2, 3, *size, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(embedding(x), conv(x), rtol=0, atol=1e-12)
    weights = torch.randn_like(conv(x))
    torch.testing.assert_close(torch.autograd.grad((embedding(x) * weights).sum(), x)[0],
                               torch.autograd.grad((conv(x) * weights).sum(), x)[0], rtol=0, atol=1e-12)


def test_vit_patch_embedding_is_swapped(vit):
    from cliplab.vit import PatchEmbedding

    assert type(vit[0].model.visual.conv1) is PatchEmbedding
    assert "model.visual.conv1.weight" in vit[0].state_dict()


def test_the_last_block_computes_the_class_token_alone(random_shapes_clf):
    """The last ViT block runs for the class token only: the same features and input gradients as open_clip's own
    modules (every token through every block), to float rounding, in float64 too; the same state dict; a model
    that pools every token keeps its block."""
    from open_clip.transformer import ResidualAttentionBlock

    from cliplab.vit import ClassTokenBlock

    clf = copy.deepcopy(random_shapes_clf).double()
    visual = clf.model.visual
    assert isinstance(visual.transformer.resblocks[-1], ClassTokenBlock)
    assert not any(isinstance(block, ClassTokenBlock) for block in visual.transformer.resblocks[:-1])
    reference = copy.deepcopy(clf)
    for module in reference.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            module.__class__ = torch.nn.MultiheadAttention
    reference.model.visual.transformer.resblocks[-1].__class__ = ResidualAttentionBlock
    assert clf.state_dict().keys() == reference.state_dict().keys()
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    ours, theirs = clf.image_features(x), reference.image_features(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    weights = torch.randn_like(ours)
    torch.testing.assert_close(torch.autograd.grad((ours * weights).sum(), x)[0],
                               torch.autograd.grad((theirs * weights).sum(), x)[0], rtol=0, atol=1e-12)
    visual.pool_type = "avg"
    assert not ClassTokenBlock.applies_to(visual)


def test_embeddings_are_unit_vectors(vit, random_shapes_clf):
    x = render_shapes(3, seed=0)[0]
    for clf in (vit[0], random_shapes_clf):
        with torch.no_grad():
            embedding = clf.embed(x)
        assert embedding.shape == (3, clf.text_head.shape[1])
        torch.testing.assert_close(embedding.norm(dim=1), torch.ones(3))


def test_any_input_resolution(vit, random_shapes_clf):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 48, 40)
    for clf in (vit[0], random_shapes_clf):
        with torch.no_grad():
            logits = clf(x)
        assert logits.shape == (2, clf.num_classes)
        assert torch.isfinite(logits).all()
        assert clf.preprocess(x).shape[-2:] == clf.image_size


def test_logits_are_scaled_cosine_similarities(random_shapes_clf):
    clf = random_shapes_clf
    x = render_shapes(5, seed=0)[0]
    with torch.no_grad():
        logits = clf(x)
        expected = clf.model.logit_scale.exp() * clf.embed(x) @ clf.text_head.T
    torch.testing.assert_close(logits, expected)
    assert logits.abs().max() <= clf.model.logit_scale.exp() * (1 + 1e-5)


def test_batch_independence(random_shapes_clf):
    x = render_shapes(6, seed=0)[0]
    with torch.no_grad():
        together = random_shapes_clf(x)
        alone = torch.cat([random_shapes_clf(x[i:i + 1]) for i in range(len(x))])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_gradients_reach_the_input(random_shapes_clf):
    x = render_shapes(2, seed=0)[0].requires_grad_()
    random_shapes_clf(x)[:, 0].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_preprocess_gradcheck_float64(random_shapes_clf):
    """The resize + crop + normalise kernel is differentiable (float64 gradcheck, small input)."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 7, 5, dtype=torch.float64).mul(0.8).add(0.1).requires_grad_()
    weights = torch.randn(1, 3, *random_shapes_clf.image_size, dtype=torch.float64)
    torch.autograd.gradcheck(lambda t: (random_shapes_clf.preprocess(t) * weights).sum(), (x,))


def test_text_encoder_not_run_at_forward(random_shapes_clf, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("encode_text called during forward")

    monkeypatch.setattr(random_shapes_clf.model, "encode_text", fail)
    with torch.no_grad():
        random_shapes_clf(render_shapes(2, seed=0)[0])


def test_text_head_is_a_buffer(random_shapes_clf):
    assert "text_head" in dict(random_shapes_clf.named_buffers())
    assert not random_shapes_clf.text_head.requires_grad


def test_constructor_validates_arguments(random_shapes_clf):
    import open_clip

    model, tokenizer = random_shapes_clf.model, open_clip.get_tokenizer("cliplab-shapes-tiny")
    with pytest.raises(ValueError, match=r"^class_names"):
        ZeroShotClassifier(model, tokenizer, [], ["a {}."])
    with pytest.raises(ValueError, match=r"^templates"):
        ZeroShotClassifier(model, tokenizer, ["red circle"], ["a photo"])
    with pytest.raises(ValueError, match=r"^templates"):
        ZeroShotClassifier(model, tokenizer, ["red circle"], [])


def test_forward_rejects_malformed_images(random_shapes_clf):
    with pytest.raises(ValueError, match=r"^x must have 3 channels"):
        random_shapes_clf(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"^x must have shape"):
        random_shapes_clf(torch.rand(3, 32, 32))


def test_any_float_dtype_runs_in_the_model_dtype(random_shapes_clf):
    """float16 and float64 images are accepted and computed in float32 (the model's dtype); the gradient
    comes back in the input's dtype."""
    x = render_shapes(4, seed=1)[0]
    with torch.no_grad():
        reference = random_shapes_clf(x)
        torch.testing.assert_close(random_shapes_clf(x.double()), reference)
        torch.testing.assert_close(random_shapes_clf(x.half()), reference, atol=0.05, rtol=0)  # half's rounding
    x64 = x.double().requires_grad_(True)
    random_shapes_clf(x64).sum().backward()
    assert x64.grad.dtype == torch.float64


# ------------------------------------------------------------------------------ trained `shapes` CLIP
def test_shapes_zero_shot_accuracy(shapes_clf, shapes_test, shapes_pred):
    _, y, names = shapes_test
    assert shapes_clf.class_names == names and shapes_clf.num_classes == 100
    accuracy = (shapes_pred == y).float().mean().item()
    assert accuracy >= 0.90, f"zero-shot accuracy {accuracy:.1%} on 1000 Shapes-100 test images"
    assert len(np.unique(shapes_pred.numpy())) >= 90  # not a degenerate classifier
