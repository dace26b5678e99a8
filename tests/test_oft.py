"""Orthogonal fine-tuning: R orthogonal, identity at initialisation, neuron geometry preserved, merge exact."""
import copy

import pytest
import torch
from torch import nn

from cliplab.training.oft import OrthogonalRotation
from cliplab.training import apply_oft, merge_adapters, oft_parameters


def perturb(module, scale=0.3):
    """Stand-in for training: random generators, i.e. a random block-orthogonal R per weight."""
    with torch.no_grad():
        for p in oft_parameters(module):
            p.normal_(0, scale)


@pytest.fixture()
def visual(random_shapes_clf):
    """A fresh copy of the session's random image encoder, for each test to adapt as it likes."""
    return copy.deepcopy(random_shapes_clf.model.visual)


def test_rotation_is_orthogonal_to_float_precision():
    rotation = OrthogonalRotation(64, 16).double()
    with torch.no_grad():
        rotation.generator.normal_(0, 1.0)
    blocks = rotation.rotation_blocks()
    eye = torch.eye(16, dtype=torch.float64).expand_as(blocks)
    torch.testing.assert_close(blocks @ blocks.transpose(1, 2), eye, atol=1e-12, rtol=0)
    assert torch.allclose(torch.linalg.det(blocks), torch.ones(4, dtype=torch.float64))  # rotations, det +1


def test_identity_at_initialisation_and_only_oft_trainable(visual):
    x = torch.rand(4, 3, 32, 32)
    before = visual(x)
    names = apply_oft(visual, block_size=8)
    assert any(name.endswith("attn.in_proj_weight") for name in names)  # the fused q/k/v projection
    assert any(name.endswith("attn.out_proj.weight") for name in names)
    torch.testing.assert_close(visual(x), before)
    trainable = [p for p in visual.parameters() if p.requires_grad]
    assert trainable and {id(p) for p in trainable} == {id(p) for p in oft_parameters(visual)}


def test_neuron_norms_and_angles_are_preserved(visual):
    attn = visual.transformer.resblocks[0].attn
    w0 = attn.in_proj_weight.detach().clone()
    apply_oft(visual, block_size=16)
    perturb(visual)
    w = attn.in_proj_weight.detach()
    assert not torch.allclose(w, w0, atol=1e-3)  # the weight did change
    torch.testing.assert_close(w @ w.T, w0 @ w0.T, atol=1e-4, rtol=1e-4)  # Gram matrix: norms and angles


def test_merged_and_unmerged_outputs_agree(visual):
    x = torch.rand(4, 3, 32, 32)
    apply_oft(visual, block_size=8)
    perturb(visual)
    adapted = visual(x)
    merge_adapters(visual)
    assert not any(isinstance(m, OrthogonalRotation) for m in visual.modules())
    torch.testing.assert_close(visual(x), adapted, atol=1e-5, rtol=1e-4)


def test_merging_a_copy_leaves_the_original_working(visual):
    # parametrize shares one class between a module and its deepcopy: merging must not break the other
    x = torch.rand(2, 3, 32, 32)
    apply_oft(visual, block_size=8)
    perturb(visual)
    adapted = visual(x)
    merged = merge_adapters(copy.deepcopy(visual))
    torch.testing.assert_close(visual(x), adapted)
    torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=1e-4)
    assert oft_parameters(visual) and not oft_parameters(merged)


def test_gradients_reach_the_generators(visual):
    apply_oft(visual, block_size=8)
    visual(torch.rand(2, 3, 32, 32)).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in oft_parameters(visual))


def test_block_size_not_dividing_the_width_is_a_clear_error_and_changes_nothing():
    layer = nn.Sequential(nn.Linear(12, 4), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="block_size"):
        apply_oft(layer, block_size=8)
    assert all(p.requires_grad for p in layer.parameters()) and not oft_parameters(layer)
    with pytest.raises(ValueError, match="block_size"):
        apply_oft(layer, block_size=0)


def test_targets_select_weights():
    layer = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    assert apply_oft(layer, block_size=4, targets=lambda name, m: name == "2") == ["2.weight"]
