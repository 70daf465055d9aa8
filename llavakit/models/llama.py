"""LLaMA-family decoder (LLaMA, Vicuna, Mistral, Yi): embeddings in, final hidden states out.

The LM head lives with the composite model (`compute_logits`), so the decoder can be fed embeddings
that already hold image features.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from llavakit.config import TextConfig
from llavakit.layers.activation import silu_and_mul
from llavakit.layers.attention import Attention, AttentionMetadata
from llavakit.layers.embedding import embedding
from llavakit.layers.linear import Linear, linear
from llavakit.layers.norm import RMSNorm
from llavakit.layers.rotary import RotaryEmbedding, apply_rotary


class LlamaAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        h, hk, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, hk, d
        self.q_proj = linear(cfg.hidden_size, h * d, bias=cfg.attention_bias, tp_style="column")
        self.k_proj = linear(cfg.hidden_size, hk * d, bias=cfg.attention_bias, tp_style="column")
        self.v_proj = linear(cfg.hidden_size, hk * d, bias=cfg.attention_bias, tp_style="column")
        self.o_proj = linear(h * d, cfg.hidden_size, bias=cfg.attention_bias, tp_style="row")
        self.attn = Attention(h, hk, d, cfg.sliding_window)
        self.qkv_weight: torch.Tensor | FusedProduct | None = None  # set by fuse_projections

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None, meta: AttentionMetadata) -> torch.Tensor:
        b, t, _ = x.shape
        if self.qkv_weight is not None and not torch.is_grad_enabled():  # one product for the three
            hd, kd = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = _fused_product(x, self.qkv_weight).split([hd, kd, kd], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, t, self.num_heads, self.head_dim)  # (B, T, H, D)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        v = v.view(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(self.attn(q, k, v, cache, meta))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"LLaMA MLP supports hidden_act 'silu', got {cfg.hidden_act!r}")
        self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias, tp_style="column")
        self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias, tp_style="column")
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias, tp_style="row")
        self.gate_up_weight: torch.Tensor | FusedProduct | None = None  # set by fuse_projections

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None and not torch.is_grad_enabled():
            gate, up = _fused_product(x, self.gate_up_weight).chunk(2, dim=-1)
            return self.down_proj(silu_and_mul(gate, up))
        return self.down_proj(silu_and_mul(self.gate_proj(x), self.up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, cache, meta):
        x, h = self.post_attention_layernorm.add_and_norm(x, self.self_attn(self.input_layernorm(x), cos, sin, cache,
                                                                            meta))
        return x + self.mlp(h)


def fuse_projections(model: "LlamaModel") -> int:
    """For inference: store each layer's q/k/v weights, and its gate/up weights, as one tensor, so each
    group runs as one matrix product (one weight read, one launch). The Linear modules keep their weights
    as views into the fused tensor, so memory, names and state_dict stay as they were. Plain, bias-free
    Linear layers of one dtype are fused here; a group of another layer type is fused by that type's
    `fuse(layers)` when it has one (quantized layers do: they return a FusedProduct, or None when they
    cannot), else left alone (LoRA-wrapped ones). Returns the number of groups fused."""
    fused = 0
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        groups = [(attn, "qkv_weight", [attn.q_proj, attn.k_proj, attn.v_proj]),
                  (mlp, "gate_up_weight", [mlp.gate_proj, mlp.up_proj])]
        for owner, attr, linears in groups:
            if getattr(owner, attr) is not None:  # fused by an earlier engine on this model
                continue
            kinds = {type(m) for m in linears}
            kind = kinds.pop() if len(kinds) == 1 else None
            product = None
            if kind is Linear and all(m.bias is None for m in linears) and \
                    len({m.weight.dtype for m in linears}) == 1:
                product = _fuse(linears)
            elif kind is not None and hasattr(kind, "fuse"):
                product = kind.fuse(linears)
            if product is not None:
                setattr(owner, attr, product)
                fused += 1
    return fused


def unfuse_projections(model: "LlamaModel") -> None:
    """Drop the fused q/k/v and gate/up products, e.g. before a transform replaces the Linear layers (the
    layers keep their weights; a later `fuse_projections` fuses the new ones)."""
    for layer in model.layers:
        layer.self_attn.qkv_weight = None
        layer.mlp.gate_up_weight = None


def _fused_product(x: torch.Tensor, fused: "torch.Tensor | FusedProduct") -> torch.Tensor:
    return F.linear(x, fused) if isinstance(fused, torch.Tensor) else fused(x)


class FusedProduct(Protocol):
    """A fused group's matrix product for layer types that do not store a plain weight (quantized ones)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@torch.no_grad()
def _fuse(linears: list[Linear]) -> torch.Tensor:
    weight = torch.cat([m.weight for m in linears])
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(weight[start:start + n], requires_grad=m.weight.requires_grad)
        start += n
    return weight


class LlamaModel(nn.Module):
    """Token embeddings, decoder layers and the final norm."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope)
        self.checkpoint_layers = False  # gradient checkpointing, switched on by the trainer

    @property
    def num_kv_heads(self) -> int:
        """KV heads per layer held in this process: all of them, or this rank's share under tensor parallelism."""
        return self.layers[0].self_attn.num_kv_heads

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        """embeds (B, T, D), positions (B, T); kv_cache indexable by layer (or None) -> (B, T, D)."""
        cos, sin = self.rotary_emb(positions, embeds.dtype)
        x = embeds
        for i, layer in enumerate(self.layers):
            cache = None if kv_cache is None else kv_cache[i]
            if self.checkpoint_layers and self.training:  # recompute activations in backward
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, cache, meta, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, meta)
        return self.norm(x)
