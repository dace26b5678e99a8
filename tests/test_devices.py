"""Device placement and precision without a GPU: the `meta` device shows where every tensor of a loaded
classifier lives, inputs on another device get a clear error (or are moved, where a function returns CPU
results anyway), and the bf16 switch behaves as documented. The `cuda` tier (test_cuda.py) runs the same
kernels on a GPU."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from open_clip.transformer import ResidualAttentionBlock

import cliplab
from cliplab import RandomizedSmoothing
from cliplab._torch import cpu_has_bf16, meta_copy
from cliplab.vit import SelfAttention
from cliplab.training.oft import apply_oft, oft_parameters


def _devices(module: torch.nn.Module) -> set[str]:
    return {t.device.type for t in [*module.parameters(), *module.buffers()]}


@pytest.mark.parametrize("name", ["shapes", "ViT-B-32"])
def test_loaded_classifier_is_wholly_on_the_device_asked_for(name):
    """The defect that stopped the real study at its first forward pass on CUDA: the normalisation buffers
    stayed on the CPU while the model went to the device."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = cliplab.load_classifier(name, pretrained=None, device="meta", templates=["a photo of a {}."],
                                      **({"class_names": ["cat", "dog"]} if name != "shapes" else {}))
    assert _devices(clf) == {"meta"}, {n: t.device for n, t in [*clf.named_parameters(), *clf.named_buffers()]}
    logits = clf(torch.rand(2, 3, 32, 32, device="meta"))  # every op finds its operands on one device
    assert logits.device.type == "meta" and logits.shape == (2, clf.num_classes)


def test_buffers_follow_the_model_at_construction(random_shapes_clf):
    import open_clip

    from cliplab.shapes_clip import MODEL_NAME

    model = copy.deepcopy(random_shapes_clf.model).to("meta")
    clf = cliplab.ZeroShotClassifier(model, open_clip.get_tokenizer(MODEL_NAME), ["a", "b"], ["{}"])
    assert _devices(clf) == {"meta"}


def test_images_on_another_device_get_a_clear_error(random_shapes_clf):
    with pytest.raises(ValueError, match=r"^x is on meta but the model is on cpu: move it with x.to\('cpu'\)"):
        random_shapes_clf(torch.rand(2, 3, 32, 32, device="meta"))


def test_a_model_on_the_meta_device_is_named_by_every_entry_point(random_shapes_clf, toy_model, batch):
    """Not "x is on cpu but the model is on meta: move it with x.to('meta')" (advice that cannot help), nor torch's
    "Tensor.item() cannot be called on meta tensors" from the evaluation."""
    x, y = batch
    for model in (copy.deepcopy(random_shapes_clf).to("meta"), copy.deepcopy(toy_model).to("meta")):
        for call in (lambda: cliplab.predict(model, x), lambda: cliplab.accuracy(model, x, y),
                     lambda: cliplab.pgd(model, x, y, eps=0.01), lambda: cliplab.eot_gradient(model, x, y),
                     lambda: cliplab.square(model, x, y, eps=0.01, queries=2),
                     lambda: cliplab.evaluate_robustness(model, x, y, eps=0.01)):
            with pytest.raises(ValueError, match=r"^model is on the meta device, which holds no weights"):
                call()


