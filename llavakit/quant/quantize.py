"""`quantize(model, cfg)`: replace the language model's Linear layers with QuantLinear.

Only `model.language_model` (and `model.lm_head` when `cfg.lm_head`) changes: the vision tower, the projector and
the embeddings stay in floating point, because they are a small share of the weights and the most sensitive.
"""

from __future__ import annotations

import torch
from torch import nn

from llavakit.layers.linear import Linear
from llavakit.models.llama import LlamaModel, unfuse_projections
from llavakit.quant.config import QuantConfig
from llavakit.quant.linear import QuantLinear


def _targets(model: nn.Module, cfg: QuantConfig) -> list[tuple[nn.Module, str, Linear]]:
    """(parent, attribute, Linear) for every layer the transform replaces."""
    found = [(parent, name, child) for parent in model.language_model.modules()
             for name, child in parent.named_children() if isinstance(child, Linear)]
    if cfg.lm_head and isinstance(model.lm_head, Linear):
        found.append((model, "lm_head", model.lm_head))
    return found


def _replace(model: nn.Module, cfg: QuantConfig, build) -> nn.Module:
    if isinstance(model.language_model, LlamaModel):  # a fused float q/k/v would bypass the new layers
        unfuse_projections(model.language_model)
    for parent, name, lin in _targets(model, cfg):
        setattr(parent, name, build(lin))
    return model


@torch.no_grad()
def quantize(model: nn.Module, cfg: QuantConfig | str) -> nn.Module:
    """Quantize the language model's Linear layers in place (round-to-nearest, see formats.py); returns model."""
    cfg = QuantConfig.parse(cfg)
    return _replace(model, cfg, lambda lin: QuantLinear.from_linear(lin, cfg))


def quantize_skeleton(model: nn.Module, cfg: QuantConfig | str, device: torch.device | str | None = None,
                      dtype: torch.dtype | None = None) -> nn.Module:
    """The same replacement with empty QuantLinears (on `device`, default each Linear's; scales in `dtype`, default
    each Linear's), for a loader that fills them as it reads a checkpoint; returns model."""
    cfg = QuantConfig.parse(cfg)

    def build(lin: Linear) -> QuantLinear:
        return QuantLinear(lin.in_features, lin.out_features, lin.bias is not None, cfg, lin.tp_style,
                           device or lin.weight.device, dtype or lin.weight.dtype)
    return _replace(model, cfg, build)
