"""Save a llavakit model as a llava-hf checkpoint directory that transformers and llavakit both load.

A quantized model (llavakit.quant) is saved as a compressed-tensors checkpoint: its packed tensors under
their compressed-tensors names and a "quantization_config" block in config.json.

The llava-hf format (config.json with nested text_config / vision_config, hub tensor names, an image
processor config) holds LLaVA-1.5 and NeXT models with a two-layer GELU projector and no layout-specific
tokens. Original-layout models are converted on the way: their -200 image placeholder becomes a real
token id of the tokenizer. The tower tensors llavakit never builds (post_layernorm, layers past the
feature layer) can be carried over from the source checkpoint with `unused_source_tensors`, so that
transformers finds every tensor its CLIP model expects.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from torch import nn

from llavakit.config import ImageConfig, LlavaConfig, RopeConfig, TextConfig, VisionConfig
from llavakit.models.llava import LlavaForConditionalGeneration
from llavakit.quant.formats import quantize_weight
from llavakit.quant.linear import QuantLinear
from llavakit.quant.quantize import quantize_skeleton
from llavakit.weights.files import find_weight_files, iter_tensors
from llavakit.weights.name_maps import LAYOUTS, Rules, detect_layout, is_unused, map_name
from llavakit.weights.quantized import model_quantization, quantization_fields

# llavakit parameter names -> llava-hf hub names: the inverse of name_maps.LLAVA_HF.
TO_LLAVA_HF: Rules = [
    ("language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("vision_tower.", "vision_tower.vision_model."),
    ("projector.0.", "multi_modal_projector.linear_1."),
    ("projector.2.", "multi_modal_projector.linear_2."),
    ("image_newline", "image_newline"),
]

ARCHITECTURES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                 "llava_next_video": "LlavaNextVideoForConditionalGeneration"}
PROCESSOR_CLASSES = {"llava": "LlavaProcessor", "llava_next": "LlavaNextProcessor",
                     "llava_next_video": "LlavaNextVideoProcessor"}
# How each llava-hf model type merges image features; config.py reads it back from the model type alone.
HF_PATCH_MERGE = {"llava": "flat", "llava_next": "spatial_unpad", "llava_next_video": "spatial_unpad"}
IMAGE_PROCESSORS = {"pad": "LlavaImageProcessor", "anyres": "LlavaNextImageProcessor", "crop": "CLIPImageProcessor"}
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, what every LLaVA image processor resizes with
# Buffers that checkpoints may carry but every loader recomputes: never worth copying.
_COMPUTED = re.compile(r"(\.rotary_emb\.inv_freq|position_ids)$")


def check_hf_representable(cfg: LlavaConfig) -> None:
    """Raise ValueError when the llava-hf format cannot describe `cfg`."""
    keep = "; keep the original layout for this model (save it as it was loaded) instead"
    if cfg.projector_type != "mlp2x_gelu":
        raise ValueError(f"the llava-hf format cannot hold a {cfg.projector_type!r} projector (it has exactly "
                         f"linear_1 -> GELU -> linear_2, i.e. mlp2x_gelu){keep}")
    if cfg.use_im_start_end:
        raise ValueError(f"the llava-hf format cannot hold mm_use_im_start_end (<im_start>/<im_end> around "
                         f"image features){keep}")
    if cfg.patch_merge_type != HF_PATCH_MERGE[cfg.model_type]:
        raise ValueError(f"the llava-hf format cannot hold a {cfg.model_type} model with mm_patch_merge_type "
                         f"{cfg.patch_merge_type!r} (it implies {HF_PATCH_MERGE[cfg.model_type]!r}){keep}")
    if (cfg.image.mode == "anyres") != (cfg.model_type != "llava"):
        raise ValueError(f"the llava-hf format cannot hold a {cfg.model_type} model with {cfg.image.mode!r} "
                         f"image processing (AnyRes goes with llava_next only){keep}")


def resolve_image_token_id(cfg: LlavaConfig, image_token_id: int | None) -> int:
    """The image token id to save: `image_token_id` when given, else the config's own. An original-layout
    config has only the -200 placeholder, so the caller must pass the id of "<image>" in the tokenizer
    saved with the model; it must lie inside the embedding (vocab_size)."""
    token = cfg.image_token_id if image_token_id is None else image_token_id
    if token < 0:
        raise ValueError(f"this {cfg.layout}-layout model marks images with the placeholder id {token}, which the "
                         "llava-hf format cannot hold; add '<image>' to the tokenizer "
                         "(tokenizer.add_tokens(['<image>'], special_tokens=True)) and pass its id as image_token_id")
    if token >= cfg.text.vocab_size:
        raise ValueError(f"image_token_id {token} is outside the embedding (vocab_size {cfg.text.vocab_size}); "
                         "resize the embedding first or use a token id below vocab_size")
    return token


def hf_config_dict(cfg: LlavaConfig, image_token_id: int | None = None, dtype: torch.dtype | None = None) -> dict:
    """config.json in the llava-hf format, read alike by transformers 4/5 and `read_checkpoint_config`.

    image_token_id: see `resolve_image_token_id` (required for original-layout configs). dtype: recorded
    as "dtype" (transformers 5) and "torch_dtype" (transformers 4). Raises ValueError when the format
    cannot hold the model (`check_hf_representable`).
    """
    check_hf_representable(cfg)
    token = resolve_image_token_id(cfg, image_token_id)
    d: dict[str, Any] = {
        "architectures": [ARCHITECTURES[cfg.model_type]], "model_type": cfg.model_type,
        "text_config": hf_text_config(cfg.text), "vision_config": hf_vision_config(cfg.vision),
        "image_token_index": token, "image_token_id": token, "image_seq_length": cfg.tokens_per_tile,
        "vision_feature_layer": cfg.vision_feature_layer, "vision_feature_select_strategy": cfg.vision_feature_select,
        "projector_hidden_act": "gelu", "multimodal_projector_bias": cfg.projector_bias,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
    }
    if cfg.model_type != "llava":
        d["image_grid_pinpoints"] = [list(p) for p in cfg.image.pinpoints]
    if cfg.model_type == "llava_next_video":
        d.update(video_token_index=cfg.video_token_id, video_token_id=cfg.video_token_id,
                 spatial_pool_mode=cfg.spatial_pool_mode, spatial_pool_stride=cfg.spatial_pool_stride)
    if dtype is not None:
        d["dtype"] = d["torch_dtype"] = str(dtype).removeprefix("torch.")
    return d


def hf_text_config(text: TextConfig) -> dict:
    """A complete text_config: nothing is left to the model type's defaults."""
    d = dict(model_type="llama" if text.model_type == "yi" else text.model_type, vocab_size=text.vocab_size,
             hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
             num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
             num_key_value_heads=text.num_key_value_heads, head_dim=text.head_dim, hidden_act=text.hidden_act,
             rms_norm_eps=text.rms_norm_eps, max_position_embeddings=text.max_position_embeddings,
             tie_word_embeddings=text.tie_word_embeddings, attention_bias=text.attention_bias,
             mlp_bias=text.mlp_bias, bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id,
             pad_token_id=text.pad_token_id)
    d.update(hf_rope_fields(text.rope, text.max_position_embeddings))
    if text.model_type == "mistral" or text.sliding_window is not None:
        d["sliding_window"] = text.sliding_window  # an explicit null: mistral's default is 4096
    return d


