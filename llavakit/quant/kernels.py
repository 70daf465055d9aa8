"""Matrix products with packed weights: the dequantize-then-matmul reference and the faster paths.

`quant_linear` picks the path; every fast path is tested against `reference`. Choices, measured (see
docs/quantization.md for the numbers and how to rerun them):
- CPU, few rows (decode): a small AVX2 kernel of our own (csrc/qgemv_avx2.c, compiled with the system C
  compiler on first use and cached) reads the packed bytes directly. Dequantizing first, torch's
  `_weight_int8pack_mm`, and inductor's generated fused loop were all slower than an fp32 GEMV here.
- CPU, many rows (prefill): the same library dequantizes CPU_BLOCK_ROWS output rows at a time to fp32 and one
  fp32 GEMM multiplies each block (`cpu_blocked`): 1.5-2.8x faster than the reference, whose elementwise unpacking
  costs more than the GEMM.
- CPU without a compiler or AVX2, or in training: the reference.
- CUDA, up to CUDA_MAX_ROWS rows, no autograd: torch's own weight-only kernels on the weight repacked once per layer
  (`prepare`, cached by the caller): W4A16 through tinygemm (`_weight_int4pack_mm`, bf16 activations; fp16 ones
  are cast), W8A16 per channel through `_weight_int8pack_mm` (torch >= 2.9 has a CUDA kernel). The same packing
  feeds the CPU variants of these ops, which is how the CPU tests check it exactly. Once repacked, the stored
  compressed-tensors weight moves to the host (`cuda_prepared` hands the host copy to the layer's `release`), so
  the GPU holds one copy of each integer weight and every later product runs from the repacked one.
- CUDA after the repack, many rows (prefill) or autograd: int8 dequantizes the repacked values (the weight's q
  exactly) with the stored scales and one matmul, the reference's numbers; int4 runs tinygemm at any row count
  (without autograd; with it, the reference on the stored weight copied back from the host).
- CUDA before any repack (prefill first, training), or a layout or torch build these kernels cannot take: the
  reference (dequantize + cuBLAS) on the stored weight, which then stays on the GPU.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llavakit.native import load_kernels
from llavakit.quant.config import QuantConfig
from llavakit.quant.formats import dequantize_ints, unpack_ints

_SOURCE = Path(__file__).parent / "csrc" / "qgemv_avx2.c"
CPU_KERNEL_GRAIN = 1 << 21  # weight elements per thread: smaller products run on one thread (fork/join costs more)
CPU_KERNEL_MAX_ROWS = 32  # measured: at 32 rows still as fast as an fp32 GEMM, the reference 8x slower
CPU_BLOCK_ROWS = 1024  # output rows dequantized per GEMM: measured against 128, 256 and the whole weight
CUDA_MAX_ROWS = 64  # decode batches; past that the dequantize + cuBLAS reference wins for tinygemm (torchao's numbers)
TINYGEMM_GROUPS = (256, 128, 64, 32)  # the group sizes `_weight_int4pack_mm` takes
INNER_K_TILES = 8  # tinygemm's 16-byte loads (gpt-fast's and torchao's choice): K must be a multiple of 128
TORCH = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
HOST = torch.device("cpu")  # where a layer's stored weight goes once a GPU kernel holds its own copy


def reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
              cfg: QuantConfig) -> torch.Tensor:
    """Dequantize the whole weight to x's dtype, then one ordinary matmul."""
    return dequantized_linear(x, unpack_ints(packed, cfg.bits, packed.shape[1] * 32 // cfg.bits), scale, bias)


def dequantized_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
                       ) -> torch.Tensor:
    """x (..., in) times the weight's int values q (out, in) dequantized with `scale`, cast to x's dtype."""
    return F.linear(x, dequantize_ints(q, scale).to(x.dtype), None if bias is None else bias.to(x.dtype))


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


def cpu_blocked(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                cfg: QuantConfig) -> torch.Tensor:
    """Many rows: our kernel dequantizes CPU_BLOCK_ROWS output rows at a time to fp32 and one fp32 GEMM multiplies
    each block while it is still in cache (the reference dequantizes the whole weight with slow elementwise ops)."""
    lib = _cpu_library()
    assert lib is not None and packed.is_contiguous(), "check cpu_kernel_fits first"
    rows = x.reshape(-1, x.shape[-1]).float().contiguous()  # (B, K)
    s = scale.float().contiguous()
    out, k = packed.shape[0], rows.shape[1]
    y = torch.empty(out, rows.shape[0], dtype=torch.float32)  # (N, B): each block's product is a row slice
    block = torch.empty(min(out, CPU_BLOCK_ROWS), k, dtype=torch.float32)
    fn = lib.dequant_int8 if cfg.bits == 8 else lib.dequant_int4
    for n0 in range(0, out, CPU_BLOCK_ROWS):
        n1 = min(n0 + CPU_BLOCK_ROWS, out)
        fn(packed.data_ptr(), s.data_ptr(), block.data_ptr(), n0, n1, k, cfg.group_size or k)
        torch.mm(block[:n1 - n0], rows.T, out=y[n0:n1])
    y = y.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], out)


