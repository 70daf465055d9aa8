"""Causal self-attention over a KV cache that the caller owns.

The model never allocates or keeps a cache: each forward call receives the per-layer cache tensors and
metadata saying where the new tokens go. The simple generation path uses a contiguous cache (`KVCache`)
with `AttentionMetadata`; the engine passes its paged cache with `PagedAttentionMetadata` through the same
call, and `Attention.forward` dispatches on the metadata's type, then on its backend (`paged_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from llavakit.layers.cpu_attention import cpu_attention
from llavakit.layers.cpu_attention import write_kv as cpu_write_kv
from llavakit.layers.paged_attention import (
    KVPages,
    PagedAttentionMetadata,
    flex_attention_paged,
    torch_attention,
    write_kv,
)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVPages,
                    meta: PagedAttentionMetadata, sliding_window: int | None) -> torch.Tensor:
    """q (1, N, H, D), k/v (1, N, H_kv, D): write the new k/v, attend -> (1, N, H * D)."""
    if q.shape[0] != 1:
        raise ValueError(f"paged attention takes the flattened batch as one row, got batch {q.shape[0]}")
    backend = BACKENDS.get(meta.backend)
    if backend is None:
        raise ValueError(f"unknown paged attention backend {meta.backend!r}; choose one of {sorted(BACKENDS)}")
    _, n, h, d = q.shape
    if not (meta.backend == "cpu" and cpu_write_kv(cache, k[0], v[0], meta.slot_mapping)):
        write_kv(cache, k[0], v[0], meta.slot_mapping, meta.may_skip_slots)
    out = backend(q[0], cache, meta, sliding_window)  # (N, H, D)
    return out.reshape(1, n, h * d)


def _triton(q: torch.Tensor, cache: KVPages, meta: PagedAttentionMetadata, window: int | None) -> torch.Tensor:
    from llavakit.layers.triton_attention import triton_attention  # lazy: imports triton

    return triton_attention(q, cache, meta, window)


BACKENDS = {"torch": torch_attention, "cpu": cpu_attention, "flex": flex_attention_paged, "triton": _triton}


@dataclass(slots=True)
class AttentionMetadata:
    """Where this call's tokens sit: every row already has `start_pos` tokens in the cache."""

    start_pos: int = 0


class KVCache:
    """Contiguous key/value tensors, one pair per layer, each (B, H_kv, max_len, D)."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.layers = [(torch.empty(shape, dtype=dtype, device=device), torch.empty(shape, dtype=dtype, device=device))
                       for _ in range(num_layers)]
        self.max_len = max_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.layers[i]


def causal_mask(q_len: int, k_len: int, start: int, window: int | None, device) -> torch.Tensor | None:
    """Boolean (q_len, k_len) mask, True where a query may attend; None when plain causal suffices."""
    if window is None and q_len == 1:
        return None
    q_pos = torch.arange(start, start + q_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def _expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, H_kv, S, D) -> (B, H_kv * groups, S, D) for grouped-query attention."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


class Attention(nn.Module):
    """Scaled dot-product attention with GQA, an optional sliding window and a caller-owned cache."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None = None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor] | None,
                meta: AttentionMetadata | PagedAttentionMetadata) -> torch.Tensor:
        """q (B, T, H, D), k/v (B, T, H_kv, D) -> (B, T, H * D).

        With `PagedAttentionMetadata`, B is 1 and T the flattened new tokens of every sequence; the cache is
        then the layer's (k_cache, v_cache) pages, each (num_blocks, block_size, H_kv, D).
        """
        if isinstance(meta, PagedAttentionMetadata):
            if cache is None:
                raise ValueError("paged attention needs the layer's (k_cache, v_cache) pages, got None")
            return paged_attention(q, k, v, cache, meta, self.sliding_window)
        b, t = q.shape[:2]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        start = meta.start_pos
        if cache is not None:
            k_cache, v_cache = cache
            if start + t > k_cache.shape[2]:
                raise ValueError(f"KV cache holds {k_cache.shape[2]} positions, {start + t} needed")
            k_cache[:, :, start:start + t] = k
            v_cache[:, :, start:start + t] = v
            k, v = k_cache[:, :, :start + t], v_cache[:, :, :start + t]
        groups = self.num_heads // self.num_kv_heads
        k, v = _expand_kv(k, groups), _expand_kv(v, groups)
        if start == 0 and self.sliding_window is None and t > 1:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = causal_mask(t, k.shape[2], start, self.sliding_window, q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)
