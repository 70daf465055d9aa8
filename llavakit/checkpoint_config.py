"""Reading a checkpoint directory's config.json (and preprocessor_config.json) in each of the three
layouts into a LlavaConfig; finding the CLIP tower an original checkpoint names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llavakit.config import (
    CLIP_MEAN,
    CLIP_STD,
    KNOWN_VISION_TOWERS,
    LLAVA_MODEL_TYPES,
    ORIGINAL_ARCHITECTURES,
    ORIGINAL_IMAGE_TOKEN_ID,
    ConfigError,
    ImageConfig,
    LlavaConfig,
    TextConfig,
    VideoConfig,
    VisionConfig,
    load_json,
    parse_pinpoints,
)

# Token ids transformers assumes when a config omits them: llava-hf NeXT-Video put <video> first (32000).
_DEFAULT_TOKEN_IDS = {"llava": (32000, None), "llava_next": (32000, None), "llava_next_video": (32001, 32000)}


def read_checkpoint_config(path: str | Path, vision_tower: str | Path | None = None) -> LlavaConfig:
    """Read `path/config.json` in any of the three layouts (llava-hf, transformers, original LLaVA).
    `vision_tower`: a local CLIP directory for original checkpoints whose `mm_vision_tower` lives elsewhere."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"checkpoint directory {path} does not exist; pass a local directory or a hub id")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} has no config.json; expected a LLaVA checkpoint directory "
                          "(llava-hf, transformers or original LLaVA layout)")
    raw = load_json(path / "config.json")
    arch = (raw.get("architectures") or [""])[0]
    if "mm_vision_tower" in raw or "mm_hidden_size" in raw or arch in ORIGINAL_ARCHITECTURES:
        return _from_original(raw, path, vision_tower)
    if raw.get("model_type") in LLAVA_MODEL_TYPES:
        return _from_hf(raw, path)
    raise ConfigError(f"{path}/config.json has model_type {raw.get('model_type')!r}, which is not a LLaVA model; "
                      f"llavakit loads {', '.join(LLAVA_MODEL_TYPES)} and original LLaVA checkpoints")


def _from_hf(raw: dict[str, Any], path: Path) -> LlavaConfig:
    """llava-hf / transformers configs: nested text_config and vision_config."""
    mt = raw["model_type"]
    text_raw = dict(raw.get("text_config") or {})
    if "tie_word_embeddings" in raw and "tie_word_embeddings" not in text_raw:
        text_raw["tie_word_embeddings"] = raw["tie_word_embeddings"]
    text = TextConfig.from_dict(text_raw)
    vision = VisionConfig.from_dict(raw.get("vision_config") or {})
    pinpoints = parse_pinpoints(raw.get("image_grid_pinpoints"), vision.image_size)
    default_mode = "anyres" if mt != "llava" else "pad"
    image = _image_config(path / "preprocessor_config.json", vision, default_mode, pinpoints)
    image_id, video_id = _DEFAULT_TOKEN_IDS[mt]
    return LlavaConfig(
        vision=vision, text=text, model_type=mt, layout="llava-hf", image=image,
        video=_video_config(path / "video_preprocessor_config.json", vision),
        image_token_id=raw.get("image_token_id", raw.get("image_token_index", image_id)),
        video_token_id=raw.get("video_token_id", raw.get("video_token_index", video_id)),
        vision_feature_layer=raw.get("vision_feature_layer", -2),
        vision_feature_select=raw.get("vision_feature_select_strategy", "default"),
        projector_type="mlp2x_gelu", projector_bias=raw.get("multimodal_projector_bias", True),
        patch_merge_type="flat" if mt == "llava" else "spatial_unpad",
        spatial_pool_mode=raw.get("spatial_pool_mode", "average"),
        spatial_pool_stride=raw.get("spatial_pool_stride", 2),
        name_or_path=str(path),
    )


