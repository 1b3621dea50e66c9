"""The text-to-image adapter layouts as pure state_dict -> state_dict conversions, round trip."""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.diffusion.formats import (
    METADATA_KEY,
    alphas_from_metadata,
    from_kohya,
    is_kohya,
    peft_config,
    to_diffusers_metadata,
    to_kohya,
)
from lorakit.errors import LorakitError

PATHS = {
    "unet": ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
             "mid_block.attentions.0.proj_in"],
    "text_encoder": ["text_model.encoder.layers.0.self_attn.q_proj"],
}


def _state(ranks=(4, 4, 8, 2)) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    g = torch.Generator().manual_seed(0)
    modules = [f"{c}.{p}" for c, paths in PATHS.items() for p in paths]
    state, alphas = {}, {}
    for module, r in zip(modules, ranks, strict=True):
        state[f"{module}.lora_A.weight"] = torch.randn(r, 16, generator=g)
        state[f"{module}.lora_B.weight"] = torch.randn(24, r, generator=g)
        alphas[module] = 2.0 * r if "proj_in" not in module else 3.0
    return state, alphas


@pytest.mark.parametrize("sdxl", [False, True])
def test_kohya_round_trip(sdxl):
    state, alphas = _state()
    kohya = to_kohya(state, alphas, sdxl)
    te = "lora_te1_" if sdxl else "lora_te_"
    assert set(kohya) >= {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight",
        "lora_unet_mid_block_attentions_0_proj_in.alpha",
        f"{te}text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"}
    assert is_kohya(kohya) and not is_kohya(state)
    paths = dict(PATHS, **({"text_encoder_2": []} if sdxl else {}))
    back, back_alphas = from_kohya(kohya, paths)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    assert back_alphas == alphas


def test_kohya_without_alpha_means_alpha_equals_rank_and_unknown_names_are_refused():
    state, alphas = _state()
    kohya = {k: v for k, v in to_kohya(state, alphas).items() if not k.endswith(".alpha")}
    _, back = from_kohya(kohya, PATHS)
    assert back["unet.mid_block.attentions.0.proj_in"] == 8.0
    kohya["lora_unet_up_blocks_9_nothing.lora_down.weight"] = torch.zeros(1, 1)
    with pytest.raises(LorakitError, match="lora_unet_up_blocks_9_nothing names no module"):
        from_kohya(kohya, PATHS, "x.safetensors")


def test_diffusers_metadata_round_trip_with_mixed_ranks_and_alphas():
    state, alphas = _state()
    meta = to_diffusers_metadata(state, alphas)
    packed = json.loads(meta[METADATA_KEY])
    assert packed["unet.r"] == 4 and packed["unet.lora_alpha"] == 8.0
    assert packed["unet.rank_pattern"] == {"mid_block.attentions.0.proj_in": 8}
    assert packed["unet.alpha_pattern"] == {"mid_block.attentions.0.proj_in": 3.0}
    assert packed["text_encoder.r"] == 2
    assert alphas_from_metadata(state, meta) == alphas
    # without diffusers' header every module gets alpha = r, diffusers' own rule
    assert alphas_from_metadata(state, None) == {m.rsplit(".lora_", 1)[0]: float(t.shape[0])
                                                 for m, t in state.items() if "lora_A" in m}


def test_peft_config_is_what_peft_builds():
    peft = pytest.importorskip("peft")
    state, alphas = _state()
    config = peft.LoraConfig(**peft_config(state, alphas, "unet"))
    assert config.r == 4 and config.lora_alpha == 8.0
    assert set(config.target_modules) == set(PATHS["unet"])
