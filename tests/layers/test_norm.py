"""RMSNorm through F.rms_norm gives the bits of LLaMA's eager formula (statistics in float32, then the scale in
the input's dtype), in every dtype, so transformers parity is untouched."""

import pytest
import torch

from llavakit.layers.norm import RMSNorm


def eager(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 512, 4096])
def test_rms_norm_equals_the_eager_formula_bitwise(dtype, dim):
    gen = torch.Generator().manual_seed(dim)
    norm = RMSNorm(dim, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(dim, generator=gen) + 0.5)
    x = (torch.randn(3, 17, dim, generator=gen) * 4).to(dtype)
    out = norm(x)
    assert out.dtype == dtype
    assert torch.equal(out, eager(x, norm.weight, 1e-5))
    assert torch.equal(norm(x[:, ::2]), eager(x[:, ::2], norm.weight, 1e-5))  # a strided input too


def test_rms_norm_gradients_match_the_eager_formula():
    norm = RMSNorm(32)
    x = torch.randn(4, 32, requires_grad=True)
    norm(x).square().sum().backward()
    expected = torch.autograd.grad(eager(x, norm.weight, 1e-6).square().sum(), [x, norm.weight])
    torch.testing.assert_close(x.grad, expected[0])
    torch.testing.assert_close(norm.weight.grad, expected[1])
