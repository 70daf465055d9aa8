"""The GPU paths of `quant_linear`: torch's `_weight_int8pack_mm` and tinygemm's `_weight_int4pack_mm` on weights
repacked once per layer. The packing is the same for the CPU variants of these ops, so it is checked exactly here
on the CPU; the CUDA tests run the real kernels and skip without CUDA."""

from __future__ import annotations

import pytest
import torch

from llavakit.layers.linear import linear
from llavakit.quant import QuantConfig, kernels
from llavakit.quant.formats import unpack_ints
from llavakit.quant.linear import QuantLinear

IN, OUT = 256, 96
INT4 = [QuantConfig("w4a16"), QuantConfig("w4a16", 32), QuantConfig("w4a16", 64), QuantConfig("w4a16", -1)]
CASES = [QuantConfig("w8a16"), *INT4]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _layer(cfg, dtype=torch.float32, bias=False, device="cpu") -> QuantLinear:
    torch.manual_seed(0)
    return QuantLinear.from_linear(linear(IN, OUT, bias=bias).to(device, dtype), cfg)


def _name(cfg):
    return f"{cfg.method}-g{cfg.group_size}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg", CASES, ids=_name)
def test_the_packing_gives_the_reference_through_the_cpu_ops(cfg, dtype):
    q = _layer(cfg, dtype, bias=True)
    p = kernels.prepare(q.weight_packed, q.weight_scale, cfg, dtype)
    assert p is not None and p.kind == ("int8" if cfg.bits == 8 else "int4")
    x = torch.randn(2, 3, IN).to(dtype)
    with torch.no_grad():
        fast = kernels.run_prepared(x, p, q.bias)
        ref = kernels.reference(x, q.weight_packed, q.weight_scale, q.bias, cfg)
    assert fast.dtype == dtype and fast.shape == (2, 3, OUT)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fast, ref, rtol=tol, atol=tol)


def test_tinygemm_scales_repeat_ours_with_zero_zeros():
    scale = torch.arange(1, 7, dtype=torch.float32).view(3, 2)  # (out 3, groups 2) of group 256
    sz = kernels.tinygemm_scales_and_zeros(scale, 256, 128, torch.bfloat16)
    assert sz.shape == (4, 3, 2) and sz.dtype == torch.bfloat16
    assert torch.equal(sz[..., 1], torch.zeros(4, 3, dtype=torch.bfloat16))
    assert sz[..., 0].T.tolist() == [[1, 1, 2, 2], [3, 3, 4, 4], [5, 5, 6, 6]]
    assert kernels.tinygemm_group(QuantConfig("w4a16", -1), 4096) == 256
    assert kernels.tinygemm_group(QuantConfig("w4a16", 96), 4096) == 32
    assert kernels.tinygemm_group(QuantConfig("w4a16", 40), 4096) is None


def test_cuda_packing_input_follows_the_torch_version():
    q = torch.tensor([[-8, 7, 0, -1], [3, -4, 5, 6]], dtype=torch.int8)
    old = kernels.tinygemm_input(q, "cuda", (2, 4))
    assert old.dtype == torch.int32 and old.tolist() == [[0, 15, 8, 7], [11, 4, 13, 14]]
    new = kernels.tinygemm_input(q, "cuda", (2, 11))
    assert new.dtype == torch.uint8 and new.tolist() == [[0x0F, 0x87], [0xB4, 0xDE]]  # even element high
    assert torch.equal(kernels.tinygemm_input(q, "cpu", (2, 13)), old)


def test_prepared_int8_weight_is_the_format_values():
    cfg = QuantConfig("w8a16")
    q = _layer(cfg)
    p = kernels.prepare(q.weight_packed, q.weight_scale, cfg, torch.float16)
    assert torch.equal(p.weight, unpack_ints(q.weight_packed, 8, IN)) and p.weight.dtype == torch.int8
    assert p.scales.dtype == torch.float16 and p.scales.shape == (OUT,)


@pytest.mark.parametrize("cfg, dtype", [(QuantConfig("w8a16", 64), torch.float32),  # grouped int8: no op
                                        (QuantConfig("w4a16", 40), torch.bfloat16)])  # no tinygemm group
def test_layouts_the_ops_cannot_take_are_left_to_the_reference(cfg, dtype):
    torch.manual_seed(0)
    q = QuantLinear.from_linear(linear(320, OUT), cfg)
    assert kernels.prepare_kind(q.weight_packed, cfg, dtype) is None
    assert kernels.prepare(q.weight_packed, q.weight_scale, cfg, dtype) is None


def test_the_cache_is_not_used_on_cpu():
    cfg = QuantConfig("w4a16")
    q = _layer(cfg)
    with torch.no_grad():
        q(torch.randn(1, IN))
    assert q.repacked == {}


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rows", [1, 16, kernels.CUDA_MAX_ROWS])
@pytest.mark.parametrize("cfg", CASES, ids=_name)
def test_cuda_kernels_equal_the_reference(cfg, rows, dtype):
    q = _layer(cfg, dtype, bias=True, device="cuda")
    x = torch.randn(rows, IN, device="cuda", dtype=dtype)
    with torch.no_grad():
        fast, ref = q(x), kernels.reference(x, q.weight_packed, q.weight_scale, q.bias, cfg)
    kind = q.repacked["cuda"][1].kind
    assert kind == ("int8" if cfg.bits == 8 else "int4")
    torch.testing.assert_close(fast, ref, rtol=3e-2, atol=3e-2)


@needs_cuda
def test_cuda_repacks_once_and_again_after_a_new_weight():
    cfg = QuantConfig("w4a16")
    q = _layer(cfg, torch.bfloat16, device="cuda")
    x = torch.randn(1, IN, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        q(x)
        first = q.repacked["cuda"][1]
        q(x)
        assert q.repacked["cuda"][1] is first
        q.set_weight(torch.randn(OUT, IN, device="cuda", dtype=torch.bfloat16))
        y = q(x)
    assert q.repacked["cuda"][1] is not first
    torch.testing.assert_close(y, kernels.reference(x, q.weight_packed, q.weight_scale, None, cfg), rtol=3e-2,
                               atol=3e-2)


@needs_cuda
def test_cuda_prefill_and_training_take_the_reference():
    cfg = QuantConfig("w8a16")
    q = _layer(cfg, torch.bfloat16, device="cuda")
    with torch.no_grad():
        q(torch.randn(kernels.CUDA_MAX_ROWS + 1, IN, device="cuda", dtype=torch.bfloat16))
    assert q.repacked == {}
    x = torch.randn(1, IN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    q(x).sum().backward()
    assert q.repacked == {} and x.grad is not None


def test_an_op_that_fails_on_its_first_call_leaves_the_reference():
    cfg = QuantConfig("w8a16")
    q = _layer(cfg)
    p = kernels.prepare(q.weight_packed, q.weight_scale, cfg, torch.float32)
    x = torch.randn(2, IN)
    assert kernels._probed(x, p) is p
    broken = kernels.Prepared(p.key, p.kind, p.weight[:, :IN // 2], p.scales, 0)  # wrong inner size: the op raises
    assert kernels._probed(x, broken) is None
    assert kernels._probed(x, None) is None