def cpu_kernel_fits(x: torch.Tensor, packed: torch.Tensor, cfg: QuantConfig) -> bool:
    """Whether `cpu_kernel` can run this product (and is compiled on this machine)."""
    return x.numel() // x.shape[-1] <= CPU_KERNEL_MAX_ROWS and _cpu_library_fits(x, packed, cfg)


def cpu_blocked_fits(x: torch.Tensor, packed: torch.Tensor, cfg: QuantConfig) -> bool:
    """Whether `cpu_blocked` runs this product: the many-row products our kernels can take."""
    return x.numel() // x.shape[-1] > CPU_KERNEL_MAX_ROWS and _cpu_library_fits(x, packed, cfg)


def _cpu_library_fits(x: torch.Tensor, packed: torch.Tensor, cfg: QuantConfig) -> bool:
    k = x.shape[-1]
    return (x.device.type == "cpu" and k % 32 == 0
            and packed.shape[1] * 32 == k * cfg.bits  # else the reference's matmul reports the mismatch
            and (cfg.group_size or k) % 32 == 0 and packed.is_contiguous() and not torch.is_grad_enabled()
            and _cpu_library() is not None)


@dataclass(frozen=True)
class Prepared:
    """A weight repacked for one of torch's weight-only ops on one device."""

    kind: str  # "int8": _weight_int8pack_mm, "int4": _weight_int4pack_mm(_for_cpu)
    weight: torch.Tensor  # int8 (out, in) or tinygemm's packed int32 tiles
    scales: torch.Tensor  # (out,) in the activations' dtype, or tinygemm's (in / group, out, 2) scales and zeros
    group: int  # tinygemm's group size


def prepare_key(packed: torch.Tensor, scale: torch.Tensor) -> tuple:
    """The stored weight a Prepared is built from: a new weight (set_weight, load_state_dict, a move) builds anew."""
    return (packed.device, packed.data_ptr(), packed._version, scale.device, scale.data_ptr(), scale._version)


def prepare_kind(packed: torch.Tensor, cfg: QuantConfig, dtype: torch.dtype) -> str | None:
    """Which of torch's ops can run this weight on its device (None: only the reference can)."""
    out, k = packed.shape[0], packed.shape[1] * 32 // cfg.bits
    device = packed.device
    if cfg.bits == 8:
        fits = cfg.group_size is None and (device.type == "cpu" or TORCH >= (2, 9))
        return "int8" if fits and dtype in (torch.float32, torch.float16, torch.bfloat16) else None
    fits = (tinygemm_group(cfg, k) is not None and k % (INNER_K_TILES * 16) == 0 and out % 8 == 0
            and dtype in (torch.bfloat16, torch.float16) + ((torch.float32,) if device.type == "cpu" else ()))
    if device.type == "cuda":
        fits = fits and torch.cuda.get_device_capability(device) >= (8, 0)  # tinygemm's mma needs sm80
    return "int4" if fits else None


