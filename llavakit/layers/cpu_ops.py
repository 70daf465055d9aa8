"""fp32 CPU kernels for the operations between a decoder layer's matrix products (csrc/cpu_ops.c, compiled with
the system C compiler on first use and cached): RMSNorm, the residual add fused with the next RMSNorm, the
rotary embedding, SwiGLU and CLIP's QuickGELU, each one pass instead of several eager ops. The eager PyTorch code
stays the reference they are tested against and the path everywhere else (other dtypes, autograd, no compiler).

Measured on bench-small, 1 thread (docs/performance.md): at batch 1 a decode step ran ~1,600 ATen calls, a fifth of
its time outside the matrix products; an RMSNorm of one 512-wide row took ~21 us through F.rms_norm's eight ops,
~10 us through this module (the C call itself ~2 us).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from llavakit.native import load_kernels

_SOURCE = Path(__file__).parent / "csrc" / "cpu_ops.c"
PARALLEL_GRAIN = 1 << 18  # elements per thread: smaller calls run on one thread (a parallel region's wake-up costs)
_P, _I64, _F32, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


@functools.cache
def cpu_library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot run (no AVX2, no C compiler, LLAVAKIT_CPU_OPS=0)."""
    return load_kernels(_SOURCE, "LLAVAKIT_CPU_OPS", {
        "rms_norm": [_P, _I64, _P, _P, _I64, _I64, _F32, _I32],
        "add_rms_norm": [_P, _I64, _P, _I64, _P, _P, _P, _I64, _I64, _F32, _I32],
        "rotary": [_P, _I64, _P, _P, _P, _I64, _I64, _I64, _I32],
        "silu_and_mul": [_P, _I64, _P, _I64, _P, _I64, _I64, _I32],
        "quick_gelu": [_P, _P, _I64, _I32]},
        extra_compile=("-ffast-math",),  # vectorized expf and sums
        link_flags=("-shared", "-fopenmp", "-lm"))  # no -ffast-math at link time: see cpu_attention.py


def use_fused(*tensors: torch.Tensor) -> bool:
    """Whether these tensors take the kernels: fp32 on the CPU, outside autograd, with the library built."""
    return (not torch.is_grad_enabled() and all(t.is_cpu and t.dtype is torch.float32 for t in tensors)
            and cpu_library() is not None)


def _rows(x: torch.Tensor) -> tuple[int, int] | None:
    """(rows, row stride) of x seen as (rows, n) rows of contiguous elements, read in place; None when its
    strides do not allow that. Worked out from the strides: a `view` costs more than the kernel at one row."""
    shape = x.shape
    if x.is_contiguous() and shape[-1]:
        return x.numel() // shape[-1], shape[-1]
    strides = x.stride()
    if strides[-1] != 1:
        return None
    rows, row_stride = 1, shape[-1]
    for size, stride in zip(reversed(shape[:-1]), reversed(strides[:-1]), strict=True):
        if size != 1:
            if rows == 1:
                row_stride = stride
            elif stride != row_stride * rows:
                return None
            rows *= size
    return rows, row_stride


def _like(x: torch.Tensor) -> torch.Tensor:
    """A new contiguous tensor of x's shape and dtype (the kernels write their outputs row after row)."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _threads(elements: int) -> int:
    return max(1, min(torch.get_num_threads(), elements // PARALLEL_GRAIN))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """F.rms_norm(x, (n,), weight, eps); None when x's layout does not fit (the caller runs torch)."""
    layout = _rows(x)
    if layout is None or not weight.is_contiguous():
        return None
    (rows, stride), n = layout, x.shape[-1]
    out = _like(x)
    cpu_library().rms_norm(x.data_ptr(), stride, weight.data_ptr(), out.data_ptr(), rows, n, eps, _threads(rows * n))
    return out


def add_rms_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x + y, F.rms_norm(x + y, (n,), weight, eps)) in one pass; None when a layout does not fit."""
    xl, yl = _rows(x), _rows(y)
    if xl is None or yl is None or x.shape != y.shape or not weight.is_contiguous():
        return None
    (rows, x_stride), (_, y_stride), n = xl, yl, x.shape[-1]
    total, out = _like(x), _like(x)
    cpu_library().add_rms_norm(x.data_ptr(), x_stride, y.data_ptr(), y_stride, weight.data_ptr(), total.data_ptr(),
                               out.data_ptr(), rows, n, eps, _threads(rows * n))
    return total, out


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """x (B, T, H, D) rotated by cos/sin (B, T, D), as `rotary.apply_rotary`; None when a layout does not fit
    (heads must lie D apart in a token's row, e.g. a view into the fused q/k/v product)."""
    b, t, h, d = x.shape
    token_stride = x.stride(0) if t == 1 else x.stride(1)  # tokens are (b, t) flattened
    if (x.stride(3) != 1 or x.stride(2) != d or (b > 1 and t > 1 and x.stride(0) != t * x.stride(1)) or d % 2
            or not (cos.is_contiguous() and sin.is_contiguous()) or cos.shape != (b, t, d)):
        return None
    out = _like(x)
    cpu_library().rotary(x.data_ptr(), token_stride, cos.data_ptr(), sin.data_ptr(), out.data_ptr(), b * t, h, d,
                         _threads(x.numel()))
    return out


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor | None:
    """F.silu(gate) * up; None when a layout does not fit."""
    gl, ul = _rows(gate), _rows(up)
    if gl is None or ul is None or gate.shape != up.shape:
        return None
    (rows, g_stride), (_, u_stride), n = gl, ul, gate.shape[-1]
    out = _like(gate)
    cpu_library().silu_and_mul(gate.data_ptr(), g_stride, up.data_ptr(), u_stride, out.data_ptr(), rows, n,
                               _threads(rows * n))
    return out


def quick_gelu(x: torch.Tensor) -> torch.Tensor | None:
    """x * sigmoid(1.702 x); None unless x is contiguous."""
    if not x.is_contiguous():
        return None
    out = _like(x)
    cpu_library().quick_gelu(x.data_ptr(), out.data_ptr(), x.numel(), _threads(x.numel()))
    return out