class _Answers(torch.nn.Module):
    """A model whose answer is not (N, classes) logits: ``kind`` says what it returns instead."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.linear = kind, torch.nn.Linear(3 * 32 * 32, 100)

    def forward(self, x):
        logits = self.linear(x.flatten(1))
        return {"scores": logits.sum(1), "one row": logits[:1], "tuple": (logits, logits)}[self.kind]


def test_a_meta_copy_has_the_structure_and_flags_without_the_weights(random_shapes_clf):
    """meta_copy copies no weight: every parameter and buffer of the copy is on meta, with its name, shape, class
    and requires_grad flag, and the original keeps its own tensors."""
    visual = copy.deepcopy(random_shapes_clf.model.visual)  # the fixture is the session's
    visual.conv1.weight.requires_grad_(False)
    before = {name: (t.data_ptr(), t.device) for name, t in visual.state_dict(keep_vars=True).items()}
    shape = meta_copy(visual)
    for (name, t), (copied_name, c) in zip(visual.state_dict(keep_vars=True).items(),
                                           shape.state_dict(keep_vars=True).items(), strict=True):
        assert (copied_name, c.device.type, c.shape, type(c)) == (name, "meta", t.shape, type(t))
        assert c.requires_grad == t.requires_grad
    assert {name: (t.data_ptr(), t.device) for name, t in visual.state_dict(keep_vars=True).items()} == before
    assert type(shape.transformer.resblocks[0].attn) is SelfAttention


@pytest.mark.parametrize("kind, says", [("scores", r"it returned shape \(\d+,\)"),
                                        ("one row", r"it returned shape \(1, 100\)"), ("tuple", "it returned a tuple")])
def test_a_model_that_does_not_return_logits_is_named_by_every_entry_point(kind, says, batch):
    """Before: torch's "tuple index out of range", "Dimension out of range" or "shape '[1, 4]' is invalid"."""
    x, y = batch
    model = _Answers(kind)
    for call in (lambda: cliplab.predict(model, x), lambda: cliplab.accuracy(model, x, y),
                 lambda: cliplab.pgd(model, x, y, eps=0.01), lambda: cliplab.apgd(model, x, y, eps=0.01, steps=2),
                 lambda: cliplab.square(model, x, y, eps=0.01, queries=2),
                 lambda: cliplab.evaluate_robustness(model, x, y, eps=0.01)):
        with pytest.raises(ValueError, match=rf"^model must map N images to \(N, classes\) logits; on \d+ images? "
                                             rf"{says}"):
            call()


def test_smoothing_moves_images_to_its_classifier(random_shapes_clf, batch):
    """predict/certify return CPU tensors whatever the devices, so they take images from anywhere."""
    x, _ = batch
    smoothed = RandomizedSmoothing(random_shapes_clf, sigma=0.1)
    meta_clf = RandomizedSmoothing(copy.deepcopy(random_shapes_clf).to("meta"), sigma=0.1)
    with pytest.raises(NotImplementedError):  # meta tensors have no values to vote with: it got that far
        meta_clf.predict(x[:2], n=4)
    assert smoothed.predict(x[:2], n=4, seed=0).device.type == "cpu"


# ------------------------------------------------------------------------------------------ precision
def test_precision_switch(random_shapes_clf, batch):
    x, _ = batch
    clf = copy.deepcopy(random_shapes_clf)
    with torch.no_grad():
        fp32 = clf(x)
        clf.precision = "bf16"
        bf16 = clf(x)
        clf.precision = "fp32"
        with torch.autocast("cpu", dtype=torch.bfloat16):  # "fp32" holds even inside a caller's autocast
            forced = clf(x)
        clf.precision = "auto"  # on the CPU: bf16 where it computes bf16, else fp32
        auto = clf(x)
    assert bf16.dtype == fp32.dtype == torch.float32, "logits stay fp32 for losses and statistics"
    assert not torch.equal(bf16, fp32), "bf16 autocast must change the encoder's arithmetic"
    torch.testing.assert_close(bf16, fp32, atol=0.5, rtol=0.05)
    assert torch.equal(forced, fp32) and torch.equal(auto, bf16 if cpu_has_bf16() else fp32)
    with pytest.raises(ValueError, match=r"^precision must be one of"):
        cliplab.load_classifier("shapes", pretrained=None, device="cpu", precision="fp16")


def test_any_model_takes_the_same_precision_switch(batch):
    """WithPrecision gives any classifier the precision a ZeroShotClassifier has; the attacks only call it."""
    x, y = batch
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(x[0].numel(), 10))
    with torch.no_grad():
        fp32 = model(x)
        bf16 = cliplab.WithPrecision(model, "bf16")(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            forced = cliplab.WithPrecision(model, "fp32")(x)
        auto = cliplab.WithPrecision(model, "auto")(x)  # bf16 on a CPU that computes it, else the caller's state
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.05)
    assert torch.equal(forced, fp32) and torch.equal(auto, bf16 if cpu_has_bf16() else fp32)
    result = cliplab.pgd(cliplab.WithPrecision(model, "bf16"), x, y % 10, eps=4 / 255, steps=2, seed=0)
    assert result.x_adv.dtype == torch.float32 and (result.x_adv - x).abs().max() <= 4 / 255 + 1e-6
    with pytest.raises(ValueError, match=r"^precision must be one of"):
        cliplab.WithPrecision(model, "fp16")


def _bf16_kernels(clf, x):
    """The ops of one bf16 forward + input-backward of ``clf`` on the CPU, with their input shapes."""
    x = x.clone().requires_grad_(True)
    with torch.profiler.profile(record_shapes=True) as profile:
        clf(x).sum().backward()
    return [(event.name, event.input_shapes) for event in profile.events()]


