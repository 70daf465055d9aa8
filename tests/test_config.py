"""Config reading from the real (sparse) hub configs of each layout, without weights."""

from __future__ import annotations

import json

import huggingface_hub.constants
import pytest

from llavakit.checkpoint_config import read_checkpoint_config
from llavakit.config import ConfigError, LlavaConfig, parse_pinpoints
from llavakit.processing.image import num_image_tokens

VISION_L336 = {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096, "model_type": "clip_vision_model",
               "num_attention_heads": 16, "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
               "vocab_size": 32000}
PINPOINTS_16 = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

# As published (llava-hf/llava-1.5-7b-hf): the text_config relies on the llama defaults.
LLAVA15_HF = {"architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
              "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
              "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                              "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                              "torch_dtype": "float16", "vocab_size": 32064},
              "tie_word_embeddings": False, "torch_dtype": "float16", "vision_config": VISION_L336,
              "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}

LLAVA16_MISTRAL_HF = {"architectures": ["LlavaNextForConditionalGeneration"], "image_grid_pinpoints": PINPOINTS_16,
                      "image_token_index": 32000, "model_type": "llava_next", "projector_hidden_act": "gelu",
                      "text_config": {"_name_or_path": "mistralai/Mistral-7B-Instruct-v0.2",
                                      "architectures": ["MistralForCausalLM"], "intermediate_size": 14336,
                                      "max_position_embeddings": 32768, "model_type": "mistral",
                                      "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
                                      "sliding_window": None, "vocab_size": 32064},
                      "use_image_newline_parameter": True, "vision_config": VISION_L336,
                      "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064}

LLAVA16_34B_HF = {**LLAVA16_MISTRAL_HF, "image_token_index": 64000,
                  "text_config": {"_name_or_path": "NousResearch/Nous-Hermes-2-Yi-34B", "eos_token_id": 7,
                                  "hidden_size": 7168, "intermediate_size": 20480, "max_position_embeddings": 4096,
                                  "model_type": "llama", "num_attention_heads": 56, "num_hidden_layers": 60,
                                  "num_key_value_heads": 8, "pad_token_id": 0, "rms_norm_eps": 1e-05,
                                  "rope_theta": 5000000.0, "vocab_size": 64064}}

NEXT_VIDEO_HF = {**LLAVA16_MISTRAL_HF, "model_type": "llava_next_video", "image_token_index": 32001,
                 "video_token_index": 32000, "spatial_pool_mode": "average", "spatial_pool_stride": 2,
                 "text_config": {"model_type": "llama", "max_position_embeddings": 4096, "vocab_size": 32064,
                                 "rope_scaling": {"factor": 2.0, "type": "linear"}}}

# As published (liuhaotian/llava-v1.5-7b): flat LLaMA config plus mm_* keys; the tower lives elsewhere.
LLAVA15_ORIGINAL = {"_name_or_path": "./checkpoints/vicuna-7b-v1-5", "architectures": ["LlavaLlamaForCausalLM"],
                    "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096,
                    "image_aspect_ratio": "pad", "intermediate_size": 11008, "max_position_embeddings": 4096,
                    "mm_hidden_size": 1024, "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False,
                    "mm_use_im_start_end": False, "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2,
                    "mm_vision_tower": "openai/clip-vit-large-patch14-336", "model_type": "llava",
                    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32, "pad_token_id": 0,
                    "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
                    "torch_dtype": "float16", "use_mm_proj": True, "vocab_size": 32000}
LLAVA16_ORIGINAL = {**LLAVA15_ORIGINAL, "image_aspect_ratio": "anyres", "image_grid_pinpoints": PINPOINTS_16,
                    "mm_patch_merge_type": "spatial_unpad", "unfreeze_mm_vision_tower": True}


@pytest.fixture(autouse=True)
def _empty_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def _cfg(tmp_path, raw, processor=None) -> LlavaConfig:
    d = tmp_path / "ck"
    d.mkdir(exist_ok=True)
    (d / "config.json").write_text(json.dumps(raw))
    if processor:
        (d / "preprocessor_config.json").write_text(json.dumps(processor))
    return read_checkpoint_config(d)


def _tokens(cfg: LlavaConfig, width: int, height: int) -> int:
    return num_image_tokens((height, width), cfg.vision, cfg.image, cfg.vision_feature_select, cfg.patch_merge_type)


def test_sparse_llava15_hf_config_takes_llama_defaults(tmp_path):
    cfg = _cfg(tmp_path, LLAVA15_HF)
    t = cfg.text
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.num_attention_heads) == (4096, 11008, 32, 32)
    assert t.num_key_value_heads == 32 and t.head_dim == 128 and t.rope.theta == 10000.0
    assert t.max_position_embeddings == 4096 and t.rms_norm_eps == 1e-5 and t.vocab_size == 32064
    assert cfg.vision.grid_size == 24 and cfg.feature_layers == [23] and cfg.image_token_id == 32000
    assert cfg.image.mode == "pad" and cfg.patch_merge_type == "flat"
    assert _tokens(cfg, 1024, 899) == 576


