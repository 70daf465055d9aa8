"""Configs for every LLaVA checkpoint layout: vision tower, text decoder, their composition and
image preprocessing, read from a checkpoint directory (llava-hf, transformers-5 or the original LLaVA
layout) or built from a named preset.

Hub config files are sparse: a `text_config` may give little more than its `model_type`, relying on
that type's defaults. The defaults below are those of transformers for each `model_type`.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Placeholder id the original LLaVA code puts where an image goes (IMAGE_TOKEN_INDEX).
ORIGINAL_IMAGE_TOKEN_ID = -200
IGNORE_INDEX = -100

TEXT_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=2048, vocab_size=32000),
    "mistral": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8, rope_theta=10000.0, rms_norm_eps=1e-6,
                    max_position_embeddings=4096 * 32, sliding_window=4096, vocab_size=32000),
}
TEXT_DEFAULTS["yi"] = TEXT_DEFAULTS["llama"]

VISION_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip_vision_model": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, image_size=224, patch_size=32,
                              hidden_act="quick_gelu", layer_norm_eps=1e-5),
}

# Vision towers the original checkpoints name in `mm_vision_tower`, for when only their weights are
# at hand (LLaVA-1.6 ships a fine-tuned tower but not its config).
KNOWN_VISION_TOWERS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-large-patch14-336": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                              num_attention_heads=16, image_size=336, patch_size=14),
    "openai/clip-vit-large-patch14": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                          num_attention_heads=16, image_size=224, patch_size=14),
}

ORIGINAL_ARCHITECTURES = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}
LLAVA_MODEL_TYPES = ("llava", "llava_next", "llava_next_video")


class ConfigError(ValueError):
    """A checkpoint's config.json cannot be understood; the message says what and what to do."""


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@dataclass(slots=True)
class VisionConfig:
    """CLIP ViT vision tower hyper-parameters."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    num_channels: int = 3

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision hidden_size {self.hidden_size} is not divisible by "
                              f"num_attention_heads {self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")

    @property
    def grid_size(self) -> int:
        """Patches per side (24 for ViT-L/14 at 336)."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid_size ** 2 + 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        if d.get("model_type") == "clip":  # a whole CLIPConfig: take its vision half
            d = d.get("vision_config", {})
        mt = d.get("model_type", "clip_vision_model")
        if mt not in VISION_DEFAULTS:
            raise ConfigError(f"unsupported vision model_type {mt!r}; llavakit supports {sorted(VISION_DEFAULTS)}")
        merged = {**VISION_DEFAULTS[mt], **{k: v for k, v in d.items() if k in _fields(cls)}}
        return cls(**merged)


@dataclass(slots=True)
class RopeConfig:
    """Rotary embedding settings; `kind` is default, linear or dynamic (NTK)."""

    theta: float = 10000.0
    kind: str = "default"
    factor: float = 1.0
    original_max_position: int = 2048

    def __post_init__(self):
        if self.kind not in ("default", "linear", "dynamic"):
            raise ConfigError(f"rope type {self.kind!r} is not supported; use default, linear or dynamic")
        if self.factor <= 0:
            raise ConfigError(f"rope scaling factor must be positive, got {self.factor}")


@dataclass(slots=True)
class TextConfig:
    """LLaMA-family decoder hyper-parameters (LLaMA, Vicuna, Mistral, Yi)."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads {self.num_key_value_heads}")

    @property
    def context_length(self) -> int:
        """Longest sequence the model serves: linear and dynamic scaling stretch the trained length by their
        factor (LLaVA-NeXT-Video-7B: 4096 trained positions, linear factor 2, 8192-token prompts)."""
        if self.rope.kind in ("linear", "dynamic"):
            return int(self.max_position_embeddings * self.rope.factor)
        return self.max_position_embeddings

    @property
    def eos_token_ids(self) -> list[int]:
        e = self.eos_token_id
        return [] if e is None else [e] if isinstance(e, int) else list(e)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TextConfig":
        mt = d.get("model_type", "llama")
        if mt not in TEXT_DEFAULTS:
            raise ConfigError(f"unsupported text model_type {mt!r}; llavakit supports {sorted(TEXT_DEFAULTS)}")
        merged = {**TEXT_DEFAULTS[mt], **d, "model_type": mt}
        rope = _parse_rope(merged)
        kwargs = {k: v for k, v in merged.items() if k in _fields(cls) and k != "rope"}
        kwargs.pop("rope_theta", None)
        if mt == "mistral" and "sliding_window" in d and d["sliding_window"] is None:
            kwargs["sliding_window"] = None
        return cls(rope=rope, **kwargs)


def _parse_rope(d: dict[str, Any]) -> RopeConfig:
    """rope_theta + rope_scaling (old files) or rope_parameters (new files)."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or {}
    theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    src = params if params.get("rope_type", "default") != "default" or not scaling else scaling
    kind = src.get("rope_type", src.get("type", "default"))
    factor = float(src.get("factor", 1.0))
    orig = src.get("original_max_position_embeddings", d.get("max_position_embeddings", 2048))
    return RopeConfig(theta=float(theta), kind=kind, factor=factor, original_max_position=int(orig))


