"""Paged decode attention as one Triton kernel: the "triton" backend of paged_attention.py.

A decode step has one new query per sequence. The torch path gathers every sequence's blocks into a
padded (S, L) tensor and runs SDPA over it; this kernel instead walks each sequence's block table in
place and reads only its own `context_len` keys and values, so its shapes never depend on the lengths.
That is what lets the engine capture decode steps in CUDA graphs: the lengths and tables live in device
tensors, read by the kernel at run time.

One program per (query row, head): it streams the row's context in tiles of BLOCK_N positions with an
online softmax in float32. Rows with context 0 (a CUDA-graph bucket's padding) write zeros. Steps that
also hold prefill chunks run the kernel over their decode rows and SDPA (the torch path) over the chunks.

Without a GPU, TRITON_INTERPRET=1 runs the same kernel on CPU tensors (slowly); the tests use that when
triton is installed, and the torch path is the reference either way.
"""

from __future__ import annotations

import functools
import math

import torch

try:  # the kernel's source uses `tl`; triton.jit compiles it on first use (see _kernel)
    import triton.language as tl
except ImportError:
    tl = None

from llavakit.layers.paged_attention import KVPages, PagedAttentionMetadata, varlen_loop


@functools.cache
def triton_available() -> bool:
    """Whether the triton package imports (it ships with CUDA builds of torch, not with CPU ones)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, rows_ptr, tables_ptr, ctx_ptr, scale, window,
                         stride_q, stride_qh, stride_kb, stride_kt, stride_kh, stride_t, stride_o, stride_oh,
                         GROUPS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                         D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """One (decode row, query head): online softmax over the row's paged context, float32."""
    i = tl.program_id(0)  # which decode row
    h = tl.program_id(1)  # which query head
    kvh = h // GROUPS
    row = tl.load(rows_ptr + i)  # the row of q / out this program reads and writes
    ctx = tl.load(ctx_ptr + i)  # positions 0 .. ctx-1 are visible; the query sits at ctx-1
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + row * stride_q + h * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32) * scale
    m = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), tl.float32)
    acc = tl.zeros((D_PAD,), tl.float32)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(ctx - window, 0)
        lo = (lo // BLOCK_N) * BLOCK_N
    for start in range(lo, ctx, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        ok = pos < ctx
        if HAS_WINDOW:
            ok = ok & (pos >= ctx - window)
        block = tl.load(tables_ptr + i * stride_t + pos // BLOCK_SIZE, mask=ok, other=0)
        base = block.to(tl.int64) * stride_kb + (pos % BLOCK_SIZE) * stride_kt + kvh * stride_kh
        both = ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + base[:, None] + d[None, :], mask=both, other=0.0).to(tl.float32)
        scores = tl.where(ok, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=0))
        p = tl.exp(scores - m_new)
        alpha = tl.exp(m - m_new)
        v = tl.load(v_ptr + base[:, None] + d[None, :], mask=both, other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        total = total * alpha + tl.sum(p, axis=0)
        m = m_new
    out = tl.where(total > 0, acc / tl.maximum(total, 1e-30), 0.0)
    tl.store(out_ptr + row * stride_o + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


@functools.cache
def _kernel():
    import triton

    return triton.jit(_paged_decode_kernel)


def paged_decode(q: torch.Tensor, cache: KVPages, rows: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, window: int | None, out: torch.Tensor) -> torch.Tensor:
    """Attention for single-token queries: q (N, H, D); rows (R,) the q rows to compute, block_tables
    (R, W) and context_lens (R,) theirs. Writes out[rows] (N, H, D) and returns out."""
    k_cache, v_cache = cache
    r = rows.shape[0]
    if r == 0:
        return out
    h, d = q.shape[1], q.shape[2]
    hkv, block_size = k_cache.shape[2], k_cache.shape[1]
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("paged_decode needs contiguous head dims and equal k/v cache layouts")
    _kernel()[(r, h)](
        q, k_cache, v_cache, out, rows, block_tables, context_lens, 1.0 / math.sqrt(d), window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUPS=h // hkv, BLOCK_SIZE=block_size, HEAD_DIM=d, D_PAD=triton_next_pow2(d),
        BLOCK_N=64, HAS_WINDOW=window is not None)
    return out


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def triton_attention(q: torch.Tensor, cache: KVPages, meta: PagedAttentionMetadata,
                     window: int | None) -> torch.Tensor:
    """q (N, H, D) -> (N, H, D): the kernel over decode rows, SDPA over prefill chunks."""
    s = len(meta.query_lens)
    if meta.decode_only:
        key = "triton-decode"
        if key not in meta.step_cache:
            meta.step_cache[key] = torch.arange(s, device=q.device, dtype=torch.int32)
        out = q.new_zeros(q.shape) if q.shape[0] > s else torch.empty_like(q)
        return paged_decode(q, cache, meta.step_cache[key], meta.block_tables[:s], meta.context_lens[:s], window, out)
    out = varlen_loop(q, cache, meta, window, skip_decodes=True)  # prefill chunks; decode rows left as zeros
    decodes = [i for i, n in enumerate(meta.query_lens) if n == 1]
    if decodes:
        key = "triton-mixed"
        if key not in meta.step_cache:
            starts = meta.query_start_loc.tolist()
            idx = torch.tensor(decodes, device=q.device)
            meta.step_cache[key] = (torch.tensor([starts[i] for i in decodes], device=q.device, dtype=torch.int32),
                                    meta.block_tables[idx], meta.context_lens[idx])
        rows, tables, ctx = meta.step_cache[key]
        paged_decode(q, cache, rows, tables, ctx, window, out)
    return out

