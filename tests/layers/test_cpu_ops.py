"""The fp32 CPU kernels (csrc/cpu_ops.c) against the eager PyTorch code they replace, on the layouts the decoder
gives them (views into fused products, single rows, prefill-sized blocks), and where they must step aside."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llavakit.layers import cpu_ops
from llavakit.layers.activation import QuickGELU, silu_and_mul
from llavakit.layers.norm import RMSNorm
from llavakit.layers.rotary import _rotate_half, apply_rotary

pytestmark = pytest.mark.skipif(cpu_ops.cpu_library() is None, reason="no C compiler or AVX2 here")
TOL = dict(rtol=1e-6, atol=1e-6)


def _eager_rotary(x, cos, sin):
    return x * cos[:, :, None] + _rotate_half(x) * sin[:, :, None]


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request, monkeypatch):
    monkeypatch.setattr(cpu_ops, "PARALLEL_GRAIN", 1)  # small tensors split over threads too
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)


@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 96), (1, 300, 512)])
@torch.no_grad()
def test_rms_norm_equals_f_rms_norm(shape, threads):
    torch.manual_seed(0)
    x, norm = torch.randn(shape) * 3, RMSNorm(shape[-1], 1e-5)
    norm.weight.copy_(torch.randn(shape[-1]))
    out = cpu_ops.rms_norm(x, norm.weight, norm.eps)
    torch.testing.assert_close(out, F.rms_norm(x, (shape[-1],), norm.weight, 1e-5), **TOL)
    assert torch.equal(norm(x), out)  # the module takes the kernel
    total, normed = norm.add_and_norm(x, x * 0.5)
    torch.testing.assert_close(total, x + x * 0.5, rtol=0, atol=0)
    torch.testing.assert_close(normed, F.rms_norm(x + x * 0.5, (shape[-1],), norm.weight, 1e-5), **TOL)


@torch.no_grad()
def test_a_strided_row_view_is_read_in_place():
    torch.manual_seed(0)
    wide = torch.randn(4, 7, 256)
    x, w = wide[..., 64:192], torch.randn(128)  # rows 256 apart
    torch.testing.assert_close(cpu_ops.rms_norm(x, w, 1e-6), F.rms_norm(x, (128,), w, 1e-6), **TOL)
    assert cpu_ops.rms_norm(wide.transpose(1, 2), torch.randn(7), 1e-6) is None  # last dim not contiguous
    gappy = torch.randn(4, 8, 128)[:, :3]  # rows not evenly spaced: 3 of every 8
    assert cpu_ops._rows(gappy) is None and cpu_ops.rms_norm(gappy, torch.randn(128), 1e-6) is None
    torch.testing.assert_close(RMSNorm(128)(gappy), F.rms_norm(gappy, (128,), torch.ones(128), 1e-6), **TOL)
    every_other = torch.randn(4, 8, 128)[:, ::2]  # evenly spaced rows: read in place
    assert cpu_ops._rows(every_other) == (16, 256)
    torch.testing.assert_close(cpu_ops.rms_norm(every_other, w, 1e-6), F.rms_norm(every_other, (128,), w, 1e-6),
                               **TOL)


@pytest.mark.parametrize("b, t", [(1, 1), (4, 1), (1, 9), (2, 6)])
@torch.no_grad()
def test_rotary_of_views_into_a_fused_qkv_product(b, t, threads):
    torch.manual_seed(0)
    h, hk, d = 4, 2, 32
    qkv = torch.randn(b, t, (h + 2 * hk) * d)
    q, k, _ = qkv.split([h * d, hk * d, hk * d], dim=-1)
    q, k = q.view(b, t, h, d), k.view(b, t, hk, d)
    angles = torch.rand(b, t, d // 2) * 50
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    for x in (q, k, q.contiguous()):
        out = apply_rotary(x, cos, sin)
        assert out.is_contiguous() and out.shape == x.shape
        torch.testing.assert_close(out, _eager_rotary(x, cos, sin), **TOL)


@torch.no_grad()
def test_rotary_steps_aside_for_layouts_it_cannot_read():
    x = torch.randn(2, 3, 4, 8).transpose(1, 2)  # heads not D apart within a token
    cos = sin = torch.ones(2, 4, 8)
    assert cpu_ops.rotary(x, cos, sin) is None
    torch.testing.assert_close(apply_rotary(x, cos, sin), _eager_rotary(x, cos, sin))


@pytest.mark.parametrize("rows", [1, 37, 2000])
@torch.no_grad()
def test_silu_and_mul_of_a_fused_gate_up_product(rows, threads):
    torch.manual_seed(0)
    gate, up = (torch.randn(1, rows, 2 * 344) * 60).chunk(2, dim=-1)  # exp overflows for gate < -88
    out = silu_and_mul(gate, up)
    torch.testing.assert_close(out, F.silu(gate) * up, **TOL)
    assert out.is_contiguous()


@torch.no_grad()
def test_quick_gelu_equals_clips(threads):
    x = torch.randn(3, 50, 128) * 40  # large negatives: sigmoid underflows
    torch.testing.assert_close(QuickGELU()(x), x * torch.sigmoid(1.702 * x), **TOL)
    assert cpu_ops.quick_gelu(x.transpose(1, 2)) is None


def test_autograd_other_dtypes_and_the_switch_take_torch(monkeypatch):
    x = torch.randn(2, 8)
    with torch.no_grad():
        assert cpu_ops.use_fused(x) and not cpu_ops.use_fused(x.bfloat16())
    assert not cpu_ops.use_fused(x)  # autograd on
    norm = RMSNorm(8)
    y = norm(x.requires_grad_())  # training: differentiable eager path
    y.sum().backward()
    assert x.grad is not None
    cpu_ops.cpu_library.cache_clear()
    monkeypatch.setenv("LLAVAKIT_CPU_OPS", "0")
    try:
        with torch.no_grad():
            assert cpu_ops.cpu_library() is None and not cpu_ops.use_fused(x)
    finally:
        cpu_ops.cpu_library.cache_clear()
