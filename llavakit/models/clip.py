"""CLIP ViT vision tower that runs only up to the deepest feature layer LLaVA reads.

Parameter names follow transformers' CLIPVisionModel without the `vision_model.` prefix, so checkpoint
name maps stay short. `post_layernorm` and the layers past the feature layer are never built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llavakit.config import VisionConfig
from llavakit.layers.activation import get_activation
from llavakit.layers.embedding import embedding
from llavakit.layers.linear import linear


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = embedding(cfg.num_positions, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) -> (N, 1 + P, D)."""
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)  # (N, P, D)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.q_proj = linear(d, d, bias=True, tp_style="column")
        self.k_proj = linear(d, d, bias=True, tp_style="column")
        self.v_proj = linear(d, d, bias=True, tp_style="column")
        self.out_proj = linear(d, d, bias=True, tp_style="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = (p(x).view(n, t, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, Dh), no mask: every patch sees every patch
        return self.out_proj(out.transpose(1, 2).reshape(n, t, -1))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = linear(cfg.hidden_size, cfg.intermediate_size, bias=True, tp_style="column")
        self.act = get_activation(cfg.hidden_act)
        self.fc2 = linear(cfg.intermediate_size, cfg.hidden_size, bias=True, tp_style="row")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(num_layers))


class CLIPVisionTower(nn.Module):
    """Returns the hidden states LLaVA selects, concatenated on channels when there are several.

    `feature_layers` are hidden-state indices >= 0: 0 is the embedding output, k the output of layer k.
    """

    def __init__(self, cfg: VisionConfig, feature_layers: list[int]):
        super().__init__()
        self.feature_layers = list(feature_layers)
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg, max(self.feature_layers))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) -> (N, 1 + P, D * len(feature_layers)), CLS token first."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        states = {0: x}
        for i, layer in enumerate(self.encoder.layers, start=1):
            x = layer(x)
            states[i] = x
        return torch.cat([states[i] for i in self.feature_layers], dim=-1)
