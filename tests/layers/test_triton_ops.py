"""The fused Triton kernels against the PyTorch code they replace: on CUDA (fp32 and bf16), and through
triton's CPU interpreter in a session started with TRITON_INTERPRET=1 (fp32)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llavakit.layers import triton_ops
from llavakit.layers.paged_attention import write_kv

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def torch_rms_norm(x, weight, eps):
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def torch_rotary(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def check_all(device: str, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    exact = dtype == torch.float32
    tol = {"atol": 1e-5, "rtol": 1e-5} if exact else {"atol": 2e-2, "rtol": 2e-2}
    x, w = rand(5, 3, 96), rand(96)  # 96: not a power of two, masked columns
    torch.testing.assert_close(triton_ops.rms_norm(x, w, 1e-6), torch_rms_norm(x, w, 1e-6), **tol)

    q = rand(2, 7, 4, 16)
    angles = torch.rand(2, 7, 8, generator=gen) * 6
    emb = torch.cat([angles, angles], -1)
    cos, sin = emb.cos().to(device, dtype), emb.sin().to(device, dtype)
    torch.testing.assert_close(triton_ops.rotary(q, cos, sin), torch_rotary(q, cos, sin), **tol)

    g, u = rand(3, 1000), rand(3, 1000)  # 3000 elements: a partial last block
    torch.testing.assert_close(triton_ops.silu_and_mul(g, u), F.silu(g) * u, **tol)

    caches = [(torch.full((6, 4, 2, 8), 7.0, device=device, dtype=dtype),
               torch.full((6, 4, 2, 8), 7.0, device=device, dtype=dtype)) for _ in range(2)]
    k, v = rand(5, 2, 8), rand(5, 2, 8)
    slots = torch.tensor([3, -1, 22, 0, -1], device=device)
    triton_ops.write_kv(caches[0], k, v, slots)
    triton_ops_enabled, triton_ops.ENABLED = triton_ops.ENABLED, False
    try:
        write_kv(caches[1], k, v, slots)  # the PyTorch path
    finally:
        triton_ops.ENABLED = triton_ops_enabled
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])


def test_fused_ops_match_torch_interpreted(interpreted_triton):
    check_all("cpu", torch.float32)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_ops_match_torch_on_cuda(dtype):
    pytest.importorskip("triton")
    check_all("cuda", dtype)


def test_fused_ops_only_on_cuda_without_autograd():
    x = torch.zeros(2, 2)
    assert not triton_ops.use_fused(x)  # CPU tensors always take the PyTorch ops
    if torch.cuda.is_available() and triton_ops.triton_available():
        y = x.cuda()
        assert not triton_ops.use_fused(y)  # autograd on: training keeps the ops that have backward
        with torch.inference_mode():
            assert triton_ops.use_fused(y)
