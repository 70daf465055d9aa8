"""Paged decode attention in Triton: the "triton" backend of paged_attention.py.

A decode step has one new query per sequence. The torch path gathers every sequence's blocks into a
padded (S, L) tensor and runs SDPA over it; this kernel instead walks each sequence's block table in
place and reads only its own `context_len` keys and values, so its shapes never depend on the lengths.
That is what lets the engine capture decode steps in CUDA graphs: the lengths and tables live in device
tensors, read by the kernel at run time.

One program per (query row, head, context split): it streams its part of the row's context in tiles of
BLOCK_N positions with an online softmax in float32; with several splits a second kernel merges the
parts (num_splits: enough programs to fill the GPU, and short walks, since each tile waits on memory).
Rows with context 0 (a CUDA-graph bucket's padding) write zeros. Steps that also hold prefill chunks run
the kernel over their decode rows and SDPA (the torch path) over the chunks.

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
from llavakit.layers.triton_ops import triton_available, triton_next_pow2  # noqa: F401 - re-exported


def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, ws_ptr, rows_ptr, tables_ptr, ctx_ptr, scale, window,
                         stride_q, stride_qh, stride_kb, stride_kt, stride_kh, stride_t, stride_o, stride_oh,
                         GROUPS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                         D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
                         SPLITS: tl.constexpr):
    """One (decode row, query head, context split): online softmax over that part of the row's paged
    context, float32. With one split it writes the output; with several, (acc, max, sum) to the workspace
    for _combine_kernel."""
    i = tl.program_id(0)  # which decode row
    h = tl.program_id(1)  # which query head
    sp = tl.program_id(2)  # which part of the context
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
    chunk = ((ctx - lo + SPLITS - 1) // SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    first = lo + sp * chunk
    end = tl.minimum(ctx, first + chunk)
    for start in range(first, end, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        ok = pos < end
        if HAS_WINDOW:
            ok = ok & (pos >= ctx - window)
        block = tl.load(tables_ptr + i * stride_t + pos // BLOCK_SIZE, mask=ok, other=0)
        base = block.to(tl.int64) * stride_kb + (pos % BLOCK_SIZE) * stride_kt + kvh * stride_kh
        if D_PAD == HEAD_DIM:  # noqa: SIM108 - a constexpr branch of a Triton kernel, kept as the if it was tested as
            both = ok[:, None]  # no mask along the head dim: the loads stay 16-byte vectors
        else:
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
    if SPLITS == 1:
        out = tl.where(total > 0, acc / tl.maximum(total, 1e-30), 0.0)
        tl.store(out_ptr + row * stride_o + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)
    else:
        ws = ws_ptr + ((i * tl.num_programs(1) + h) * SPLITS + sp) * (D_PAD + 2)
        tl.store(ws + d, acc)
        tl.store(ws + D_PAD, m)
        tl.store(ws + D_PAD + 1, total)


def _combine_kernel(ws_ptr, rows_ptr, out_ptr, stride_o, stride_oh, HEAD_DIM: tl.constexpr,
                    D_PAD: tl.constexpr, SPLITS: tl.constexpr):
    """One (decode row, query head): merge the splits' partial softmaxes."""
    i = tl.program_id(0)
    h = tl.program_id(1)
    row = tl.load(rows_ptr + i)
    d = tl.arange(0, D_PAD)
    sp = tl.arange(0, SPLITS)
    ws = ws_ptr + ((i * tl.num_programs(1) + h) * SPLITS + sp) * (D_PAD + 2)
    m = tl.load(ws + D_PAD)  # (SPLITS,)
    total = tl.load(ws + D_PAD + 1)
    acc = tl.load(ws[:, None] + d[None, :])  # (SPLITS, D_PAD)
    m_all = tl.max(m, axis=0)
    w = tl.where(total > 0, tl.exp(m - m_all), 0.0)  # empty splits (max -inf, sum 0) weigh nothing
    denom = tl.sum(total * w, axis=0)
    out = tl.sum(acc * w[:, None], axis=0)
    out = tl.where(denom > 0, out / tl.maximum(denom, 1e-30), 0.0)
    tl.store(out_ptr + row * stride_o + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@functools.cache
def _jit(name: str):
    import triton

    return triton.jit(globals()[name])


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2


BLOCK_N = 64  # positions per tile of the decode kernel
MAX_SPLITS = 32
SPLIT_LEN = 256  # a split walks at most this many positions of the longest possible context


def num_splits(rows: int, heads: int, device: torch.device, max_context: int = 0) -> int:
    """Context splits (a power of two): enough that rows x heads x splits fills the GPU about twice, and
    that no split walks more than SPLIT_LEN positions of a `max_context`-long context. A program walks its
    tiles one after another, each waiting on memory, so short walks matter more than few programs."""
    want = max(-(-2 * _sm_count(device) // (rows * heads)), -(-max_context // SPLIT_LEN), 1)
    return min(MAX_SPLITS, triton_next_pow2(want))


def paged_decode(q: torch.Tensor, cache: KVPages, rows: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, window: int | None, out: torch.Tensor,
                 splits: int | None = None, max_context: int = 0) -> torch.Tensor:
    """Attention for single-token queries: q (N, H, D); rows (R,) the q rows to compute, block_tables
    (R, W) and context_lens (R,) theirs. Writes out[rows] (N, H, D) and returns out. `splits` (a power
    of two) cuts each row's context into that many parts run in parallel (default: num_splits for
    `max_context`, a bound on the rows' context lengths)."""
    k_cache, v_cache = cache
    r = rows.shape[0]
    if r == 0:
        return out
    h, d = q.shape[1], q.shape[2]
    hkv, block_size = k_cache.shape[2], k_cache.shape[1]
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("paged_decode needs contiguous head dims and equal k/v cache layouts")
    splits = splits or num_splits(r, h, q.device, max_context)
    d_pad = triton_next_pow2(d)
    ws = torch.empty((r, h, splits, d_pad + 2), dtype=torch.float32, device=q.device) if splits > 1 else out
    _jit("_paged_decode_kernel")[(r, h, splits)](
        q, k_cache, v_cache, out, ws, rows, block_tables, context_lens, 1.0 / math.sqrt(d), window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUPS=h // hkv, BLOCK_SIZE=block_size, HEAD_DIM=d, D_PAD=d_pad,
        BLOCK_N=BLOCK_N, HAS_WINDOW=window is not None, SPLITS=splits)
    if splits > 1:
        _jit("_combine_kernel")[(r, h)](ws, rows, out, out.stride(0), out.stride(1), HEAD_DIM=d, D_PAD=d_pad,
                                        SPLITS=splits)
    return out


def triton_attention(q: torch.Tensor, cache: KVPages, meta: PagedAttentionMetadata,
                     window: int | None) -> torch.Tensor:
    """q (N, H, D) -> (N, H, D): the kernel over decode rows, SDPA over prefill chunks."""
    s = len(meta.query_lens)
    if meta.decode_only:
        key = "triton-decode"
        if key not in meta.step_cache:
            meta.step_cache[key] = torch.arange(s, device=q.device, dtype=torch.int32)
        out = q.new_zeros(q.shape) if q.shape[0] > s else torch.empty_like(q)
        return paged_decode(q, cache, meta.step_cache[key], meta.block_tables[:s], meta.context_lens[:s], window, out,
                            max_context=_span(meta, window))
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
        paged_decode(q, cache, rows, tables, ctx, window, out, max_context=_span(meta, window))
    return out


def _span(meta: PagedAttentionMetadata, window: int | None) -> int:
    """A bound on how many positions one row attends to (captured graphs give the longest possible)."""
    bound = meta.max_context_bound or meta.max_context_len
    return bound if window is None else min(bound, window + BLOCK_N)  # a window may start mid-tile

