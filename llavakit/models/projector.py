"""The multimodal projector: `linear` (LLaVA v0, LLaVAR) or `mlpNx_gelu` (LLaVA-1.5 and later).

Built as a Sequential so that its parameter names (0, 2, 4, ...) are the original LLaVA's.
"""

from torch import nn

from llavakit.layers.linear import linear


class Projector(nn.Sequential):
    """Linear(vision, text) followed by (depth - 1) x [exact GELU, Linear(text, text)]."""

    def __init__(self, in_features: int, out_features: int, depth: int, bias: bool = True):
        layers: list[nn.Module] = [linear(in_features, out_features, bias=bias)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), linear(out_features, out_features, bias=bias)]
        super().__init__(*layers)
