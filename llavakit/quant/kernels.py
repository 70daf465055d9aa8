"""Matrix products with packed weights: the dequantize-then-matmul reference and the faster paths.

`quant_linear` picks the path; every fast path is tested against `reference`. Choices, measured (see
docs/quantization.md for the numbers and how to rerun them):
- CPU, few rows (decode): a small AVX2 kernel of our own (csrc/qgemv_avx2.c, compiled with the system C
  compiler on first use and cached) reads the packed bytes directly. Dequantizing first, torch's
  `_weight_int8pack_mm`, and inductor's generated fused loop were all slower than an fp32 GEMV here.
- CPU, many rows (prefill), or no compiler / no AVX2: the reference, whose dequantization is then a small share.
- CUDA: the reference for now; this is the switch where tinygemm (`torch._weight_int4pack_mm`),
  `torch._weight_int8pack_mm` or a Triton kernel go, each to be tested against the reference on a GPU.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from llavakit.quant.config import QuantConfig
from llavakit.quant.formats import unpack_ints

_SOURCE = Path(__file__).parent / "csrc" / "qgemv_avx2.c"
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
CPU_KERNEL_GRAIN = 1 << 21  # weight elements per thread: smaller products run on one thread (fork/join costs more)
CPU_KERNEL_MAX_ROWS = 32  # measured: at 32 rows still as fast as an fp32 GEMM, the reference 8x slower


def reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              cfg: QuantConfig) -> torch.Tensor:
    """Dequantize the whole weight to x's dtype, then one ordinary matmul."""
    q = unpack_ints(packed, cfg.bits, packed.shape[1] * 32 // cfg.bits)
    out, n = q.shape
    w = (q.view(out, scale.shape[1], -1).to(scale.dtype) * scale.unsqueeze(-1)).view(out, n).to(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def cpu_kernel(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               cfg: QuantConfig) -> torch.Tensor:
    """The AVX2 kernel: fp32 accumulation straight from the packed bytes; x (..., in) in any float dtype."""
    lib = _cpu_library()
    assert lib is not None and packed.is_contiguous(), "check cpu_kernel_fits first"
    rows = x.reshape(-1, x.shape[-1]).float().contiguous()  # (B, K)
    s = scale.float().contiguous()
    out, k = packed.shape[0], rows.shape[1]
    y = torch.empty(rows.shape[0], out, dtype=torch.float32)
    fn = lib.qgemv_int8 if cfg.bits == 8 else lib.qgemv_int4
    threads = max(1, min(torch.get_num_threads(), out * k // CPU_KERNEL_GRAIN))
    fn(rows.data_ptr(), packed.data_ptr(), s.data_ptr(), y.data_ptr(), rows.shape[0], out, k,
       cfg.group_size or k, threads)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], out)


def cpu_kernel_fits(x: torch.Tensor, packed: torch.Tensor, cfg: QuantConfig) -> bool:
    """Whether `cpu_kernel` can run this product (and is compiled on this machine)."""
    k = x.shape[-1]
    return (x.device.type == "cpu" and x.numel() // k <= CPU_KERNEL_MAX_ROWS and k % 32 == 0
            and packed.shape[1] * 32 == k * cfg.bits  # else the reference's matmul reports the mismatch
            and (cfg.group_size or k) % 32 == 0 and packed.is_contiguous() and not torch.is_grad_enabled()
            and _cpu_library() is not None)


def quant_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 cfg: QuantConfig) -> torch.Tensor:
    """x (..., in) -> (..., out) in x's dtype, by the fastest path measured for this device and batch."""
    if cpu_kernel_fits(x, packed, cfg):
        return cpu_kernel(x, packed, scale, bias, cfg)
    return reference(x, packed, scale, bias, cfg)


@functools.cache
def _cpu_library() -> ctypes.CDLL | None:
    """The compiled AVX2 kernel, or None where it cannot run (no AVX2, no C compiler): callers fall back."""
    if os.environ.get("LLAVAKIT_QUANT_CPU_KERNEL", "1") == "0" or \
            torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None
    source = _SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join(_FLAGS).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llavakit" / "kernels"
    path = cache / f"qgemv_avx2_{tag}.so"
    try:
        if not path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as tmp:  # build aside, then rename: safe across processes
                built = Path(tmp) / path.name
                done = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(built)], capture_output=True)
                if done.returncode != 0:
                    return None
                os.replace(built, path)
        lib = ctypes.CDLL(str(path))
    except OSError:  # a cache directory we may not write, a library the loader refuses: the reference runs
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for fn in (lib.qgemv_int8, lib.qgemv_int4):
        fn.argtypes, fn.restype = [p, p, p, p, i64, i64, i64, i64, i32], None
    return lib