def _from_original(raw: dict[str, Any], path: Path, vision_tower: str | Path | None) -> LlavaConfig:
    """Original LLaVA configs: a flat LLaMA/Mistral config plus mm_* keys."""
    arch = (raw.get("architectures") or [""])[0]
    text_type = ORIGINAL_ARCHITECTURES.get(arch, "mistral" if raw.get("model_type") == "llava_mistral" else "llama")
    text = TextConfig.from_dict({**raw, "model_type": text_type})
    tower_name = raw.get("mm_vision_tower")
    tower_dir = resolve_vision_tower(tower_name, vision_tower)
    if tower_dir is not None:
        vision = VisionConfig.from_dict(load_json(tower_dir / "config.json"))
    elif tower_name in KNOWN_VISION_TOWERS:
        vision = VisionConfig(**KNOWN_VISION_TOWERS[tower_name])
    else:
        raise ConfigError(vision_tower_missing_message(tower_name))
    aspect = raw.get("image_aspect_ratio", "square")
    mode = {"pad": "pad", "anyres": "anyres"}.get(aspect, "crop")
    pinpoints = parse_pinpoints(raw.get("image_grid_pinpoints"), vision.image_size)
    preproc = tower_dir / "preprocessor_config.json" if tower_dir else None
    select = raw.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        raise ConfigError(f"mm_vision_select_feature {select!r} is not patch or cls_patch")
    return LlavaConfig(
        vision=vision, text=text, model_type="llava_next" if mode == "anyres" else "llava", layout="original",
        image=_image_config(preproc, vision, mode, pinpoints, force_mode=True),
        image_token_id=ORIGINAL_IMAGE_TOKEN_ID,
        vision_feature_layer=raw.get("mm_vision_select_layer", -2),
        vision_feature_select="default" if select == "patch" else "full",
        projector_type=raw.get("mm_projector_type", "linear"),
        patch_merge_type=raw.get("mm_patch_merge_type", "flat"),
        use_im_start_end=bool(raw.get("mm_use_im_start_end", False)),
        vision_tower_name=tower_name, vision_tower_dir=str(tower_dir) if tower_dir else None,
        name_or_path=str(path),
    )


def _image_config(preproc: Path | None, vision: VisionConfig, mode: str, pinpoints: list[tuple[int, int]],
                  force_mode: bool = False) -> ImageConfig:
    """Image settings from a preprocessor_config.json when there is one, else CLIP defaults."""
    p = load_json(preproc) if preproc is not None and preproc.is_file() else {}
    size = p.get("size", {}) if isinstance(p.get("size"), dict) else {"shortest_edge": p.get("size")}
    crop = p.get("crop_size", {}) if isinstance(p.get("crop_size"), dict) else {"height": p.get("crop_size")}
    kind = p.get("image_processor_type", "")
    if p and not force_mode:
        if "LlavaNext" in kind or "LlavaOnevision" in kind:
            mode = "anyres"
            pinpoints = parse_pinpoints(p.get("image_grid_pinpoints"), vision.image_size) or pinpoints
        else:
            mode = "pad" if p.get("do_pad") else "crop"
    short = size.get("shortest_edge") or size.get("height") or vision.image_size
    check_crop_size(int(crop.get("height") or short), vision.image_size, preproc)
    return ImageConfig(mode=mode, size=int(short), crop_size=int(crop.get("height") or short),
                       mean=tuple(p.get("image_mean", CLIP_MEAN)), std=tuple(p.get("image_std", CLIP_STD)),
                       rescale_factor=float(p.get("rescale_factor", 1 / 255)), pinpoints=pinpoints)


def check_crop_size(crop: int, tower: int, preproc: Path) -> None:
    """Refuse images of another size than the vision tower's (`preproc`'s directory holds its config.json): its
    position embeddings fit image_size only, so the first image would stop on a shape mismatch."""
    if crop != tower:
        raise ConfigError(f"{preproc} crops images to {crop}x{crop} (crop_size) but the vision tower in "
                          f"{preproc.parent / 'config.json'} takes {tower}x{tower} (image_size); set crop_size and "
                          f"size to {tower} in {preproc.name}, or use the one that came with this vision tower")


def _video_config(preproc: Path, vision: VisionConfig) -> VideoConfig | None:
    """Frame settings and `num_frames` (default 32, what LLaVA-NeXT-Video-7B was tuned with) from a
    video_preprocessor_config.json (transformers 5); None without one: frames take the image settings."""
    if not preproc.is_file():
        return None
    frame = _image_config(preproc, vision, "crop", [], force_mode=True)
    return VideoConfig(num_frames=int(load_json(preproc).get("num_frames") or 32), frame=frame)


def resolve_vision_tower(name: str | None, explicit: str | Path | None = None) -> Path | None:
    """A local directory holding the CLIP tower named by `mm_vision_tower`: the explicit argument, then a
    local path of that name, then the Hugging Face cache (never the network). None when not found."""
    if explicit is not None:
        d = Path(explicit)
        if not (d / "config.json").is_file():
            raise ConfigError(f"vision tower directory {d} has no config.json; point vision_tower= "
                              "(--vision-tower) at a CLIP checkpoint directory")
        return d
    if not name:
        return None
    if (Path(name) / "config.json").is_file():
        return Path(name)
    try:
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached, offline, or not a repo id: all mean "not found here"
        return None
    return cached if (cached / "config.json").is_file() else None


def vision_tower_missing_message(name: str | None) -> str:
    return (f"this original-layout LLaVA checkpoint needs the vision tower {name!r}, which is not in the "
            f"checkpoint and not in the Hugging Face cache; download it (hf download {name}) "
            "or pass its local directory as vision_tower= (CLI: --vision-tower DIR)")
