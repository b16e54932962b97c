"""freeze_attention_key_biases: the key-projection biases of attention layers (diffusers' ``to_k.bias``,
transformers' ``k_proj.bias`` in a CLIP text encoder trained beside a UNet) have gradient zero in exact arithmetic
(softmax is invariant to a shift of every logit of a query), so they are frozen; nothing else is. (The UNet case is
coverage: the function froze to_k.bias before; the CLIP case fails on the code before.)"""

from __future__ import annotations

import pytest
import torch

from genkernel.diffusion import freeze_attention_key_biases

pytestmark = pytest.mark.usefixtures("one_thread")


def clip_text_encoder():
    pytest.importorskip("transformers")
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(vocab_size=12, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                        num_attention_heads=2, max_position_embeddings=6)).double()


def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(sample_size=4, in_channels=2, out_channels=2, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                 attention_head_dim=2, norm_num_groups=4).double()
    for module in model.modules():  # (diffusers builds to_k without a bias by default: give the keys one)
        if hasattr(module, "to_k") and module.to_k.bias is None:
            module.to_k.bias = torch.nn.Parameter(torch.zeros(module.to_k.out_features, dtype=torch.float64))
    return model


@pytest.mark.parametrize("build, suffix, call", [
    (clip_text_encoder, "k_proj.bias", lambda m: m(torch.tensor([[1, 4, 7, 2, 9]])).last_hidden_state),
    (unet, "to_k.bias", lambda m: m(torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(1),
                                                dtype=torch.float64), torch.tensor([3, 9]),
                                    torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2),
                                                dtype=torch.float64)).sample),
])
def test_the_key_biases_are_frozen_and_shifting_them_changes_no_output(build, suffix, call):
    model = build()
    keys = sorted(name for name, _ in model.named_parameters() if name.endswith(suffix))
    assert keys and sorted(freeze_attention_key_biases(model)) == keys
    assert {name for name, p in model.named_parameters() if not p.requires_grad} == set(keys)
    before = call(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in keys:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype))
    torch.testing.assert_close(call(model), before, rtol=0, atol=1e-12)  # (what makes their gradient zero)
    assert freeze_attention_key_biases(model) == []  # (already frozen)
