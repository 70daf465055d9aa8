"""Save a llavakit model in the original LLaVA layout (liuhaotian/llava-v1.5-*, llava-v1.6-*).

config.json is a flat LLaMA/Mistral config plus the `mm_*` keys that `checkpoint_config` reads back; tensors
use the original names (`model.layers.*`, `model.mm_projector.*`, `lm_head.weight`). The vision tower goes
inside the checkpoint (as LLaVA-1.6 does) when its shape is a known CLIP that `mm_vision_tower` can name;
any other tower is written beside it as a CLIP directory (`vision_tower/`, as LLaVA-1.5 keeps its tower
apart), which the original layout can only point to: load it with vision_tower= (CLI: --vision-tower).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict

from llavakit.config import KNOWN_VISION_TOWERS, LlavaConfig
from llavakit.models.llava import LlavaForConditionalGeneration
from llavakit.weights.name_maps import LLAVA_HF, Rules, map_name
from llavakit.weights.quantized import quantization_fields
from llavakit.weights.save import hf_text_config, hf_vision_config, model_state_dict, write_json

# llavakit names -> original names: the inverse of name_maps.ORIGINAL (a `linear` projector has no index).
TO_ORIGINAL: Rules = [
    ("language_model.", "model."),
    ("lm_head.", "lm_head."),
    ("projector.", "model.mm_projector."),
    ("vision_tower.", "model.vision_tower.vision_tower.vision_model."),
    ("image_newline", "model.image_newline"),
]
TO_CLIP: Rules = [("vision_tower.", "vision_model.")]
TOWER_DIR = "vision_tower"
ASPECT_RATIOS = {"pad": "pad", "anyres": "anyres", "crop": "square"}


def check_original_representable(cfg: LlavaConfig) -> None:
    """Raise ValueError when the original layout cannot describe `cfg`."""
    if cfg.model_type == "llava_next_video":
        raise ValueError("the original LLaVA layout has no video model; keep llava_next_video models in the "
                         "llava-hf layout")
    if isinstance(cfg.vision_feature_layer, list):
        raise ValueError(f"the original LLaVA layout selects one vision layer (mm_vision_select_layer), not "
                         f"{cfg.vision_feature_layer}; keep this model in the llava-hf layout")
    if (cfg.model_type == "llava_next") != (cfg.image.mode == "anyres"):
        raise ValueError(f"the original LLaVA layout ties AnyRes to LLaVA-NeXT; a {cfg.model_type} model with "
                         f"{cfg.image.mode!r} images cannot be written in it, keep the llava-hf layout")


def known_tower_name(cfg: LlavaConfig) -> str | None:
    """The hub id of a known CLIP with exactly this tower's shape (the name `mm_vision_tower` will carry)."""
    for name, fields in KNOWN_VISION_TOWERS.items():
        if all(getattr(cfg.vision, k) == v for k, v in fields.items()):
            return cfg.vision_tower_name if cfg.vision_tower_name in KNOWN_VISION_TOWERS else name
    return None


def original_config_dict(cfg: LlavaConfig, tower_name: str, dtype: torch.dtype | None = None) -> dict:
    """config.json in the original layout (`LlavaLlamaForCausalLM` / `LlavaMistralForCausalLM`)."""
    check_original_representable(cfg)
    mistral = cfg.text.model_type == "mistral"
    text = hf_text_config(cfg.text)
    text.pop("rope_parameters")  # the original code predates transformers 5: rope_theta + rope_scaling only
    d: dict[str, Any] = {
        **text, "architectures": ["LlavaMistralForCausalLM" if mistral else "LlavaLlamaForCausalLM"],
        "model_type": "llava_mistral" if mistral else "llava", "mm_vision_tower": tower_name,
        "mm_hidden_size": cfg.vision.hidden_size, "mm_projector_type": cfg.projector_type,
        "mm_vision_select_layer": cfg.vision_feature_layer,
        "mm_vision_select_feature": "patch" if cfg.vision_feature_select == "default" else "cls_patch",
        "mm_use_im_start_end": cfg.use_im_start_end, "mm_use_im_patch_token": False,
        "image_aspect_ratio": ASPECT_RATIOS[cfg.image.mode], "mm_patch_merge_type": cfg.patch_merge_type,
    }
    if cfg.image.mode == "anyres":
        d["image_grid_pinpoints"] = [list(p) for p in cfg.image.pinpoints]
    if dtype is not None:
        d["torch_dtype"] = str(dtype).removeprefix("torch.")
    return d


def clip_preprocessor_dict(cfg: LlavaConfig) -> dict:
    """The CLIP tower's preprocessor_config.json: where the original layout keeps image size and normalization."""
    img = cfg.image
    return {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True,
            "size": {"shortest_edge": img.size}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": img.crop_size, "width": img.crop_size}, "do_rescale": True,
            "rescale_factor": img.rescale_factor, "do_normalize": True, "image_mean": list(img.mean),
            "image_std": list(img.std)}


def save_original(model: LlavaForConditionalGeneration, out_dir: str | Path, tokenizer: Any = None,
                  extra_tensors: dict[str, torch.Tensor] | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `model` to `out_dir` in the original LLaVA layout and return the directory.

    extra_tensors: unbuilt tower tensors under llava-hf names (`save.unused_source_tensors`). The tower goes
    inside when `known_tower_name` finds one, else to out_dir/vision_tower (a CLIP directory that
    `mm_vision_tower` names by absolute path). A quantized model is saved in the compressed-tensors format.
    Raises ValueError when the layout cannot hold the model."""
    cfg = model.cfg
    check_original_representable(cfg)
    out = Path(out_dir)
    state = model_state_dict(model)
    dtype = state["language_model.embed_tokens.weight"].dtype
    for name, t in (extra_tensors or {}).items():
        state[map_name(name, LLAVA_HF)] = t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype)
    tower = {n: state.pop(n) for n in [n for n in state if n.startswith("vision_tower.")]}
    tower_name = known_tower_name(cfg)
    if tower_name is None:
        tower_name = str((out / TOWER_DIR).resolve())
        _save_clip_tower(cfg, tower, out / TOWER_DIR, max_shard_bytes)
    else:
        state.update(tower)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {**original_config_dict(cfg, tower_name, dtype), **quantization_fields(model)})
    save_torch_state_dict({map_name(n, TO_ORIGINAL): t for n, t in state.items()}, out,
                          max_shard_size=max_shard_bytes)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _save_clip_tower(cfg: LlavaConfig, tower: dict[str, torch.Tensor], out: Path, max_shard_bytes: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", {**hf_vision_config(cfg.vision), "architectures": ["CLIPVisionModel"]})
    write_json(out / "preprocessor_config.json", clip_preprocessor_dict(cfg))
    save_torch_state_dict({map_name(n, TO_CLIP): t for n, t in tower.items()}, out, max_shard_size=max_shard_bytes)
