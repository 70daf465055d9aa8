"""Named model configs at the published sizes, for dummy weights (`load_format="dummy"`): real-size speed
and memory measurements without downloading a checkpoint."""

from __future__ import annotations

from pathlib import Path

from llavakit.assets import LLAMA_TOKENIZER_DIR
from llavakit.config import ConfigError, ImageConfig, LlavaConfig, TextConfig, VisionConfig

_PINPOINTS_16 = [(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]
_L336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
             patch_size=14)
_VICUNA_7B = dict(vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)
_VICUNA_13B = dict(_VICUNA_7B, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40)
_MISTRAL_7B = dict(model_type="mistral", vocab_size=32064, intermediate_size=14336, num_key_value_heads=8,
                   max_position_embeddings=32768, rms_norm_eps=1e-5, sliding_window=None)
_YI_34B = dict(vocab_size=64064, hidden_size=7168, intermediate_size=20480, num_hidden_layers=60,
               num_attention_heads=56, num_key_value_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-5,
               eos_token_id=7)

_TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28,
                   patch_size=14)
_TINY_TEXT = dict(vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=2048, rms_norm_eps=1e-5)

PRESETS: dict[str, dict] = {
    "llava-1.5-7b": dict(model_type="llava", text=_VICUNA_7B, vision=_L336, image="pad"),
    "llava-1.5-13b": dict(model_type="llava", text=_VICUNA_13B, vision=_L336, image="pad"),
    "llava-v1.6-vicuna-7b": dict(model_type="llava_next", text=_VICUNA_7B, vision=_L336, image="anyres"),
    "llava-v1.6-mistral-7b": dict(model_type="llava_next", text=_MISTRAL_7B, vision=_L336, image="anyres",
                                  rope_theta=1e6),
    "llava-v1.6-34b": dict(model_type="llava_next", text=_YI_34B, vision=_L336, image="anyres", rope_theta=5e6,
                           image_token_id=64000),
    "llava-next-video-7b": dict(model_type="llava_next_video", image="anyres", vision=_L336,
                                text=dict(_VICUNA_7B, rope_scaling={"type": "linear", "factor": 2.0}),
                                image_token_id=32001, video_token_id=32000),
    # A CPU-sized model for benchmarks: 8 decoder layers of 512, a 4-layer tower with 64 image tokens.
    "bench-small": dict(model_type="llava", vision=dict(hidden_size=256, intermediate_size=1024,
                                                        num_hidden_layers=4, num_attention_heads=4, image_size=112,
                                                        patch_size=14),
                        text=dict(vocab_size=32064, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                                  num_attention_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-5),
                        image="pad"),
    # Tiny models for trying every command in seconds (random weights: the answers are noise): a 2-layer tower at
    # 28 px (a 2 x 2 patch grid), a 2-layer decoder of 64, the LLaMA vocabulary; "tiny-next" tiles (AnyRes).
    "tiny": dict(model_type="llava", vision=_TINY_TOWER, text=_TINY_TEXT, image="pad"),
    "tiny-next": dict(model_type="llava_next", vision=_TINY_TOWER, text=_TINY_TEXT, image="anyres",
                      pinpoints=[(28, 56), (56, 28), (56, 56)]),
}


# Presets whose text model uses the LLaMA / Vicuna vocabulary: the tokenizer shipped in llavakit.assets fits them.
LLAMA_VOCAB_PRESETS = ("llava-1.5-7b", "llava-1.5-13b", "llava-v1.6-vicuna-7b", "llava-next-video-7b", "bench-small",
                       "tiny", "tiny-next")


def preset_tokenizer_dir(name: str) -> Path | None:
    """The shipped LLaMA tokenizer for presets with a LLaMA vocabulary; None for the others (Mistral, Yi)."""
    return LLAMA_TOKENIZER_DIR if name in LLAMA_VOCAB_PRESETS else None


def preset_config(name: str) -> LlavaConfig:
    """The LlavaConfig of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    p = PRESETS[name]
    text = dict(p["text"])
    if "rope_theta" in p:
        text["rope_theta"] = p["rope_theta"]
    vision = VisionConfig(**p["vision"])
    mode = p["image"]
    image = ImageConfig(mode=mode, size=vision.image_size, crop_size=vision.image_size,
                        pinpoints=p.get("pinpoints", _PINPOINTS_16) if mode == "anyres" else [])
    return LlavaConfig(vision=vision, text=TextConfig.from_dict(text), image=image, model_type=p["model_type"],
                       image_token_id=p.get("image_token_id", 32000), video_token_id=p.get("video_token_id"),
                       patch_merge_type="spatial_unpad" if mode == "anyres" else "flat", name_or_path=name)