def hf_rope_fields(rope: RopeConfig, max_position: int) -> dict:
    """RoPE in both spellings: rope_theta + rope_scaling (transformers 4) and rope_parameters (5).
    transformers 5 prefers rope_scaling when both are given, so the two always agree."""
    params: dict[str, Any] = {"rope_type": rope.kind, "rope_theta": rope.theta}
    if rope.kind != "default":
        params["factor"] = rope.factor
    if rope.kind == "dynamic" and rope.original_max_position != max_position:  # only dynamic NTK reads it
        params["original_max_position_embeddings"] = rope.original_max_position
    scaling = None if rope.kind == "default" else {"type": rope.kind, **params}
    return {"rope_theta": rope.theta, "rope_scaling": scaling, "rope_parameters": params}


def hf_vision_config(vision: VisionConfig) -> dict:
    return dict(model_type="clip_vision_model", hidden_size=vision.hidden_size,
                intermediate_size=vision.intermediate_size, num_hidden_layers=vision.num_hidden_layers,
                num_attention_heads=vision.num_attention_heads, image_size=vision.image_size,
                patch_size=vision.patch_size, hidden_act=vision.hidden_act, layer_norm_eps=vision.layer_norm_eps,
                num_channels=vision.num_channels)


def preprocessor_config_dict(cfg: LlavaConfig) -> dict:
    """preprocessor_config.json for cfg.image: anyres -> LlavaNextImageProcessor, pad -> LlavaImageProcessor
    with do_pad (expand2square), crop -> CLIPImageProcessor."""
    img: ImageConfig = cfg.image
    d: dict[str, Any] = {
        "image_processor_type": IMAGE_PROCESSORS[img.mode], "processor_class": PROCESSOR_CLASSES[cfg.model_type],
        "do_convert_rgb": True, "do_resize": True, "size": {"shortest_edge": img.size}, "resample": BICUBIC,
        "do_center_crop": True, "crop_size": {"height": img.crop_size, "width": img.crop_size},
        "do_rescale": True, "rescale_factor": img.rescale_factor,
        "do_normalize": True, "image_mean": list(img.mean), "image_std": list(img.std),
    }
    if img.mode == "pad":
        d["do_pad"] = True
    if img.mode == "anyres":
        d["image_grid_pinpoints"] = [list(p) for p in img.pinpoints]
    return d


