"""QuantLinear and its kernels: every fast path against the dequantize-then-matmul reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llavakit.layers.linear import linear
from llavakit.quant import QuantConfig, formats, kernels
from llavakit.quant.linear import QuantLinear

CASES = [QuantConfig("w8a16"), QuantConfig("w4a16"), QuantConfig("w4a16", 32), QuantConfig("w8a16", 64)]


def _layer(cfg, dtype=torch.float32, bias=False):
    torch.manual_seed(0)
    lin = linear(256, 96, bias=bias, tp_style="row").to(dtype)
    return lin, QuantLinear.from_linear(lin, cfg)


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.method}-g{c.group_size}")
def test_forward_is_the_matmul_with_the_dequantized_weight(cfg):
    lin, q = _layer(cfg, bias=True)
    x = torch.randn(2, 5, 256)
    with torch.no_grad():
        expected = F.linear(x, formats.dequantize_weight(formats.quantize_weight(lin.weight, cfg), cfg), lin.bias)
        torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(q(x), lin(x), rtol=1e-6, atol=1e-6)  # it is quantized
    assert q.tp_style == "row" and q(x).shape == (2, 5, 96)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [1, 3, kernels.CPU_KERNEL_MAX_ROWS])
@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.method}-g{c.group_size}")
def test_cpu_kernel_equals_the_reference(cfg, rows, dtype):
    _, q = _layer(cfg, dtype, bias=True)
    x = torch.randn(rows, 256).to(dtype)
    if kernels._cpu_library() is None:
        pytest.skip("no AVX2 or no C compiler: the CPU kernel is not used on this machine")
    with torch.no_grad():
        assert kernels.cpu_kernel_fits(x, q.weight_packed, cfg)
        fast = kernels.cpu_kernel(x, q.weight_packed, q.weight_scale, q.bias, cfg)
        ref = kernels.reference(x, q.weight_packed, q.weight_scale, q.bias, cfg)
    assert fast.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # the kernel accumulates in fp32, bf16 matmuls do not quite
    torch.testing.assert_close(fast, ref, rtol=tol, atol=tol)


def test_kernel_choice_follows_rows_grad_and_shape():
    cfg = QuantConfig("w8a16")
    _, q = _layer(cfg)
    few, many = torch.randn(1, 256), torch.randn(kernels.CPU_KERNEL_MAX_ROWS + 1, 256)
    if kernels._cpu_library() is None:
        pytest.skip("no AVX2 or no C compiler")
    with torch.no_grad():
        assert kernels.cpu_kernel_fits(few, q.weight_packed, cfg)
        assert not kernels.cpu_kernel_fits(many, q.weight_packed, cfg)  # prefill: dequantize + one GEMM
        assert not kernels.cpu_kernel_fits(torch.randn(1, 256), q.weight_packed, QuantConfig("w4a16", 16))
    assert not kernels.cpu_kernel_fits(few, q.weight_packed, cfg)  # grad enabled: the differentiable path


def test_reference_is_differentiable_in_the_input():
    """QLoRA trains adapters over a quantized base: gradients flow to x, none to the packed weight."""
    _, q = _layer(QuantConfig("w4a16", 32))
    x = torch.randn(3, 256, requires_grad=True)
    q(x).sum().backward()
    expected = q.dequantized_weight().sum(0).expand(3, -1)
    torch.testing.assert_close(x.grad, expected)


def test_state_dict_uses_the_compressed_tensors_names_and_loads_into_an_empty_layer():
    cfg = QuantConfig("w4a16", 32)
    _, q = _layer(cfg, bias=True)
    sd = q.state_dict()
    assert sorted(sd) == ["bias", "weight_packed", "weight_scale", "weight_shape"]
    assert sd["weight_shape"].tolist() == [96, 256] and sd["weight_packed"].dtype == torch.int32
    empty = QuantLinear(256, 96, True, cfg, "row", "meta")
    assert empty.weight_packed.device.type == "meta"
    fresh = QuantLinear(256, 96, True, cfg, "row", "cpu")
    fresh.load_state_dict(sd)
    x = torch.randn(2, 256)
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))


def test_set_weight_quantizes_block_by_block_to_the_whole_weights_tensors_and_checks_sizes():
    cfg = QuantConfig("w4a16", 32)
    weight = torch.randn(1100, 64)  # three blocks of rows, the last one short
    layer = QuantLinear(64, 1100, False, cfg, "column")
    layer.set_weight(weight)
    whole = formats.quantize_weight(weight, cfg)
    assert all(torch.equal(layer.packed()[name], whole[name]) for name in formats.SUFFIXES)
    with pytest.raises(ValueError, match=r"expected shape \(1100, 64\), checkpoint has \(1100, 32\)"):
        layer.set_weight(torch.randn(1100, 32))
    with pytest.raises(ValueError, match="group size that divides 96"):
        QuantLinear(96, 8, False, QuantConfig("w4a16", 64), "column")


def test_fused_product_equals_the_separate_layers():
    cfg = QuantConfig("w4a16", 32)
    layers = [QuantLinear.from_linear(linear(256, n, tp_style="column"), cfg) for n in (64, 32, 32)]
    x = torch.randn(2, 256)
    with torch.no_grad():
        separate = torch.cat([m(x) for m in layers], dim=-1)
        states = [{k: v.clone() for k, v in m.state_dict().items()} for m in layers]
        fused = QuantLinear.fuse(layers)
        torch.testing.assert_close(fused(x), separate, rtol=1e-6, atol=1e-6)
        assert all(m.weight_packed.data_ptr() >= fused.packed.data_ptr() for m in layers)  # views, no copies
        for m, sd in zip(layers, states, strict=True):
            assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    mixed = [QuantLinear.from_linear(linear(256, 8), c) for c in (cfg, QuantConfig("w8a16"))]
    assert QuantLinear.fuse(mixed) is None
