"""Rotary position embeddings with default, linear and dynamic-NTK scaling."""

from __future__ import annotations

import torch
from torch import nn

from llavakit.config import RopeConfig
from llavakit.layers import cpu_ops, triton_ops


def inv_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))


class RotaryEmbedding(nn.Module):
    """Computes (cos, sin) for given positions; `apply_rotary` rotates q and k with them."""

    def __init__(self, head_dim: int, rope: RopeConfig):
        super().__init__()
        self.head_dim = head_dim
        self.rope = rope
        # Computed on the CPU and moved: arithmetic on meta tensors would import torch._dynamo (~0.7 s).
        inv = inv_frequencies(head_dim, rope.theta, "cpu").to(torch.get_default_device())
        self.register_buffer("inv_freq", inv, persistent=False)

    def reset_buffers(self, device: torch.device) -> None:
        """Recompute the frequencies on `device` (after the module was built on the meta device)."""
        self.inv_freq = inv_frequencies(self.head_dim, self.rope.theta, device)

    def _frequencies(self, seq_len: int) -> torch.Tensor:
        rope = self.rope
        if rope.kind == "dynamic" and seq_len > rope.original_max_position:
            # NTK-aware: grow the base with the current length, as transformers does per forward call.
            ratio = rope.factor * seq_len / rope.original_max_position - (rope.factor - 1)
            theta = rope.theta * ratio ** (self.head_dim / (self.head_dim - 2))
            return inv_frequencies(self.head_dim, theta, self.inv_freq.device)
        if rope.kind == "linear":
            return self.inv_freq / rope.factor
        return self.inv_freq

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin (B, T, head_dim) in `dtype` (computed in float32)."""
        seq_len = int(positions.max()) + 1 if self.rope.kind == "dynamic" else 0
        inv = self._frequencies(seq_len)
        freqs = positions.float()[..., None] * inv  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D); cos/sin (B, T, D)."""
    if x.dtype == cos.dtype and triton_ops.use_fused(x):  # one kernel instead of ten
        return triton_ops.rotary(x, cos, sin)
    if cpu_ops.use_fused(x, cos, sin) and (out := cpu_ops.rotary(x, cos, sin)) is not None:  # one pass
        return out
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + _rotate_half(x) * sin
