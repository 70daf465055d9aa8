"""Normalization layers."""

import torch
import torch.nn.functional as F
from torch import nn

from llavakit.layers import cpu_ops, triton_ops


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: the statistics in float32, the scale applied in the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype and triton_ops.use_fused(x):  # one kernel instead of eight
            return triton_ops.rms_norm(x, self.weight, self.eps)
        if cpu_ops.use_fused(x, self.weight) and (out := cpu_ops.rms_norm(x, self.weight, self.eps)) is not None:
            return out  # one pass instead of F.rms_norm's eight ops
        shape = (x.shape[-1],)
        if x.dtype == self.weight.dtype == torch.float32:  # one op, bitwise equal to the steps below
            return F.rms_norm(x, shape, self.weight, self.eps)
        # Other dtypes round twice, as LLaMA (and transformers) do: the statistics and the normalized values in
        # float32, cast to the input's dtype, then the scale. F.rms_norm with the weight would round once.
        return self.weight * F.rms_norm(x.float(), shape, eps=self.eps).to(x.dtype)

    def add_and_norm(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + y, this norm of it): a residual add and the norm after it, in one pass where a kernel has both."""
        if cpu_ops.use_fused(x, y, self.weight) and (both := cpu_ops.add_rms_norm(x, y, self.weight, self.eps)):
            return both
        total = x + y
        return total, self(total)