def test_self_attention_takes_its_fast_bf16_path_on_the_cpu(random_shapes_clf, batch):
    """Under CPU bf16 autocast, no flash-attention kernel (its bf16 backward is slow) and no matmul over the
    in-projection broadcast to every token (which the bf16 kernel copies out); nn.MultiheadAttention does both."""
    x, _ = batch
    clf = copy.deepcopy(random_shapes_clf)
    clf.precision = "bf16"
    width = clf.model.visual.transformer.width
    attention = clf.model.visual.transformer.resblocks[0].attn
    assert isinstance(attention, SelfAttention)

    def slow(kernels):
        return [name for name, shapes in kernels if "flash_attention" in name
                or (name == "aten::bmm" and any(s[-2:] in ([width, 3 * width], [3 * width, width]) for s in shapes))]

    assert not slow(_bf16_kernels(clf, x))
    for block in clf.model.visual.transformer.resblocks:
        block.attn.__class__ = torch.nn.MultiheadAttention
        block.__class__ = ResidualAttentionBlock  # the last is a ClassTokenBlock, which needs SelfAttention
    assert slow(_bf16_kernels(clf, x)), "the check must see what nn.MultiheadAttention does"


def test_self_attention_computes_what_multihead_attention_does():
    """Plain self-attention (what open_clip's ViT asks: no mask, no weights): the same attention in fp32 to float
    rounding, forward and backward, also through an OFT rotation of the in-projection, and within bf16's rounding
    under bf16 autocast; the attention of some queries is those rows of the whole; a padding mask or the attention
    weights asked for take nn.MultiheadAttention's own path, bit for bit."""
    torch.manual_seed(0)
    reference = torch.nn.MultiheadAttention(64, 4, batch_first=True)
    attention = SelfAttention.adopt(copy.deepcopy(reference))
    assert attention.state_dict().keys() == reference.state_dict().keys()
    apply_oft(attention, block_size=16)
    apply_oft(reference, block_size=16)
    for module in (attention, reference):
        for generator in oft_parameters(module):
            torch.nn.init.normal_(generator, std=0.1, generator=torch.Generator().manual_seed(1))
    x = torch.randn(8, 17, 64)

    padding = torch.zeros(8, 17, dtype=torch.bool)
    padding[::2, -3:] = True  # every other sequence ends in three padding tokens

    def run(module, dtype=None, **options):  # dtype: autocast's, None for none
        inputs = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out, weights = module(inputs, inputs, inputs, **options)
        out.float().square().sum().backward()
        return out.float(), inputs.grad, weights

    (*fast, weights), (*exact, _) = run(attention, need_weights=False), run(reference, need_weights=False)
    assert weights is None
    for a, b in zip(fast, exact):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    for a, b in zip(run(attention, torch.bfloat16, need_weights=False)[:2], exact):
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)
    with torch.no_grad():
        torch.testing.assert_close(attention.attend(x, queries=slice(0, 1)), attention.attend(x)[:, :1])
    for options in ({}, {"key_padding_mask": padding, "need_weights": False, "average_attn_weights": False}):
        assert all(torch.equal(a, b) for a, b in zip(run(attention, **options), run(reference, **options))
                   if a is not None)


@pytest.mark.slow
def test_bf16_and_fp32_robust_accuracy_agree_within_their_intervals(shapes_clf, shapes_test):
    """The study's bf16 default on CUDA measures what fp32 measures: the same attack on the trained shapes
    CLIP, once in each precision (bf16 autocast runs on the CPU too)."""
    x, y, _ = shapes_test
    results = {}
    for precision in ("fp32", "bf16"):
        clf = copy.deepcopy(shapes_clf)
        clf.precision = precision
        results[precision] = cliplab.pgd_accuracy(clf, x[:200], y[:200], eps=2 / 255, steps=10, loss="margin",
                                                  seed=0, progress=False)
    for kind in ("clean", "robust"):
        fp32, bf16 = getattr(results["fp32"], kind), getattr(results["bf16"], kind)
        assert fp32.ci95[0] <= bf16.value <= fp32.ci95[1] and bf16.ci95[0] <= fp32.value <= bf16.ci95[1], \
            f"{kind}: fp32 {fp32}, bf16 {bf16}"
    assert results["fp32"].robust.value < results["fp32"].clean.value - 0.1, "the attack must bite to compare"
