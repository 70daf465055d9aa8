"""QLoRA's memory: the quantized base's product keeps no float weight from the forward to the backward (the
backward dequantizes again) yet gives the gradients autograd through the dequantized weight gives; a LoRA
checkpoint's save copies no frozen base tensor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llavakit.layers.linear import linear
from llavakit.quant.config import QuantConfig
from llavakit.quant.linear import QuantLinear
from llavakit.train.checkpoint import lora_saved
from llavakit.train.lora import QLoRALinear

IN, OUT = 256, 128


def _layer(method: str) -> QLoRALinear:
    layer = QLoRALinear(QuantLinear.from_linear(linear(IN, OUT, bias=False), QuantConfig(method)), r=4, alpha=8,
                        dropout=0.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize("method", ["w8a16", "w4a16"])
def test_qlora_gradients_equal_autograd_through_the_dequantized_weight(method):
    layer = _layer(method)
    x = torch.randn(2, 3, IN, requires_grad=True)
    layer(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    a, b = (p.detach().clone().requires_grad_(True) for p in (layer.lora_A, layer.lora_B))
    w = layer.base.dequantized_weight(torch.float32)
    (F.linear(x_ref, w) + F.linear(F.linear(x_ref, a), b) * layer.scaling).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(layer.lora_A.grad, a.grad, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(layer.lora_B.grad, b.grad, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("method", ["w8a16", "w4a16"])
def test_qlora_keeps_no_float_weight_for_the_backward(method):
    layer = _layer(method)
    saved = []
    x = torch.randn(2, 3, IN, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = layer(x)
    assert saved and (OUT, IN) not in saved and max(torch.Size(s).numel() for s in saved) < OUT * IN, saved
    out.sum().backward()
    assert x.grad is not None and layer.lora_A.grad is not None


def test_a_lora_checkpoint_holds_adapters_and_projector_only():
    assert lora_saved("model.language_model.layers.0.self_attn.q_proj.lora_A")
    assert lora_saved("projector.linear_1.weight") and lora_saved("model.image_newline")
    assert not lora_saved("model.language_model.layers.0.self_attn.q_proj.weight")
    assert not lora_saved("language_model.layers.0.mlp.up_proj.base.weight_packed")
    assert not lora_saved("vision_tower.encoder.layers.0.mlp.fc1.weight")