@torch.no_grad()
def prepare(packed: torch.Tensor, scale: torch.Tensor, cfg: QuantConfig, dtype: torch.dtype) -> Prepared | None:
    """Repack a compressed-tensors weight for `prepare_kind`'s op on its device; None when none fits."""
    kind = prepare_kind(packed, cfg, dtype)
    if kind is None:
        return None
    k = packed.shape[1] * 32 // cfg.bits
    q = unpack_ints(packed, cfg.bits, k)  # (out, in) int8
    if kind == "int8":
        return Prepared(kind, q.contiguous(), scale[:, 0].to(dtype).contiguous(), 0)
    group = tinygemm_group(cfg, k)
    scales = tinygemm_scales_and_zeros(scale, cfg.group_size or k, group, _int4_dtype(packed.device, dtype))
    return Prepared(kind, pack_tinygemm(q, packed.device), scales, group)


def tinygemm_group(cfg: QuantConfig, k: int) -> int | None:
    """The largest tinygemm group size dividing ours (a per-channel scale repeats over every group)."""
    return next((g for g in TINYGEMM_GROUPS if (cfg.group_size or k) % g == 0), None)


def tinygemm_scales_and_zeros(scale: torch.Tensor, group: int, tiny_group: int, dtype: torch.dtype) -> torch.Tensor:
    """Scales (out, in / group) -> tinygemm's (in / tiny_group, out, 2). tinygemm dequantizes an unsigned u as
    (u - 8) * scale + zero; our symmetric value is q = u - 8 exactly (u is the stored offset value), so every
    zero is 0 and scale is ours: the same weight, bit for bit, in the scales' precision."""
    s = scale.repeat_interleave(group // tiny_group, dim=1)  # (out, in / tiny_group)
    return torch.stack([s, torch.zeros_like(s)], dim=-1).transpose(0, 1).to(dtype).contiguous()


def pack_tinygemm(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int4 values q (out, in) in [-8, 7] -> `_convert_weight_to_int4pack`'s tiles, on q's device."""
    u = tinygemm_input(q, device.type, TORCH)
    if device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, INNER_K_TILES)
    return torch.ops.aten._convert_weight_to_int4pack(u, INNER_K_TILES)


def tinygemm_input(q: torch.Tensor, device_type: str, version: tuple[int, int]) -> torch.Tensor:
    """What the packing op takes: the unsigned u = q + 8 as int32 (out, in) on the CPU (`_for_cpu`) and on CUDA
    before torch 2.5; from 2.5 on CUDA, uint8 (out, in / 2) with the even element in the high nibble (as torchao
    and gpt-fast pack it)."""
    u = q.to(torch.int32) + 8
    if device_type == "cpu" or version < (2, 5):
        return u.contiguous()
    return (u[:, ::2] << 4 | u[:, 1::2]).to(torch.uint8).contiguous()


def _int4_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """tinygemm on CUDA computes in bf16 only; the CPU op takes the activations' dtype."""
    return torch.bfloat16 if device.type == "cuda" else dtype


def run_prepared(x: torch.Tensor, p: Prepared, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) -> (..., out) in x's dtype through the op `p` was packed for."""
    rows = x.reshape(-1, x.shape[-1])
    if p.kind == "int8":
        y = torch.ops.aten._weight_int8pack_mm(rows.contiguous(), p.weight, p.scales)
    elif x.device.type == "cpu":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.contiguous(), p.weight, p.group, p.scales)
    else:
        y = torch.ops.aten._weight_int4pack_mm(rows.to(torch.bfloat16).contiguous(), p.weight, p.group, p.scales)
    y = y.to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.view(*x.shape[:-1], y.shape[-1])


def repacks_on(device: torch.device) -> bool:
    """Whether products on `device` run torch's weight-only ops on a repacked weight (the CPU has kernels of its
    own; tests set this for the CPU to run the GPU logic through the ops' CPU variants)."""
    return device.type == "cuda"


def cuda_prepared(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, cfg: QuantConfig, cache: dict,
                  release: Callable[[torch.Tensor], None] | None = None) -> Prepared | None:
    """The layer's repacked weight for this GPU product, kept in `cache` (the layer's) for every later product of
    the same stored weight and activation dtype. It is built on a first use with few rows and no autograd, not
    inside CUDA-graph capture (the engine warms every graph up first, so not there), for layouts and torch builds
    whose op runs; then `release` gets a host copy of the stored weight, which the layer keeps instead of its
    copy on the GPU. None where the reference runs on the stored weight."""
    if not repacks_on(x.device) or packed.shape[1] * 32 != x.shape[-1] * cfg.bits:
        return None
    key = prepare_key(packed, scale)
    entry = cache.get("cuda")
    if entry is not None and entry[:2] == (key, x.dtype):
        return entry[2]
    if x.numel() // x.shape[-1] > CUDA_MAX_ROWS or torch.is_grad_enabled() or \
            (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    cache.pop("cuda", None)  # a stale copy goes before the new one is built
    p = _probed(x, prepare(packed.to(x.device), scale, cfg, x.dtype))
    if p is not None and release is not None and packed.device == x.device:
        with torch.inference_mode(False):  # a normal tensor, which set_weight and load_state_dict write in place
            packed = packed.to(HOST, copy=True)  # a new allocation even where the host is x's device (CPU tests)
            release(packed)
    cache["cuda"] = (prepare_key(packed, scale), x.dtype, p)
    return p


def cached(cache: dict, packed: torch.Tensor, scale: torch.Tensor) -> Prepared | None:
    """The Prepared in `cache` built from this stored weight, for whatever activation dtype; else None."""
    entry = cache.get("cuda")
    return entry[2] if entry is not None and entry[0] == prepare_key(packed, scale) else None


def weight_ints(packed: torch.Tensor, cfg: QuantConfig, p: Prepared | None, device: torch.device) -> torch.Tensor:
    """The weight's int values q (out, in) on `device`: the int8 kernel's own copy when it has one (the same
    values), else unpacked from the stored weight (copied back first if it was released to the host)."""
    if p is not None and p.kind == "int8":
        return p.weight
    return unpack_ints(packed.to(device), cfg.bits, packed.shape[1] * 32 // cfg.bits)


def _probed(x: torch.Tensor, p: Prepared | None) -> Prepared | None:
    """`p` if its op runs in this torch build (one row, once per layer), else None: the reference then runs."""
    if p is None:
        return None
    try:
        run_prepared(x.reshape(-1, x.shape[-1])[:1], p, None)
    except (RuntimeError, NotImplementedError):  # e.g. a build without the CUDA kernel: say nothing, run correct
        return None
    return p


def quant_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 cfg: QuantConfig, cache: dict | None = None,
                 release: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """x (..., in) -> (..., out) in x's dtype, by the fastest path measured for this device and batch.
    `cache`: the layer's dict for weights repacked for the GPU (without one, CUDA runs the reference);
    `release`: takes the stored weight's host copy once the GPU kernel has its own (see `cuda_prepared`)."""
    on_cpu = scale.is_cpu  # a GPU layer's stored weight may be on the host (released): never the CPU kernels
    if on_cpu and cpu_kernel_fits(x, packed, cfg):
        return cpu_kernel(x, packed, scale, bias, cfg)
    if on_cpu and cpu_blocked_fits(x, packed, cfg):
        return cpu_blocked(x, packed, scale, bias, cfg)
    p = None if cache is None else cuda_prepared(x, packed, scale, cfg, cache, release)
    few_rows = x.numel() // x.shape[-1] <= CUDA_MAX_ROWS
    if p is not None and not torch.is_grad_enabled() and (few_rows or p.kind == "int4"):
        return run_prepared(x, p, bias)
    return dequantized_linear(x, weight_ints(packed, cfg, p, x.device), scale, bias)


@functools.cache
def _cpu_library() -> ctypes.CDLL | None:
    """The compiled AVX2 kernel, or None where it cannot run (no AVX2, no C compiler): callers fall back."""
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    gemv, dequant = [p, p, p, p, i64, i64, i64, i64, i32], [p, p, p, i64, i64, i64, i64]
    return load_kernels(_SOURCE, "LLAVAKIT_QUANT_CPU_KERNEL", {"qgemv_int8": gemv, "qgemv_int4": gemv,
                                                               "dequant_int8": dequant, "dequant_int4": dequant})