@dataclass(slots=True)
class ImageConfig:
    """How an image becomes pixel values: `mode` is pad (LLaVA-1.5 expand2square), anyres (NeXT tiling)
    or crop (plain CLIP resize + center crop). `pinpoints` are (height, width) resolutions."""

    mode: str = "pad"
    size: int = 336
    crop_size: int = 336
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    pinpoints: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self):
        if self.mode not in ("pad", "anyres", "crop"):
            raise ConfigError(f"image mode {self.mode!r} is not one of pad, anyres, crop")
        if self.mode == "anyres" and not self.pinpoints:
            raise ConfigError("anyres image processing needs image_grid_pinpoints")

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """expand2square fill: the mean as 0-255 ints, (122, 116, 104) for CLIP."""
        return tuple(int(x * 255) for x in self.mean)


@dataclass(slots=True)
class VideoConfig:
    """How a video becomes pixel values: `num_frames` sampled uniformly over the whole video, each frame
    through the plain CLIP steps of `frame` (resize the short side, center crop: a square input, never padded
    or tiled)."""

    num_frames: int = 32
    frame: ImageConfig = field(default_factory=lambda: ImageConfig(mode="crop"))

    def __post_init__(self):
        if self.num_frames < 1:
            raise ConfigError(f"a video needs at least one frame, got num_frames {self.num_frames} "
                              "(CLI: --video-frames)")
        if self.frame.mode != "crop":
            raise ConfigError(f"video frames are square CLIP inputs (mode 'crop'), got mode {self.frame.mode!r}")


