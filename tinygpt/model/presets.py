"""Named model sizes: the real TinyGPT-V shapes and the tiny twin used by tests and the embedded default."""

from __future__ import annotations

import copy

from ..errors import UserError, did_you_mean
from .vlm_config import TinyGPTVConfig

PHI2 = dict(
    vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
    rotary_dim=32, rope_base=10000.0, max_position_embeddings=2048, layer_norm_eps=1e-5, rms_norm_eps=1e-6,
    resid_pdrop=0.1, embd_pdrop=0.0,
)
EVA_VIT_G = dict(
    hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16, patch_size=14,
    image_size=224, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
    initializer_range=0.02,  # transformers' default (1e-10) would make a randomly initialised ViT blind
)
BLIP2_QFORMER = dict(
    hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, hidden_act="gelu",
    layer_norm_eps=1e-12, cross_attention_frequency=2, encoder_hidden_size=1408, max_position_embeddings=512,
)

TINY_PHI = dict(PHI2, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                rotary_dim=32, resid_pdrop=0.0, max_position_embeddings=1024)
TINY_VIT = dict(EVA_VIT_G, hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                image_size=112)
TINY_QFORMER = dict(BLIP2_QFORMER, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                    encoder_hidden_size=128)

PRESETS = {
    # Phi-2 + EVA ViT-g/14 + BLIP-2 Q-Former, 224 px (stages 1-3) and 448 px (stage 4).
    "tinygptv": dict(text=PHI2, vision=EVA_VIT_G, qformer=BLIP2_QFORMER, proj_hidden_size=4096, num_query_tokens=32),
    # The tiny twin: same structure, a few million parameters, runs anywhere.
    "tiny": dict(text=TINY_PHI, vision=TINY_VIT, qformer=TINY_QFORMER, proj_hidden_size=512, num_query_tokens=32),
}


def build_config(
    preset: str = "tinygptv",
    image_size: int | None = None,
    lora: dict | None = None,
    extra_norms: bool = True,
    **overrides,
) -> TinyGPTVConfig:
    """A ``TinyGPTVConfig`` for a named size. ``extra_norms=False`` gives plain Phi-2 (no q/k LN, no post RMSNorm)."""
    if preset not in PRESETS:
        hint = did_you_mean(preset, PRESETS)
        raise UserError(f"model.preset: unknown preset {preset!r}{hint}; known: {', '.join(PRESETS)}")
    spec = copy.deepcopy(PRESETS[preset])
    if image_size is not None:
        spec["vision"]["image_size"] = int(image_size)
    spec["text"]["qk_layernorm"] = extra_norms
    spec["text"]["post_attention_rmsnorm"] = extra_norms
    spec["qformer"]["encoder_hidden_size"] = spec["vision"]["hidden_size"]
    return TinyGPTVConfig(
        vision_config=spec["vision"],
        qformer_config=spec["qformer"],
        text_config=spec["text"],
        proj_hidden_size=spec["proj_hidden_size"],
        num_query_tokens=spec["num_query_tokens"],
        lora=lora,
        **overrides,
    )