def test_llava16_mistral_hf_config_and_anyres_token_counts(tmp_path):
    cfg = _cfg(tmp_path, LLAVA16_MISTRAL_HF)
    t = cfg.text
    assert t.model_type == "mistral" and t.num_key_value_heads == 8 and t.intermediate_size == 14336
    assert t.sliding_window is None and t.rope.theta == 1e6
    assert cfg.image.mode == "anyres" and cfg.patch_merge_type == "spatial_unpad"
    assert cfg.image.pinpoints == [tuple(p) for p in PINPOINTS_16]
    assert _tokens(cfg, 1024, 899) == 2634
    assert _tokens(cfg, 640, 480) == 2340


def test_mistral_default_sliding_window(tmp_path):
    raw = {**LLAVA16_MISTRAL_HF, "text_config": {"model_type": "mistral"}}
    t = _cfg(tmp_path, raw).text
    assert t.sliding_window == 4096 and t.max_position_embeddings == 131072 and t.num_key_value_heads == 8


def test_yi_34b_hf_config(tmp_path):
    cfg = _cfg(tmp_path, LLAVA16_34B_HF)
    assert cfg.image_token_id == 64000 and cfg.text.vocab_size == 64064 and cfg.text.eos_token_ids == [7]
    assert cfg.text.num_attention_heads == 56 and cfg.text.num_key_value_heads == 8 and cfg.text.rope.theta == 5e6


def test_next_video_config(tmp_path):
    cfg = _cfg(tmp_path, NEXT_VIDEO_HF)
    assert cfg.model_type == "llava_next_video" and cfg.image_token_id == 32001 and cfg.video_token_id == 32000
    assert (cfg.text.rope.kind, cfg.text.rope.factor) == ("linear", 2.0)
    # Linear scaling doubles the 4096 trained positions: 32 frames x 144 tokens fit in the prompt.
    assert cfg.text.context_length == 8192 and cfg.supports_video
    assert cfg.tokens_per_frame == 144 and cfg.video.num_frames == 32
    assert (cfg.spatial_pool_mode, cfg.spatial_pool_stride) == ("average", 2)
    assert (cfg.video.frame.mode, cfg.video.frame.crop_size) == ("crop", 336)


def test_next_video_token_ids_default_as_transformers(tmp_path):
    raw = {k: v for k, v in NEXT_VIDEO_HF.items() if k not in ("image_token_index", "video_token_index")}
    cfg = _cfg(tmp_path, raw)
    assert (cfg.image_token_id, cfg.video_token_id) == (32001, 32000)
    assert _cfg(tmp_path, LLAVA15_HF).video_token_id is None and not _cfg(tmp_path, LLAVA15_HF).supports_video


def test_next_video_frame_settings_from_video_preprocessor_config(tmp_path):
    _cfg(tmp_path, NEXT_VIDEO_HF)
    (tmp_path / "ck" / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "LlavaNextVideoVideoProcessor", "num_frames": 8, "size": {"shortest_edge": 400},
         "crop_size": {"height": 336, "width": 336}}))
    video = read_checkpoint_config(tmp_path / "ck").video
    assert video.num_frames == 8 and (video.frame.size, video.frame.crop_size) == (400, 336)


@pytest.mark.parametrize("change, message", [
    ({"spatial_pool_mode": "conv"}, "spatial_pool_mode 'conv' is not supported"),
    ({"spatial_pool_stride": 0}, "spatial_pool_stride 0 must be between 1 and the 24-patch grid side"),
    ({"vision_feature_select_strategy": "full"}, "needs vision_feature_select_strategy 'default'"),
    ({"image_token_index": 32000}, "video_token_index and image_token_index are both 32000"),
])
def test_next_video_config_errors(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, {**NEXT_VIDEO_HF, **change})