@dataclass(slots=True)
class LlavaConfig:
    """A whole LLaVA model: vision tower, projector, decoder and how they are joined."""

    vision: VisionConfig
    text: TextConfig
    image: ImageConfig
    model_type: str = "llava"
    layout: str = "llava-hf"
    image_token_id: int = 32000
    video_token_id: int | None = None
    vision_feature_layer: int | list[int] = -2
    vision_feature_select: str = "default"
    projector_type: str = "mlp2x_gelu"
    projector_bias: bool = True
    patch_merge_type: str = "flat"
    use_im_start_end: bool = False
    vision_tower_name: str | None = None
    vision_tower_dir: str | None = None
    spatial_pool_mode: str = "average"
    spatial_pool_stride: int = 2
    video: VideoConfig | None = None  # None: frames take the image settings (size, crop, normalization)
    name_or_path: str | None = None

    def __post_init__(self):
        if self.model_type not in LLAVA_MODEL_TYPES:
            raise ConfigError(f"unsupported model_type {self.model_type!r}; expected one of {LLAVA_MODEL_TYPES}")
        if self.vision_feature_select not in ("default", "full"):
            raise ConfigError("vision_feature_select_strategy must be default or full, "
                              f"got {self.vision_feature_select!r}")
        if not (self.projector_type == "linear" or re.fullmatch(r"mlp\d+x_gelu", self.projector_type)):
            raise ConfigError(f"mm_projector_type {self.projector_type!r} is not supported (linear, mlpNx_gelu)")
        if self.patch_merge_type not in ("flat", "spatial", "spatial_unpad"):
            raise ConfigError(f"mm_patch_merge_type {self.patch_merge_type!r} is not flat, spatial or spatial_unpad")
        if self.image.mode == "anyres" and self.patch_merge_type != "flat" and self.vision_feature_select != "default":
            raise ConfigError("AnyRes spatial merging needs vision_feature_select_strategy 'default'")
        if not all(0 <= layer <= self.vision.num_hidden_layers for layer in self.feature_layers):
            raise ConfigError(f"vision_feature_layer {self.vision_feature_layer} is outside the "
                              f"{self.vision.num_hidden_layers}-layer vision tower")
        if self.video is None:  # frames: the image's sizes and normalization, as a plain square CLIP input
            self.video = VideoConfig(frame=dataclasses.replace(self.image, mode="crop", pinpoints=[]))
        if self.model_type == "llava_next_video":
            self._check_video()

    def _check_video(self) -> None:
        if self.video_token_id is None:
            raise ConfigError("a llava_next_video config needs video_token_index (32000 in llava-hf checkpoints)")
        if self.video_token_id == self.image_token_id:
            raise ConfigError(f"video_token_index and image_token_index are both {self.image_token_id}; "
                              "they must be different tokens")
        if self.spatial_pool_mode not in ("average", "max"):
            raise ConfigError(f"spatial_pool_mode {self.spatial_pool_mode!r} is not supported; llavakit pools "
                              "video frames with 'average' or 'max' (no published checkpoint uses 'conv')")
        if not 1 <= self.spatial_pool_stride <= self.vision.grid_size:
            raise ConfigError(f"spatial_pool_stride {self.spatial_pool_stride} must be between 1 and the "
                              f"{self.vision.grid_size}-patch grid side")
        if self.vision_feature_select != "default":
            raise ConfigError("llava_next_video pools each frame's patch grid, which needs "
                              "vision_feature_select_strategy 'default' (the CLS token has no place in the grid)")

    @property
    def feature_layers(self) -> list[int]:
        """Feature layers as hidden-state indices >= 0 (0 = embeddings, k = output of layer k)."""
        layer = self.vision_feature_layer
        layers = layer if isinstance(layer, list) else [layer]
        n = self.vision.num_hidden_layers
        return [k if k >= 0 else n + 1 + k for k in layers]

    @property
    def mm_hidden_size(self) -> int:
        """Channels entering the projector (several feature layers are concatenated)."""
        return self.vision.hidden_size * len(self.feature_layers)

    @property
    def projector_depth(self) -> int:
        return 1 if self.projector_type == "linear" else int(self.projector_type[3:-6])

    @property
    def tokens_per_tile(self) -> int:
        return self.vision.grid_size ** 2 + (self.vision_feature_select == "full")

    @property
    def supports_video(self) -> bool:
        """Whether prompts may carry videos (LLaVA-NeXT-Video checkpoints)."""
        return self.model_type == "llava_next_video"

    @property
    def tokens_per_frame(self) -> int:
        """Features one video frame gives: the patch grid pooled with the stride (144 at 336 / ViT-L/14)."""
        side = self.vision.grid_size // self.spatial_pool_stride
        return side * side


# image_aspect_ratio (the original LLaVA config key) -> ImageConfig.mode; "square" is the original code's name for
# a plain CLIP resize + center crop, kept because training configs copied from LLaVA use it.
ASPECT_RATIO_MODES = {"pad": "pad", "crop": "crop", "square": "crop", "anyres": "anyres"}
IMAGE_ASPECT_RATIOS = ("pad", "crop", "anyres")
ASPECT_RATIO_HELP = ("pad: what LLaVA-1.5 was trained and evaluated with (expand2square); crop: what transformers' "
                     "llava-hf processor does; anyres: LLaVA-NeXT tiling")


def image_mode(aspect: str) -> str:
    """The ImageConfig.mode an image_aspect_ratio names, or a ConfigError listing the choices."""
    if aspect not in ASPECT_RATIO_MODES:
        raise ConfigError(f"image_aspect_ratio {aspect!r} is not one of {', '.join(IMAGE_ASPECT_RATIOS)} "
                          f"(or square, the same as crop); {ASPECT_RATIO_HELP}")
    return ASPECT_RATIO_MODES[aspect]