def processor_config_dict(cfg: LlavaConfig) -> dict:
    """processor_config.json: what transformers' Llava*Processor needs to expand "<image>" to the number of
    image features (without it, AutoProcessor cannot count them)."""
    return {"processor_class": PROCESSOR_CLASSES[cfg.model_type], "image_token": "<image>",
            "patch_size": cfg.vision.patch_size, "num_additional_image_tokens": 1,
            "vision_feature_select_strategy": cfg.vision_feature_select}


def state_dict_for_hf(model: LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The model's tensors under llava-hf hub names (see `model_state_dict`)."""
    return {map_name(name, TO_LLAVA_HF): t for name, t in model_state_dict(model).items()}


def model_state_dict(model: LlavaForConditionalGeneration) -> dict[str, torch.Tensor]:
    """The model's tensors under llavakit names, on CPU, contiguous, in their current dtype: its parameters, and
    for quantized layers their packed compressed-tensors buffers. A tied lm_head is left out (loaders tie it)."""
    _check_savable(model)
    tied = model.cfg.text.tie_word_embeddings
    return {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()
            if not (tied and name == "lm_head.weight")}


def _check_savable(model: LlavaForConditionalGeneration) -> None:
    """Transforms other than quantization (LoRA) add or rename parameters that no layout has names for."""
    with torch.device("meta"):
        reference = LlavaForConditionalGeneration(model.cfg)
        qcfg = model_quantization(model)
        if qcfg is not None:
            quantize_skeleton(reference, qcfg)
    expected, actual = set(reference.state_dict()), set(model.state_dict())
    if actual != expected:
        odd = sorted(actual ^ expected)[:8]
        raise ValueError(f"the model's parameters differ from a plain LLaVA model ({odd}); merge LoRA adapters "
                         "before saving")


def unused_source_tensors(source_dir: str | Path, cfg: LlavaConfig,
                          layout: str | None = None) -> dict[str, torch.Tensor]:
    """Vision-tower tensors of a checkpoint (and of cfg.vision_tower_dir) that llavakit skipped because it
    never runs them, under llava-hf hub names; computed buffers (inv_freq, position_ids) are not included.
    `layout` names source_dir's name map (name_maps.LAYOUTS; default cfg.layout, e.g. "clip" for a bare CLIP
    directory). Pass the result as `save_llava_hf(..., extra_tensors=...)` so transformers loads it whole."""
    built = max(cfg.feature_layers)
    sources = [(Path(source_dir), layout or cfg.layout)]
    if cfg.vision_tower_dir:
        sources.append((Path(cfg.vision_tower_dir), "clip"))
    found: dict[str, Any] = {}
    for directory, kind in sources:
        entries = list(iter_tensors(find_weight_files(directory)))
        if kind in ("llava-hf", "original"):  # names tell transformers-5 apart, as in the loader
            kind = detect_layout([n for n, _ in entries], kind)
        for name, get in entries:
            target = _target(name, LAYOUTS[kind])
            if (target and target.startswith("vision_tower.") and is_unused(target, built)
                    and not _COMPUTED.search(target)):
                found.setdefault(map_name(target, TO_LLAVA_HF), get)  # the first source wins, as in the loader
    return {name: get() for name, get in found.items()}


def _target(name: str, rules: Rules) -> str | None:
    try:
        return map_name(name, rules)
    except KeyError:
        return None


def save_llava_hf(model: LlavaForConditionalGeneration, out_dir: str | Path, tokenizer: Any = None,
                  extra_tensors: dict[str, torch.Tensor] | None = None, max_shard_bytes: int = 5 * 2**30,
                  image_token_id: int | None = None) -> Path:
    """Write `model` to `out_dir` as a llava-hf checkpoint: config.json, preprocessor_config.json,
    model.safetensors (or model-0000i-of-0000n.safetensors shards + model.safetensors.index.json past
    `max_shard_bytes`) and, when a tokenizer is given, its files and processor_config.json.

    extra_tensors: more tensors under hub names (see `unused_source_tensors`); floating ones are cast to
    the model's dtype so the checkpoint has one dtype. image_token_id: the tokenizer's "<image>" id;
    required for original-layout models (whose placeholder is -200), else it replaces the config's id.
    Raises ValueError when the llava-hf format cannot hold the model.
    """
    cfg = model.cfg
    check_hf_representable(cfg)  # fail before copying any tensor
    token = resolve_image_token_id(cfg, image_token_id)
    _check_tokenizer(tokenizer, token)
    state = state_dict_for_hf(model)
    dtype = state["language_model.model.embed_tokens.weight"].dtype
    clash = sorted(set(state) & set(extra_tensors or {}))
    if clash:
        raise ValueError(f"extra_tensors repeat tensors the model has: {clash[:8]}; pass only tensors it lacks")
    for name, t in (extra_tensors or {}).items():
        state[name] = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype).contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {**hf_config_dict(cfg, token, dtype), **quantization_fields(model)})
    write_json(out / "preprocessor_config.json", preprocessor_config_dict(cfg))
    save_torch_state_dict(state, out, max_shard_size=max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
        write_json(out / "processor_config.json", processor_config_dict(cfg))
    return out


def _check_tokenizer(tokenizer: Any, token: int) -> None:
    if tokenizer is None:
        return
    vocab_id = tokenizer.get_vocab().get("<image>")
    if vocab_id != token:
        raise ValueError(f"the tokenizer's '<image>' token is {vocab_id}, but the model's image token id is {token}; "
                         "add '<image>' to the tokenizer and pass its id as image_token_id")


@torch.no_grad()
def grow_vocabulary(model: LlavaForConditionalGeneration, rows: int) -> None:
    """Give the embedding and the LM head `rows` rows (and model.cfg the new vocab_size). The new embedding rows
    are the mean of the old ones (the mean of the distribution transformers' conversion samples them from: so
    deterministic; "<image>" and "<pad>" rows are never looked up anyway); the new LM head rows are the mean of the
    LM head's, so a new token's logit is the mean of the old tokens' logits, never above the greedy pick: greedy
    answers stay those of the source model."""
    embed = model.language_model.embed_tokens
    embed.weight = nn.Parameter(_with_mean_rows(embed.weight, rows), requires_grad=embed.weight.requires_grad)
    embed.num_embeddings = rows
    head = model.lm_head
    if model.cfg.text.tie_word_embeddings:
        head.weight = embed.weight
    elif isinstance(head, QuantLinear):
        model.lm_head = _quantized_with_mean_rows(head, rows)
    else:
        head.weight = nn.Parameter(_with_mean_rows(head.weight, rows), requires_grad=head.weight.requires_grad)
    model.lm_head.out_features = rows
    model.cfg.text.vocab_size = rows


def _with_mean_rows(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """(n, D) -> (rows, D): the rows past n are the mean row (computed in float32)."""
    mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)  # (1, D)
    return torch.cat([weight, mean.expand(rows - weight.shape[0], -1)])


def _quantized_with_mean_rows(head: QuantLinear, rows: int) -> QuantLinear:
    """A quantized LM head quantizes each row on its own: the new rows are the quantized mean dequantized row."""
    grown = QuantLinear(head.in_features, rows, False, head.cfg, head.tp_style, head.weight_scale.device,
                        head.weight_scale.dtype)
    mean = head.dequantized_weight().float().mean(dim=0, keepdim=True).to(head.weight_scale.dtype)  # (1, D)
    new = quantize_weight(mean.expand(rows - head.out_features, -1), head.cfg)
    grown.weight_packed.copy_(torch.cat([head.weight_packed.to(grown.weight_packed.device), new["weight_packed"]]))
    grown.weight_scale.copy_(torch.cat([head.weight_scale, new["weight_scale"]]))
    grown.weight_shape.copy_(torch.tensor([rows, head.in_features]))
    return grown


def write_json(path: Path, data: dict) -> None:
    """`data` as indented, key-sorted JSON."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
