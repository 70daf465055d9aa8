"""The "cpu" paged-attention backend: decode rows attend over the paged cache in place (csrc/paged_attention_cpu.c,
compiled with the system C compiler on first use and cached); rows of longer prompt chunks, and anything the
kernel cannot take (another dtype, no compiler), go through the torch reference path of paged_attention.py.

Measured on one layer of bench-small at batch 32 (contexts of 150-200 tokens, 27 MB of keys and values, 1 thread):
`pages[blocks]` + SDPA 8.5 ms, `index_select` + SDPA 6.1 ms (the copy alone 2.7 ms), einsum 14 ms, this kernel
1.4 ms; in the engine, where every layer's cache comes from memory, ~2.3 ms (docs/performance.md).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from llavakit.layers.paged_attention import KVPages, PagedAttentionMetadata, decode_batched, varlen_loop
from llavakit.native import load_kernels

_SOURCE = Path(__file__).parent / "csrc" / "paged_attention_cpu.c"
# -ffast-math lets the compiler vectorize expf; it is left out of the link, where GCC would add crtfastmath.o,
# whose constructor switches the whole process to flushing denormals to zero (torch's results would change).
_LINK = ("-shared", "-fopenmp", "-lm")

# Multiply-adds per thread: below this a step's attention runs on one thread. A parallel region costs a wake-up
# of every thread, and on a loaded machine a wait for each one to be scheduled (measured: at batch 1, 2 threads
# made the decode step several times slower than 1 while another job shared the cores).
PARALLEL_GRAIN = 1 << 21


@functools.cache
def cpu_library() -> ctypes.CDLL | None:
    """The compiled kernel, or None where it cannot run (no AVX2, no C compiler, LLAVAKIT_CPU_ATTENTION=0)."""
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    return load_kernels(_SOURCE, "LLAVAKIT_CPU_ATTENTION", {
        "paged_attention_rows": [p, p, p, p, i64, p, p, p, i64, p, i64, i64, i64, i64, i64, ctypes.c_float,
                                 ctypes.c_int],
        "write_kv_rows": [p, i64, p, i64, p, p, p, i64, i64]}, extra_compile=("-ffast-math",), link_flags=_LINK)


def kernel_fits(q: torch.Tensor, cache: KVPages) -> bool:
    """Whether the kernel can run on these tensors (and is compiled on this machine)."""
    k_cache, v_cache = cache
    return (q.device.type == "cpu" and q.dtype == k_cache.dtype == v_cache.dtype == torch.float32
            and q.shape[-1] % 8 == 0 and k_cache.is_contiguous() and v_cache.is_contiguous()
            and cpu_library() is not None)


def write_kv(cache: KVPages, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    """Store k/v (N, H_kv, D) at the flattened cache rows `slot_mapping` (N,), -1 skipped, as
    `paged_attention.write_kv` does, in one call; False (nothing written) where the kernel cannot take them."""
    k_cache, v_cache = cache
    n, hk, d = k.shape
    if not (k.dtype is v.dtype is k_cache.dtype is torch.float32 and k.is_cpu and v.is_cpu
            and k.stride(2) == v.stride(2) == 1 and k.stride(1) == v.stride(1) == d and k_cache.is_contiguous()
            and v_cache.is_contiguous() and slot_mapping.dtype is torch.int64 and slot_mapping.is_contiguous()
            and cpu_library() is not None):
        return False
    cpu_library().write_kv_rows(k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k_cache.data_ptr(),
                                v_cache.data_ptr(), slot_mapping.data_ptr(), n, hk * d)
    return True


def _single_rows(meta: PagedAttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, seqs, ends) of the step's single-token sequences, built once per step for every layer."""
    key = "cpu_rows"
    if key not in meta.step_cache:
        rows, seqs, ends, start = [], [], [], 0
        for i, (q_len, ctx) in enumerate(zip(meta.query_lens, meta.context_lens_list, strict=True)):
            if q_len == 1:
                rows.append(start)
                seqs.append(i)
                ends.append(ctx)
            start += q_len
        meta.step_cache[key] = tuple(torch.tensor(x, dtype=torch.int64) for x in (rows, seqs, ends))
    return meta.step_cache[key]


def cpu_attention(q: torch.Tensor, cache: KVPages, meta: PagedAttentionMetadata,
                  window: int | None) -> torch.Tensor:
    """q (N, H, D) -> (N, H, D): single-token sequences by the kernel, prompt chunks by the torch path."""
    if not kernel_fits(q, cache):
        return decode_batched(q, cache, meta, window) if meta.decode_only else varlen_loop(q, cache, meta, window)
    rows, seqs, ends = _single_rows(meta)
    # decode only: the kernel writes every row, so the output needs no zeros first
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if meta.decode_only else \
        varlen_loop(q, cache, meta, window, skip_decodes=True)
    if rows.numel():
        q = q.contiguous()
        tables = _tables(meta)
        n, h, d = q.shape
        k_cache, v_cache = cache
        cpu_library().paged_attention_rows(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), tables.shape[1],
            rows.data_ptr(), seqs.data_ptr(), ends.data_ptr(), rows.numel(), out.data_ptr(), h, k_cache.shape[2], d,
            meta.block_size, window or 0, d ** -0.5, _threads(meta, h * d))
    return out


def _threads(meta: PagedAttentionMetadata, width: int) -> int:
    key = ("cpu_threads", width)
    if key not in meta.step_cache:
        work = 2 * width * sum(c for q, c in zip(meta.query_lens, meta.context_lens_list, strict=True) if q == 1)
        meta.step_cache[key] = max(1, min(torch.get_num_threads(), work // PARALLEL_GRAIN))
    return meta.step_cache[key]


def _tables(meta: PagedAttentionMetadata) -> torch.Tensor:
    key = "cpu_tables"
    if key not in meta.step_cache:
        meta.step_cache[key] = meta.block_tables.to(torch.int64).contiguous()
    return meta.step_cache[key]
