"""Activation functions by their config names."""

import torch
import torch.nn.functional as F
from torch import nn

from llavakit.layers import cpu_ops, triton_ops


class QuickGELU(nn.Module):
    """CLIP's x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_ops.use_fused(x) and (out := cpu_ops.quick_gelu(x)) is not None:  # one pass instead of three
            return out
        return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "quick_gelu": QuickGELU,
    "gelu": nn.GELU,
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "relu": nn.ReLU,
}


def get_activation(name: str) -> nn.Module:
    """The activation module a config's `hidden_act` names."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU: silu(gate) * up."""
    if gate.dtype == up.dtype and triton_ops.use_fused(gate):
        return triton_ops.silu_and_mul(gate, up)
    if cpu_ops.use_fused(gate, up) and (out := cpu_ops.silu_and_mul(gate, up)) is not None:  # one pass, no temporary
        return out
    return F.silu(gate) * up
