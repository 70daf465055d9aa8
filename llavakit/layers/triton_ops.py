"""Fused Triton kernels for the decoder's small operations on CUDA at inference.

A 7B decode step spends ~1.7 ms of its ~9 ms (H100, bf16, batch 1; benchmarks/profile_decode.py) in
some 1,100 tiny PyTorch kernels around the matrix products: RMSNorm alone is eight (cast, pow, mean, add,
rsqrt, mul, cast, mul), rotary ten, the KV write two index copies. Each function here does one of those
in a single kernel with the same arithmetic and the same bf16/fp16 rounding points as the PyTorch code
it replaces, so results agree to the last bit or nearly (reduction order).

`use_fused(x)` decides: CUDA tensors, triton importable, autograd off (training keeps the PyTorch ops,
which have backward), and the module switch `ENABLED` (benchmarks flip it to measure the difference).
Without a GPU, TRITON_INTERPRET=1 runs the kernels on CPU tensors for the tests.
"""

from __future__ import annotations

import functools

import torch

try:  # the kernels' source uses `tl`; triton.jit compiles them on first use
    import triton.language as tl
except ImportError:
    tl = None

ENABLED = True


@functools.cache
def triton_available() -> bool:
    """Whether the triton package imports (it ships with CUDA builds of torch, not with CPU ones)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def use_fused(x: torch.Tensor) -> bool:
    return ENABLED and x.is_cuda and not torch.is_grad_enabled() and triton_available()


def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_o, n_cols, eps, BLOCK: tl.constexpr):
    """One row: x * rsqrt(mean(x^2) + eps) in float32, rounded to the input dtype, times the weight."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / n_cols
    y = (x * (1.0 / tl.sqrt(var + eps))).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (w * y).to(out_ptr.dtype.element_ty), mask=ok)


def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, stride_xt, stride_xh, stride_ct, stride_ot, stride_oh,
                   HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """One (token, head): x * cos + rotate_half(x) * sin, each product and the sum rounded like PyTorch."""
    t = tl.program_id(0)
    h = tl.program_id(1)
    j = tl.arange(0, HALF_PAD)
    ok = j < HALF
    dt = out_ptr.dtype.element_ty
    base = x_ptr + t * stride_xt + h * stride_xh
    x1 = tl.load(base + j, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + j, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + t * stride_ct + j, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + j, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_ct + j, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_ct + HALF + j, mask=ok, other=0.0).to(tl.float32)
    a1 = (x1 * c1).to(dt).to(tl.float32)
    b1 = (-x2 * s1).to(dt).to(tl.float32)
    a2 = (x2 * c2).to(dt).to(tl.float32)
    b2 = (x1 * s2).to(dt).to(tl.float32)
    out = out_ptr + t * stride_ot + h * stride_oh
    tl.store(out + j, (a1 + b1).to(dt), mask=ok)
    tl.store(out + HALF + j, (a2 + b2).to(dt), mask=ok)


def _silu_mul_kernel(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """silu(gate) rounded to the dtype, times up, rounded: F.silu(gate) * up."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    g = tl.load(g_ptr + i, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + i, mask=ok, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    silu = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    tl.store(out_ptr + i, (silu * u).to(dt), mask=ok)


def _write_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, stride_k, stride_v, stride_slot, n_cols,
                     BLOCK: tl.constexpr):
    """One token: its keys and values (H_kv * D) to cache row `slot`; slot -1 writes nothing."""
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = (cols < n_cols) & (slot >= 0)
    k = tl.load(k_ptr + t * stride_k + cols, mask=ok)
    v = tl.load(v_ptr + t * stride_v + cols, mask=ok)
    tl.store(kc_ptr + slot * stride_slot + cols, k, mask=ok)
    tl.store(vc_ptr + slot * stride_slot + cols, v, mask=ok)


@functools.cache
def _jit(name: str):
    import triton

    return triton.jit(globals()[name])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., H) -> (..., H), as llavakit.layers.norm.RMSNorm with a weight of x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _jit("_rms_norm_kernel")[(x2.shape[0],)](x2, weight, out, x2.stride(0), out.stride(0), shape[-1], eps,
                                                 BLOCK=triton_next_pow2(shape[-1]))
    return out.view(shape)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D), cos/sin (B, T, D) -> rotated (B, T, H, D), as layers.rotary.apply_rotary."""
    b, t, h, d = x.shape
    xf = x.reshape(b * t, h, d)
    if xf.stride(-1) != 1:
        xf = xf.contiguous()
    cf, sf = cos.reshape(b * t, d).contiguous(), sin.reshape(b * t, d).contiguous()
    out = torch.empty((b * t, h, d), dtype=x.dtype, device=x.device)
    if b * t:
        _jit("_rotary_kernel")[(b * t, h)](xf, cf, sf, out, xf.stride(0), xf.stride(1), cf.stride(0),
                                           out.stride(0), out.stride(1), HALF=d // 2,
                                           HALF_PAD=triton_next_pow2(d // 2))
    return out.view(b, t, h, d)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    block = 1024
    if n:
        _jit("_silu_mul_kernel")[(-(-n // block),)](gate, up, out, n, BLOCK=block)
    return out


def write_kv(cache: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k/v (N, H_kv, D) into the (num_blocks, block_size, H_kv, D) caches at flat rows slot_mapping (-1: skip)."""
    k_cache, v_cache = cache
    n = k.shape[0]
    if n == 0:
        return
    k2, v2 = k.reshape(n, -1), v.reshape(n, -1)
    if k2.stride(-1) != 1 or v2.stride(-1) != 1:
        k2, v2 = k2.contiguous(), v2.contiguous()
    cols = k2.shape[1]
    _jit("_write_kv_kernel")[(n,)](k2, v2, k_cache, v_cache, slot_mapping, k2.stride(0), v2.stride(0),
                                   k_cache.stride(1), cols, BLOCK=triton_next_pow2(cols))