def test_rope_parameters_spelling(tmp_path):
    raw = {**LLAVA15_HF, "text_config": {"model_type": "llama",
                                         "rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 5e5}}}
    rope = _cfg(tmp_path, raw).text.rope
    assert (rope.kind, rope.factor, rope.theta) == ("dynamic", 4.0, 5e5)


def test_unsupported_rope_type_is_a_clear_error(tmp_path):
    raw = {**LLAVA15_HF, "text_config": {"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}}
    with pytest.raises(ConfigError, match="rope type 'yarn' is not supported"):
        _cfg(tmp_path, raw)


def test_preprocessor_config_decides_processing(tmp_path):
    clip = {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 336},
            "crop_size": {"height": 336, "width": 336}}
    assert _cfg(tmp_path, LLAVA15_HF, clip).image.mode == "crop"
    pad = {**clip, "image_processor_type": "LlavaImageProcessor", "do_pad": True}
    assert _cfg(tmp_path, LLAVA15_HF, pad).image.mode == "pad"


def test_original_llava15_config_with_known_tower(tmp_path):
    cfg = _cfg(tmp_path, LLAVA15_ORIGINAL)
    assert cfg.layout == "original" and cfg.image_token_id == -200 and cfg.projector_type == "mlp2x_gelu"
    assert cfg.vision.hidden_size == 1024 and cfg.vision.image_size == 336 and cfg.image.mode == "pad"
    assert cfg.text.vocab_size == 32000 and cfg.text.max_position_embeddings == 4096
    assert cfg.vision_tower_dir is None and cfg.vision_tower_name == "openai/clip-vit-large-patch14-336"


def test_original_llava16_config(tmp_path):
    cfg = _cfg(tmp_path, LLAVA16_ORIGINAL)
    assert cfg.image.mode == "anyres" and cfg.patch_merge_type == "spatial_unpad" and cfg.model_type == "llava_next"
    assert _tokens(cfg, 1024, 899) == 2634 and _tokens(cfg, 640, 480) == 2340


def test_original_mistral_and_cls_patch(tmp_path):
    raw = {**LLAVA16_ORIGINAL, "architectures": ["LlavaMistralForCausalLM"], "mm_vision_select_feature": "cls_patch",
           "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat", "mm_vision_select_layer": [-2, -5]}
    cfg = _cfg(tmp_path, raw)
    assert cfg.text.model_type == "mistral" and cfg.vision_feature_select == "full"
    assert cfg.feature_layers == [23, 20] and cfg.mm_hidden_size == 2048
    assert _tokens(cfg, 100, 100) == 577


def test_pinpoints_string_spelling():
    assert parse_pinpoints("(1x1),(1x2),(2x1),(2x2)", 384) == [(384, 384), (384, 768), (768, 384), (768, 768)]
    assert len(parse_pinpoints("(1x1),...,(6x6)", 384)) == 36
    assert parse_pinpoints([[336, 672], [672, 336]], 336) == [(336, 672), (672, 336)]
    with pytest.raises(ConfigError, match="image_grid_pinpoints"):
        parse_pinpoints("big", 336)


@pytest.mark.parametrize("raw, message", [
    ({"model_type": "bert"}, "not a LLaVA model"),
    ({**LLAVA15_HF, "text_config": {"model_type": "gpt2"}}, "unsupported text model_type 'gpt2'"),
    ({**LLAVA15_HF, "vision_config": {"model_type": "siglip_vision_model"}}, "unsupported vision model_type"),
    ({**LLAVA15_HF, "vision_feature_select_strategy": "cls"}, "default or full"),
    ({**LLAVA15_HF, "vision_feature_layer": -40}, "outside the 24-layer vision tower"),
    ({**LLAVA15_ORIGINAL, "mm_projector_type": "resampler"}, "mm_projector_type 'resampler'"),
    ({**LLAVA15_ORIGINAL, "mm_vision_tower": "someone/unknown-tower"}, "someone/unknown-tower"),
])
def test_config_errors_say_what_is_wrong(tmp_path, raw, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, raw)
