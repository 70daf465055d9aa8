"""Quantize-on-load: a checkpoint's quantization settings, and float weights quantized as they are read.

A model built for loading gets empty QuantLinear layers (`quant.quantize_skeleton`); each float weight the
loader reads for one of them is quantized at once into its buffers, so the float copy of only one layer is
alive at a time. A compressed-tensors checkpoint's packed tensors fill the same buffers by name.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from llavakit.config import load_json
from llavakit.quant.config import QuantConfig
from llavakit.quant.formats import (
    config_from_quantization_config,
    packed_shapes,
    quantization_config,
    quantize_weight,
)
from llavakit.quant.linear import QuantLinear

ROWS_PER_BLOCK = 512  # a 4096-wide float32 block is 8 MiB: quantizing it costs a few times that, not a layer's worth


def checkpoint_quantization(directory: Path) -> QuantConfig | None:
    """The quantization a checkpoint's config.json declares (compressed-tensors), None for a float checkpoint."""
    path = Path(directory) / "config.json"
    block = load_json(path).get("quantization_config") if path.is_file() else None
    return None if block is None else config_from_quantization_config(block)


def choose_quantization(asked: QuantConfig | None, found: QuantConfig | None) -> QuantConfig | None:
    """The checkpoint's own quantization wins; asking for another one is an error (it cannot be re-quantized)."""
    if found is None or asked is None or asked == found:
        return found or asked
    raise ValueError(f"this checkpoint is already quantized ({_describe(found)}) and cannot be loaded as "
                     f"{_describe(asked)}; drop quantization= (CLI: --quantization) or start from its float version")


def _describe(cfg: QuantConfig) -> str:
    group = f"group size {cfg.group_size}" if cfg.group_size else "per channel"
    return f"{cfg.method}, {group}{', LM head included' if cfg.lm_head else ''}"


def model_quantization(model: nn.Module) -> QuantConfig | None:
    """The QuantConfig of a model's quantized layers, None when it has none."""
    return next((m.cfg for m in model.modules() if isinstance(m, QuantLinear)), None)


def quantization_fields(model: nn.Module) -> dict:
    """config.json's "quantization_config" entry for a quantized model (compressed-tensors), else nothing."""
    cfg = model_quantization(model)
    return {} if cfg is None else {"quantization_config": quantization_config(cfg)}


def quantized_owner(model: nn.Module, target: str) -> QuantLinear | None:
    """The QuantLinear whose float `weight` `target` names (a checkpoint tensor to quantize), else None."""
    owner, _, attr = target.rpartition(".")
    if attr != "weight" or not owner:
        return None
    try:
        module = model.get_submodule(owner)
    except AttributeError:  # a tensor of a layer this model does not have: the caller reports it
        return None
    return module if isinstance(module, QuantLinear) else None


@torch.no_grad()
def fill_quantized(module: QuantLinear, weight: torch.Tensor, dtype: torch.dtype, device: torch.device) -> list[str]:
    """Quantize a float weight (out, in) into `module`'s buffers (materialized on `device`; scales in `dtype`);
    returns the names of the buffers set. Rows are quantized independently, so a block of rows at a time
    gives the same tensors while the float temporaries stay a fraction of one layer."""
    expected = (module.out_features, module.in_features)
    if tuple(weight.shape) != expected:
        raise ValueError(f"expected shape {expected}, checkpoint has {tuple(weight.shape)}")
    shapes = packed_shapes(*expected, module.cfg)
    if module.weight_packed.is_meta or module.weight_scale.dtype != dtype:
        module.weight_packed = torch.empty(shapes["weight_packed"], dtype=torch.int32, device=device)
        module.weight_scale = torch.empty(shapes["weight_scale"], dtype=dtype, device=device)
        module.weight_shape = torch.empty(2, dtype=torch.int64, device=device)
    module.weight_shape.copy_(torch.tensor(expected))
    for start in range(0, expected[0], ROWS_PER_BLOCK):
        rows = slice(start, start + ROWS_PER_BLOCK)
        packed = quantize_weight(weight[rows].to(device=device, dtype=dtype), module.cfg)
        module.weight_packed[rows] = packed["weight_packed"]
        module.weight_scale[rows] = packed["weight_scale"]
    return ["weight_packed", "weight_scale", "weight_shape"]


def buffer_names(model: nn.Module) -> list[str]:
    """The persistent buffers a checkpoint must supply (the packed tensors of quantized layers)."""
    return [f"{prefix}.{name}" for prefix, m in model.named_modules() if isinstance(m, QuantLinear)
            for name, _ in m.named_buffers(recurse=False)]
