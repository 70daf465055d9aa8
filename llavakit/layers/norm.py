"""Normalization layers."""

import torch
from torch import nn

from llavakit.layers import triton_ops


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: the statistics in float32, the scale applied in the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype and triton_ops.use_fused(x):  # one kernel instead of eight
            return triton_ops.rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