def with_image_aspect_ratio(cfg: LlavaConfig, aspect: str | None) -> LlavaConfig:
    """`cfg` with its image processing overridden by `aspect` (pad, crop, anyres, square = crop); None keeps
    what the checkpoint's files say. Video frames are unaffected (always a plain crop).

    Why: llava-hf LLaVA-1.5 repos ship a CLIPImageProcessor (crop), though LLaVA-1.5 was trained and evaluated
    with expand2square padding; "pad" restores that. anyres needs a LLaVA-NeXT checkpoint (llava_next: trained
    tiles, image_grid_pinpoints, an image_newline) and is refused on LLaVA-1.5. pad or crop on a NeXT checkpoint
    gives one base view (padded or center-cropped) instead of the tiles, followed by the image_newline: what the
    original LLaVA-NeXT code does with image_aspect_ratio pad / square. It is consistent (the token count and the
    model's feature merge agree) and cheap (577 image tokens instead of up to 2928 for LLaVA-1.6-7B), but not how
    NeXT was trained: expect worse answers on detail."""
    if aspect is None:
        return cfg
    mode = image_mode(aspect)
    if mode == "anyres":
        _check_anyres(cfg)
    return dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, mode=mode))


def _check_anyres(cfg: LlavaConfig) -> None:
    """AnyRes tiling needs a model trained on tiles: a NeXT model type with grid pinpoints."""
    name = cfg.name_or_path or "this checkpoint"
    if cfg.model_type == "llava":
        raise ConfigError(f"image_aspect_ratio 'anyres' needs a LLaVA-NeXT checkpoint (llava_next: "
                          f"image_grid_pinpoints and an image_newline); {name} is a LLaVA-1.5 (llava) checkpoint: "
                          "use pad (what LLaVA-1.5 was trained with) or crop")
    if not cfg.image.pinpoints:
        raise ConfigError(f"image_aspect_ratio 'anyres' needs image_grid_pinpoints, which {name} does not have; "
                          "add them to its config.json or use pad or crop")


def parse_pinpoints(value: Any, tile: int) -> list[tuple[int, int]]:
    """image_grid_pinpoints as a list of [h, w] pairs or a string "(1x1),...,(3x3)" meaning grids."""
    if value is None:
        return []
    if isinstance(value, str):
        grids = [(int(a), int(b)) for a, b in re.findall(r"\((\d+)x(\d+)\)", value)]
        if not grids:
            raise ConfigError(f"image_grid_pinpoints {value!r} is not of the form '(1x1),...,(3x3)'")
        (r0, c0), (r1, c1) = grids[0], grids[-1]
        return [(i * tile, j * tile) for i in range(r0, r1 + 1) for j in range(c0, c1 + 1)]
    try:
        return [(int(h), int(w)) for h, w in value]
    except (TypeError, ValueError):
        raise ConfigError(f"image_grid_pinpoints {value!r} is not a list of [height, width] pairs") from None


def load_json(path: Path) -> dict[str, Any]:
    """Read a JSON file with an error that names the file."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); re-download or fix the file") from None


@dataclass(slots=True)
class EngineConfig:
    """Continuous-batching engine limits. `num_kv_blocks` None: sized from `kv_cache_memory` (bytes), on
    CUDA from gpu_memory_utilization of the free memory, elsewhere (CPU) to what max_num_seqs sequences of
    max_model_len tokens need (ceil(max_model_len / block_size) blocks each), at most 4 GiB."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None  # None: the model's context length
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory: int | None = None
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    vision_cache_images: int = 256  # encoded images kept by content hash
    # "auto": the Triton paged-decode kernel on CUDA when triton imports, else the PyTorch path ("torch").
    attention_backend: str = "auto"
    # Capture decode steps in CUDA graphs, one per batch-size bucket up to max_num_seqs (CUDA with the
    # triton backend only; vLLM's --enforce-eager is cuda_graphs=False).
    cuda_graphs: bool = True

    def __post_init__(self):
        if self.block_size < 1 or self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ConfigError("block_size, max_num_seqs and max_num_batched_tokens must be positive")
        if self.attention_backend not in ("auto", "torch", "cpu", "triton", "flex"):
            raise ConfigError(f"attention_backend must be auto, torch, cpu, triton or flex, got "
                              f"{self.attention_backend!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
