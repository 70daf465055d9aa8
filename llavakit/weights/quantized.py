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
from llavakit.quant.formats import SUFFIXES, config_from_quantization_config, packed_shapes, quantization_config
from llavakit.quant.linear import QuantLinear


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
    """Quantize a float weight (out, in) into `module`'s buffers, materialized on `device` with scales in `dtype`
    (a skeleton's are on meta); returns the names of the buffers set. A layer split by tensor parallelism
    quantizes the whole weight, then keeps its part (so scales are those of the unsplit model)."""
    if hasattr(module, "tp_split"):
        from llavakit.parallel.tp import quantized_part

        out_features, in_features = module.tp_full_shape
        whole = QuantLinear(in_features, out_features, False, module.cfg, module.tp_style, device, dtype)
        whole.set_weight(weight)
        for name in SUFFIXES:
            setattr(module, name, quantized_part(module, name, getattr(whole, name)).to(device))
        return list(SUFFIXES)
    if module.weight_packed.is_meta or module.weight_scale.dtype != dtype:
        shapes = packed_shapes(module.out_features, module.in_features, module.cfg)
        module.weight_packed = torch.empty(shapes["weight_packed"], dtype=torch.int32, device=device)
        module.weight_scale = torch.empty(shapes["weight_scale"], dtype=dtype, device=device)
        module.weight_shape = torch.empty(2, dtype=torch.int64, device=device)
    module.set_weight(weight)
    return list(SUFFIXES)


def buffer_names(model: nn.Module) -> list[str]:
    """The persistent buffers a checkpoint must supply (the packed tensors of quantized layers)."""
    return [f"{prefix}.{name}" for prefix, m in model.named_modules() if isinstance(m, QuantLinear)
            for name, _ in m.named_buffers(recurse=False)]
