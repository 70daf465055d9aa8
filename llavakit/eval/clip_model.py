"""The CLIP judge's network: open_clip's ViT image tower and text transformer, written here in plain PyTorch.

Why not `import open_clip`: open_clip imports torchvision, and the only torchvision wheel on PyPI for
torch 2.13 (0.28.0) is a CUDA build whose C extension needs libtorch_cuda.so, so beside the CPU torch
build it fails at import ("operator torchvision::nms does not exist"). The judge needs none of
torchvision, so the two towers are re-typed here with open_clip's parameter names, and a checkpoint
saved by open_clip loads into them unchanged (see clip_judge.py for the name map).

Scope: open_clip's built-in `VisionTransformer` + `TextTransformer` (OpenAI CLIP, LAION, DataComp, DFN,
MetaCLIP ViT-B/L/H/g/bigG checkpoints). Not covered: ResNet, timm or Hugging Face towers, CoCa, and
the custom attention blocks; `ClipConfig.from_open_clip` names what it refuses.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(slots=True)
class VisionTowerConfig:
    """open_clip's `CLIPVisionCfg`, the fields a ViT tower uses at inference."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    head_width: int = 64
    mlp_ratio: float = 4.0
    ls_init_value: float | None = None
    no_ln_pre: bool = False
    pool_type: str = "tok"
    final_ln_after_pool: bool = False

    def __post_init__(self):
        if self.pool_type not in ("tok", "avg"):
            raise ValueError(f"vision pool_type {self.pool_type!r} is not supported; expected 'tok' or 'avg'")
        if self.image_size % self.patch_size or self.width % self.head_width:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size} "
                             f"and width {self.width} a multiple of head_width {self.head_width}")

    @property
    def heads(self) -> int:
        return self.width // self.head_width


@dataclass(slots=True)
class TextTowerConfig:
    """open_clip's `CLIPTextCfg` for its own causal text transformer pooled at the end-of-text token."""

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    ls_init_value: float | None = None

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} must be a multiple of heads {self.heads}")


# Keys of open_clip's configs that only matter for training or change nothing at inference.
_IGNORED = {"patch_dropout", "output_tokens", "timm_model_pretrained", "custom_text", "init_logit_scale",
            "init_logit_bias", "nonscalar_logit_scale", "cast_dtype", "pos_embed_type", "eos_id"}
# Keys whose default open_clip value is the only one these towers implement.
_DEFAULTS_ONLY = {"pool_type": "argmax", "proj_bias": False, "proj_type": "linear", "embed_cls": False,
                  "no_causal_mask": False, "final_ln_after_pool": False, "attentional_pool": False,
                  "block_type": None, "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
                  "scale_attn_inner": False, "scale_attn": False, "scale_fc": False, "act_kwargs": None,
                  "norm_kwargs": None, "pad_id": 0, "hf_tokenizer_name": None, "tokenizer_kwargs": None,
                  "timm_model_name": None, "hf_model_name": None}


def _tower_kwargs(cfg: dict, allowed: tuple[str, ...], tower: str) -> dict:
    """The keys of one tower's open_clip config that our dataclass takes; a clear error for the others."""
    out = {}
    for key, value in cfg.items():
        if key in allowed:
            out[key] = value
        elif key in _DEFAULTS_ONLY and value == _DEFAULTS_ONLY[key]:
            continue
        elif key not in _IGNORED:
            raise ValueError(f"open_clip {tower} setting {key}={value!r} is not supported by llavakit's CLIP judge "
                             "(it runs open_clip's standard ViT CLIP: OpenAI, LAION, DataComp, DFN, MetaCLIP)")
    return out


@dataclass(slots=True)
class ClipConfig:
    """A CLIP model: both towers, the shared embedding size and the activation (QuickGELU for OpenAI's)."""

    embed_dim: int = 512
    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    quick_gelu: bool = False

    @classmethod
    def from_open_clip(cls, model_cfg: dict) -> ClipConfig:
        """From open_clip's model config (a model_configs/*.json, or open_clip_config.json's "model_cfg")."""
        model_cfg = dict(model_cfg)
        vision_cfg, text_cfg = model_cfg.pop("vision_cfg", {}), model_cfg.pop("text_cfg", {})
        if isinstance(vision_cfg.get("layers"), (list, tuple)):
            raise ValueError("open_clip ResNet image towers (RN50, ...) are not supported; use a ViT model")  # noqa: TRY004
        vision = _tower_kwargs(vision_cfg, VisionTowerConfig.__slots__, "vision_cfg")
        text = _tower_kwargs(text_cfg, TextTowerConfig.__slots__, "text_cfg")
        top = _tower_kwargs(model_cfg, ("embed_dim", "quick_gelu"), "model")
        if "image_size" in vision and isinstance(vision["image_size"], (list, tuple)):
            if len(set(vision["image_size"])) != 1:
                raise ValueError(f"non-square image_size {vision['image_size']} is not supported")
            vision["image_size"] = vision["image_size"][0]
        return cls(vision=VisionTowerConfig(**vision), text=TextTowerConfig(**text), **top)


