"""QuantLinear: a Linear whose weight is stored packed in the compressed-tensors format.

Its buffers carry the compressed-tensors names (`<module>.weight_packed`, `.weight_scale`, `.weight_shape`), so a
state_dict is a compressed-tensors checkpoint and a checkpoint loads into it by name. Once a GPU kernel has repacked
the weight for itself (kernels.cuda_prepared), `weight_packed` is kept on the host, the same bytes: the GPU holds one
copy of the integer weight, and readers of the stored tensors (state_dict, TP splitting, set_weight) read the host's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from llavakit.layers.linear import TP_STYLES, Linear
from llavakit.quant.config import QuantConfig
from llavakit.quant.formats import SUFFIXES, dequantize_ints, packed_shapes, quantize_weight
from llavakit.quant.kernels import cached, quant_linear, weight_ints

ROWS_PER_BLOCK = 512  # a 4096-wide float32 block is 8 MiB: quantizing it costs a few times that, not a layer's worth


class QuantLinear(nn.Module):
    """Weight-only quantized Linear; forward takes and returns x's float dtype."""

    def __init__(self, in_features: int, out_features: int, bias: bool, cfg: QuantConfig, tp_style: str,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        assert tp_style in TP_STYLES, tp_style
        super().__init__()
        self.in_features, self.out_features, self.cfg, self.tp_style = in_features, out_features, cfg, tp_style
        if in_features % (cfg.group_size or 8):
            raise ValueError(f"a {cfg.method} layer needs input features divisible by {cfg.group_size or 8}, got "
                             f"{in_features}; choose a group size that divides {in_features} or keep it in float")
        shapes = packed_shapes(out_features, in_features, cfg)
        self.register_buffer("weight_packed", torch.empty(shapes["weight_packed"], dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.empty(shapes["weight_scale"], dtype=dtype, device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.repacked: dict = {}  # the weight repacked for a GPU kernel on first use (kernels.cuda_prepared)

    def _apply(self, fn, recurse: bool = True):
        self.repacked.clear()  # a move or cast leaves it stale; the stored weight (host or device) is what moves
        return super()._apply(fn, recurse)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: Linear | nn.Linear, cfg: QuantConfig) -> QuantLinear:
        """Quantize a float Linear (scales keep its dtype)."""
        w = linear.weight
        q = cls(linear.in_features, linear.out_features, linear.bias is not None, cfg,
                getattr(linear, "tp_style", "replicated"), w.device, w.dtype)
        q.set_weight(w.detach())
        if linear.bias is not None:
            q.bias.copy_(linear.bias)
        return q

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize a float weight (out, in) into the buffers (allocated already, on their device and scale dtype;
        `weight_packed` may be on the host, see the module docstring: the GPU kernel repacks on its next use).
        Rows are quantized independently, so a block of rows at a time gives the same tensors while the float
        temporaries stay a fraction of the layer (what keeps quantize-on-load at about one layer of float)."""
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(f"expected shape {expected}, checkpoint has {tuple(weight.shape)}")
        scale = self.weight_scale
        for start in range(0, expected[0], ROWS_PER_BLOCK):
            rows = slice(start, start + ROWS_PER_BLOCK)
            packed = quantize_weight(weight[rows].to(device=scale.device, dtype=scale.dtype), self.cfg)
            self.weight_packed[rows] = packed["weight_packed"]
            scale[rows] = packed["weight_scale"]
        self.weight_shape.copy_(torch.tensor(expected))

    def packed(self) -> dict[str, torch.Tensor]:
        """The compressed-tensors tensors, keyed by suffix."""
        return {name: getattr(self, name) for name in SUFFIXES}

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight (out, in) these buffers stand for, on the scales' device (formats.dequantize_weight's
        numbers; from the int8 kernel's copy of the values when the stored weight is on the host)."""
        p = cached(self.repacked, self.weight_packed, self.weight_scale)
        w = dequantize_ints(weight_ints(self.weight_packed, self.cfg, p, self.weight_scale.device), self.weight_scale)
        return w if dtype is None else w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.weight_packed, self.weight_scale, self.bias, self.cfg, self.repacked,
                            self._release)

    def _release(self, host: torch.Tensor) -> None:
        """Keep the stored weight's host copy instead of the GPU one (kernels.cuda_prepared)."""
        self.weight_packed = host

    @staticmethod
    @torch.no_grad()
    def fuse(layers: list[QuantLinear]) -> FusedQuantProduct | None:
        """For `fuse_projections`: concatenate the layers' packed weights and scales along the output dimension
        into one product, the layers keeping views into it (memory and state_dict unchanged; their own GPU copies
        are dropped, the product's is the one). None when the layers differ in method, input size or scale dtype,
        or have a bias."""
        first = layers[0]
        if any(m.bias is not None or m.cfg != first.cfg or m.in_features != first.in_features
               or m.weight_scale.dtype != first.weight_scale.dtype for m in layers):
            return None
        device = first.weight_scale.device  # a layer's stored weight may be on the host: the product's starts here
        packed = torch.cat([m.weight_packed.to(device) for m in layers])
        scale = torch.cat([m.weight_scale for m in layers])
        start = 0
        for m in layers:
            n = m.out_features
            m.weight_packed, m.weight_scale = packed[start:start + n], scale[start:start + n]
            m.repacked.clear()
            start += n
        return FusedQuantProduct(packed, scale, first.cfg, tuple(layers))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={self.cfg.method}, "
                f"group_size={self.cfg.group_size}, bias={self.bias is not None}, tp_style={self.tp_style}")


@dataclass(eq=False)
class FusedQuantProduct:
    """The product of several QuantLinears fused along the output dimension (see `QuantLinear.fuse`)."""

    packed: torch.Tensor
    scale: torch.Tensor
    cfg: QuantConfig
    layers: tuple[QuantLinear, ...]  # the fused layers, whose `weight_packed` are views into `packed`
    repacked: dict = field(default_factory=dict)  # as QuantLinear.repacked

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return quant_linear(x, self.packed, self.scale, None, self.cfg, self.repacked, self._release)

    def _release(self, host: torch.Tensor) -> None:
        """Keep the host copy of the fused weight instead of the GPU one, the layers' views pointing into it."""
        self.packed = host
        start = 0
        for m in self.layers:
            m.weight_packed = host[start:start + m.out_features]
            start += m.out_features
