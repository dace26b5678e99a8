"""The adapters of robust fine-tuning (``training.adapters``): each starts as the model it adapts, trains only its
own parameters, counts them, folds into plain weights, and refuses a size that does not fit before any work."""
import copy

import pytest
import torch
from torch import nn

import cliplab
from cliplab.training import FinetuneConfig, apply_adapter, apply_lora, check_adapter, lora_parameters, merge_adapters
from cliplab.training.adapters import matching_lora_rank, trained_parameter_count

SIZES = {"full": {}, "oft": dict(block_size=16), "lora": dict(rank=4), "last-k": dict(blocks=2), "bitfit": {}}


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return cliplab.load_classifier("shapes", pretrained=None, device="cpu", precision="fp32")


def _nudge(parameters):
    with torch.no_grad():
        for parameter in parameters:
            parameter.add_(0.05 * torch.randn_like(parameter))


@pytest.mark.parametrize("adapter", list(SIZES))
def test_each_adapter_starts_unchanged_trains_its_own_parameters_and_merges_into_plain_weights(classifier, adapter):
    model, x = copy.deepcopy(classifier), torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    config = FinetuneConfig(adapter=adapter, **SIZES[adapter])
    trained = apply_adapter(model.model.visual, config)
    assert {id(p) for p in model.model.visual.parameters() if p.requires_grad} == {id(p) for p in trained}
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)  # the adapter starts at the identity
    _nudge(trained)
    with torch.no_grad():
        adapted = model(x)
    merge_adapters(model.model.visual)
    keys = set(model.model.visual.state_dict())
    assert keys == set(classifier.model.visual.state_dict()), "plain weights, the original's keys"
    with torch.no_grad():
        torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(adapted, before, atol=1e-4)


def test_the_trained_parameters_are_counted_per_adapter(classifier):
    visual = classifier.model.visual
    blocks = visual.transformer.resblocks
    counts = {adapter: trained_parameter_count(FinetuneConfig(adapter=adapter, **SIZES[adapter]),
                                               apply_adapter(copy.deepcopy(visual), FinetuneConfig(adapter=adapter,
                                                                                                   **SIZES[adapter])))
              for adapter in SIZES}
    assert counts["full"] == sum(p.numel() for p in visual.parameters())
    assert counts["last-k"] == (sum(p.numel() for p in blocks[-2:].parameters())
                                + sum(p.numel() for p in visual.ln_post.parameters()) + visual.proj.numel())
    linear = [m.weight.shape for m in visual.modules() if isinstance(m, nn.Linear)]
    fused = [m.in_proj_weight.shape for m in visual.modules() if isinstance(m, nn.MultiheadAttention)]
    assert counts["lora"] == 4 * sum(o + i for o, i in linear + fused)  # r (out + in) per weight
    assert counts["bitfit"] == sum(p.numel() for name, p in visual.named_parameters()
                                   if name.endswith("bias") or ".ln_" in name or name.startswith("ln_"))
    assert counts["bitfit"] < counts["oft"] < counts["last-k"] < counts["full"]


def test_lora_reaches_the_fused_attention_in_projection_and_is_seeded(classifier):
    one, two = (copy.deepcopy(classifier.model.visual) for _ in range(2))
    names = apply_lora(one, rank=2, seed=3)
    apply_lora(two, rank=2, seed=3)
    assert "transformer.resblocks.0.attn.in_proj_weight" in names
    assert all(torch.equal(a, b) for a, b in zip(lora_parameters(one), lora_parameters(two)))


def test_a_matching_lora_rank_trains_about_as_many_parameters_as_oft(classifier):
    visual = classifier.model.visual
    for block_size in (16, 128):
        oft = trained_parameter_count(FinetuneConfig(adapter="oft", block_size=block_size),
                                      apply_adapter(copy.deepcopy(visual), FinetuneConfig(adapter="oft",
                                                                                          block_size=block_size)))
        rank = matching_lora_rank(visual, block_size)
        lora = trained_parameter_count(FinetuneConfig(adapter="lora", rank=rank),
                                       lora_parameters_of(visual, rank))
        per_rank = lora // rank
        assert abs(lora - oft) <= per_rank / 2, (block_size, rank, lora, oft)


def lora_parameters_of(visual, rank):
    return apply_adapter(copy.deepcopy(visual), FinetuneConfig(adapter="lora", rank=rank))


@pytest.mark.parametrize("config, match", [
    (FinetuneConfig(adapter="oft", block_size=48), r"block_size must divide .* 48 does not divide 128"),
    (FinetuneConfig(adapter="lora", rank=128), r"rank must be below both sides of every adapted weight: 128"),
    (FinetuneConfig(adapter="last-k", blocks=5), r"blocks must be at most the encoder's depth, 4 blocks, got 5"),
])
def test_a_size_that_does_not_fit_is_refused_on_the_meta_device(config, match):
    """``cliplab finetune`` checks the adapter on the architecture alone, before any weight loads."""
    from cliplab.models import check_weights

    visual = check_weights("shapes").visual
    assert visual.conv1.weight.is_meta
    with pytest.raises(ValueError, match=match):
        check_adapter(visual, config)
