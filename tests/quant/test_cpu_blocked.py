"""The CPU many-row path (prefill): blocks of the weight dequantized by our kernel, each multiplied by one fp32
GEMM, against the dequantize-then-matmul reference."""

from __future__ import annotations

import pytest
import torch

from llavakit.layers.linear import linear
from llavakit.quant import QuantConfig, kernels
from llavakit.quant.linear import QuantLinear

CASES = [QuantConfig("w8a16"), QuantConfig("w4a16"), QuantConfig("w4a16", 32), QuantConfig("w8a16", 64)]


@pytest.fixture(autouse=True)
def _needs_library():
    if kernels._cpu_library() is None:
        pytest.skip("no AVX2 or no C compiler: the CPU kernels are not used on this machine")


def _layer(cfg, dtype=torch.float32, out=96) -> QuantLinear:
    torch.manual_seed(0)
    return QuantLinear.from_linear(linear(256, out, bias=True).to(dtype), cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.method}-g{c.group_size}")
def test_blocked_equals_the_reference(cfg, dtype, monkeypatch):
    monkeypatch.setattr(kernels, "CPU_BLOCK_ROWS", 40)  # 96 outputs: blocks of 40, 40 and 16
    q = _layer(cfg, dtype)
    x = torch.randn(3, kernels.CPU_KERNEL_MAX_ROWS, 256).to(dtype)
    with torch.no_grad():
        assert kernels.cpu_blocked_fits(x, q.weight_packed, cfg)
        fast = kernels.cpu_blocked(x, q.weight_packed, q.weight_scale, q.bias, cfg)
        ref = kernels.reference(x, q.weight_packed, q.weight_scale, q.bias, cfg)
    assert fast.dtype == dtype and fast.shape == (3, kernels.CPU_KERNEL_MAX_ROWS, 96)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # fp32 here, a bf16 matmul in the reference
    torch.testing.assert_close(fast, ref, rtol=tol, atol=tol)


def test_rows_choose_between_the_cpu_paths():
    cfg = QuantConfig("w8a16")
    q = _layer(cfg)
    few, many = torch.randn(kernels.CPU_KERNEL_MAX_ROWS, 256), torch.randn(kernels.CPU_KERNEL_MAX_ROWS + 1, 256)
    with torch.no_grad():
        assert kernels.cpu_kernel_fits(few, q.weight_packed, cfg)
        assert not kernels.cpu_blocked_fits(few, q.weight_packed, cfg)
        assert kernels.cpu_blocked_fits(many, q.weight_packed, cfg)
        assert not kernels.cpu_kernel_fits(many, q.weight_packed, cfg)
        torch.testing.assert_close(q(many), kernels.reference(many, q.weight_packed, q.weight_scale, q.bias, cfg),
                                   rtol=1e-5, atol=1e-5)
    assert not kernels.cpu_blocked_fits(many, q.weight_packed, cfg)  # grad enabled: the differentiable path
