"""The projector's 2x2 merge + LayerNorm (``merge=True`` with ``ln_weight``) is InternVL's ``mlp1``.

transformers' InternVL (``InternVLModel.get_image_features``) lays the ViT's patch tokens out as a square grid, applies
``pixel_shuffle(downsample_ratio=0.5)`` and flattens the grid again, then runs ``InternVLMultiModalProjector``:
LayerNorm(4d) -> Linear -> GELU -> Linear. ``merge_tokens_ref`` must give the same tokens in the same channel order,
and ``ops.projector(merge=True, ln...)`` the same output, on the reference path and on the fused path (whose
merge_layernorm op runs its torch emulation on CPU), for the InternVL family to use them.
"""

from __future__ import annotations

import pytest
import torch
from transformers import InternVLConfig
from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLMultiModalProjector

from megavlm import ops
from megavlm.ops.reference import merge_tokens_ref, unmerge_tokens_ref


def _hf_pixel_shuffle(features: torch.Tensor) -> torch.Tensor:
    """What InternVLModel.get_image_features does between the ViT and the projector, (n, h*w, c) -> (n, h*w/4, 4c)."""
    n, t, c = features.shape
    side = int(t**0.5)
    grid = features.reshape(n, side, side, c)
    shuffled = InternVLModel.pixel_shuffle(None, grid, scale_factor=0.5)  # uses nothing of the model
    return shuffled.reshape(n, -1, shuffled.shape[-1])


@pytest.mark.parametrize("side", [4, 8])
def test_merge_tokens_is_internvl_pixel_shuffle(side):
    x = torch.randn(3, side * side, 6, generator=torch.Generator().manual_seed(side), dtype=torch.float64)
    merged = merge_tokens_ref(x)
    assert torch.equal(merged, _hf_pixel_shuffle(x))  # a permutation: exactly equal
    assert torch.equal(unmerge_tokens_ref(merged), x)


@pytest.mark.parametrize("kernels", ["reference", "fused"])
def test_projector_with_merge_and_layernorm_is_internvl_mlp1(kernels):
    torch.manual_seed(0)
    d, h = 8, 16
    config = InternVLConfig(
        vision_config={"hidden_size": d, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 4},
        text_config={"model_type": "qwen2", "hidden_size": h, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 50},
        downsample_ratio=0.5, projector_hidden_act="gelu")
    mlp1 = InternVLMultiModalProjector(config).double()
    with torch.no_grad():  # not LayerNorm's identity init
        mlp1.layer_norm.weight.normal_(1.0, 0.2)
        mlp1.layer_norm.bias.normal_(0.0, 0.2)
    features = torch.randn(2, 64, d, dtype=torch.float64, requires_grad=True)

    expected = mlp1(_hf_pixel_shuffle(features))
    ln, fc1, fc2 = mlp1.layer_norm, mlp1.linear_1, mlp1.linear_2
    got = ops.projector(features, ln.weight, ln.bias, True, fc1.weight, fc1.bias, fc2.weight, fc2.bias, "gelu",
                        ln.eps, kernels=kernels, resolved=True)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    params = [features, *mlp1.parameters()]
    go = torch.randn(expected.shape, dtype=torch.float64)
    for a, r in zip(torch.autograd.grad(got, params, go), torch.autograd.grad(expected, params, go)):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)