def _preset(embed, image, patch, v_layers, v_width, head_width, mlp, t_width, t_heads, t_layers, quick=False):
    return {"embed_dim": embed, "quick_gelu": quick,
            "vision_cfg": {"image_size": image, "patch_size": patch, "layers": v_layers, "width": v_width,
                           "head_width": head_width, "mlp_ratio": mlp},
            "text_cfg": {"width": t_width, "heads": t_heads, "layers": t_layers}}


# open_clip's model_configs/<name>.json as (embed, image, patch, vision layers/width/head width/mlp, text
# width/heads/layers). Each also gets a "<name>-quickgelu" twin, for weights trained with QuickGELU (OpenAI, DFN,
# MetaCLIP): the activation is not stored in the weights, and the wrong one skews every score.
_BASE = {
    "ViT-B-32": (512, 224, 32, 12, 768, 64, 4.0, 512, 8, 12),
    "ViT-B-32-256": (512, 256, 32, 12, 768, 64, 4.0, 512, 8, 12),
    "ViT-B-16": (512, 224, 16, 12, 768, 64, 4.0, 512, 8, 12),
    "ViT-L-14": (768, 224, 14, 24, 1024, 64, 4.0, 768, 12, 12),
    "ViT-L-14-336": (768, 336, 14, 24, 1024, 64, 4.0, 768, 12, 12),
    "ViT-H-14": (1024, 224, 14, 32, 1280, 80, 4.0, 1024, 16, 24),
    "ViT-H-14-378": (1024, 378, 14, 32, 1280, 80, 4.0, 1024, 16, 24),
    "ViT-g-14": (1024, 224, 14, 40, 1408, 88, 4.3637, 1024, 16, 24),
    "ViT-bigG-14": (1280, 224, 14, 48, 1664, 104, 4.9231, 1280, 20, 32),
}
PRESETS = {**{name: _preset(*dims) for name, dims in _BASE.items()},
           **{f"{name}-quickgelu": _preset(*dims, quick=True) for name, dims in _BASE.items()}}


class SelfAttention(nn.Module):
    """Multi-head self-attention with `nn.MultiheadAttention`'s parameter names (what open_clip saves)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        b, t, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, T, D)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, w))


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation, x * sigmoid(1.702 x); its weights were trained with it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerScale(nn.Module):
    """A learned per-channel scale on a residual branch (open_clip's `ls_1` / `ls_2`)."""

    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ResidualBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool, layer_scale: bool):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.ls_1 = LayerScale(width) if layer_scale else nn.Identity()
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(c_fc=nn.Linear(width, hidden),
                                             gelu=QuickGELU() if quick_gelu else nn.GELU(),
                                             c_proj=nn.Linear(hidden, width)))
        self.ls_2 = LayerScale(width) if layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), causal))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """A stack of `ResidualBlock`s under open_clip's name, `transformer.resblocks.N`."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, quick_gelu: bool, layer_scale: bool):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualBlock(width, heads, mlp_ratio, quick_gelu, layer_scale)
                                       for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, causal)
        return x


class VisionTower(nn.Module):
    """ViT: patches + class token + positions -> ln_pre -> blocks -> ln_post -> pool -> proj."""

    def __init__(self, cfg: VisionTowerConfig, embed_dim: int, quick_gelu: bool):
        super().__init__()
        self.cfg = cfg
        w, grid = cfg.width, cfg.image_size // cfg.patch_size
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(w))
        self.positional_embedding = nn.Parameter(torch.empty(grid * grid + 1, w))
        self.ln_pre = nn.Identity() if cfg.no_ln_pre else nn.LayerNorm(w)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio, quick_gelu,
                                       cfg.ls_init_value is not None)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(torch.empty(w, embed_dim))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.conv1(pixels).flatten(2).transpose(1, 2)  # (B, W, g, g) -> (B, g*g, W)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)
        x = self.transformer(x)
        if self.cfg.final_ln_after_pool:
            return self.ln_post(self._pool(x)) @ self.proj
        return self._pool(self.ln_post(x)) @ self.proj

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 1:].mean(dim=1) if self.cfg.pool_type == "avg" else x[:, 0]


class TextTower(nn.Module):
    """Causal transformer over token ids, read at the end-of-text token (the largest id, as open_clip's argmax)."""

    def __init__(self, cfg: TextTowerConfig, embed_dim: int, quick_gelu: bool):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, quick_gelu,
                                       cfg.ls_init_value is not None)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        x = self.ln_final(self.transformer(x, causal=True))
        return x[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)] @ self.text_projection


class Clip(nn.Module):
    """Both towers; `encode_*` return unnormalised embeddings in the shared space, (N, embed_dim)."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision, cfg.embed_dim, cfg.quick_gelu)
        self.text = TextTower(cfg.text, cfg.embed_dim, cfg.quick_gelu)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual(pixels)

    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text(ids)
