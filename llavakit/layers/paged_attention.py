"""Attention over a paged KV cache: the engine's flattened batch of new tokens from many sequences.

The engine runs one step as a single row: q is (1, N, H, D) holding the N new tokens of S sequences back
to back, and `PagedAttentionMetadata` says which tokens belong to which sequence and where each
sequence's earlier keys/values live in the cache.

Cache layout, per layer: `(k_cache, v_cache)`, each (num_blocks, block_size, H_kv, D). A block holds
`block_size` consecutive positions of one sequence with all kv heads together, so gathering a sequence's
context is one index of whole blocks (`k_cache[block_table]`, contiguous per block), and writing a token
is one row of the flattened (num_blocks * block_size, H_kv, D) view at its slot.

Backends (chosen by `PagedAttentionMetadata.backend`, dispatched in attention.py): "torch" (here; runs
everywhere, the reference the others are tested against), "cpu" (a C kernel that reads each decode row's
blocks in place, cpu_attention.py; what the engine uses on CPUs with AVX2), "triton" (a paged decode kernel
that reads each sequence's blocks in place, triton_attention.py; what the engine uses on CUDA, and the one
CUDA graphs can capture) and "flex" (here: FlexAttention over the physical cache without gathering; eager on
CPU is only for its tests).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from itertools import accumulate

import torch
import torch.nn.functional as F

from llavakit.layers import triton_ops

KVPages = tuple[torch.Tensor, torch.Tensor]


@dataclass(slots=True)
class PagedAttentionMetadata:
    """Where the N new tokens of S sequences go and what they attend to.

    Tensors live on the model's device; the python lists mirror them so the torch path never syncs.
    """

    slot_mapping: torch.Tensor  # (N,) int64: block_id * block_size + offset per new token; -1 = don't write
    query_start_loc: torch.Tensor  # (S + 1,) int32/64: start of each sequence's new tokens in the flat batch
    context_lens: torch.Tensor  # (S,) int: tokens of each sequence after this step (cached + new)
    block_tables: torch.Tensor  # (S, max_blocks) int32: physical block ids in order, padded with -1 or 0
    block_size: int
    query_lens: list[int]  # S new-token counts; tokens after sum(query_lens) are padding (output zeros)
    context_lens_list: list[int]  # S, equal to context_lens
    # False when every slot_mapping entry is a real slot: the write then skips a boolean index (a device
    # sync, which CUDA-graph capture forbids).
    may_skip_slots: bool = True
    backend: str = "torch"
    decode_only: bool | None = None  # every sequence has exactly one new token; None: derived from query_lens
    # An upper bound on every context length when context_lens_list is a placeholder (CUDA-graph capture,
    # where lengths are read from the tensors at replay); None: max(context_lens_list).
    max_context_bound: int | None = None
    max_context_len: int = field(init=False)
    step_cache: dict = field(init=False, default_factory=dict)  # per-step tensors a backend builds once

    def __post_init__(self):
        if len(self.query_lens) != len(self.context_lens_list):
            raise ValueError(f"{len(self.query_lens)} query_lens but {len(self.context_lens_list)} context_lens")
        if any(q > c for q, c in zip(self.query_lens, self.context_lens_list, strict=True)):
            raise ValueError(f"a sequence has more new tokens than context: {self.query_lens} vs "
                             f"{self.context_lens_list}")
        decode_only = all(q == 1 for q in self.query_lens)
        if self.decode_only is not None and self.decode_only != decode_only:
            raise ValueError(f"decode_only={self.decode_only} but query_lens are {self.query_lens}")
        self.decode_only = decode_only
        self.max_context_len = max(self.context_lens_list, default=0)


def write_kv(cache: KVPages, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
             may_skip: bool = True) -> None:
    """Store k/v (N, H_kv, D) at the flattened cache rows `slot_mapping` (N,); rows with -1 are skipped."""
    k_cache, v_cache = cache
    if k.dtype == k_cache.dtype and k_cache.is_contiguous() and triton_ops.use_fused(k):
        return triton_ops.write_kv(cache, k, v, slot_mapping)  # one kernel, and -1 needs no host sync
    if may_skip:
        keep = slot_mapping >= 0
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def torch_attention(q: torch.Tensor, cache: KVPages, meta: PagedAttentionMetadata,
                    window: int | None) -> torch.Tensor:
    """Reference path: one batched SDPA for decode-only steps, a loop over sequences otherwise."""
    if meta.decode_only:
        return decode_batched(q, cache, meta, window)
    return varlen_loop(q, cache, meta, window)


def gather_blocks(pages: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """pages (num_blocks, bs, H_kv, D), block_table (..., max_blocks) -> (..., ceil(length/bs)*bs, H_kv, D)."""
    bs = pages.shape[1]
    blocks = block_table[..., :(length + bs - 1) // bs].clamp(min=0).long()  # padding -1 -> any block, masked
    x = pages.index_select(0, blocks.flatten())  # whole blocks: ~3x faster than pages[blocks] on CPU
    return x.view(*blocks.shape, *pages.shape[1:]).flatten(-4, -3)


def _decode_mask(meta: PagedAttentionMetadata, window: int | None, length: int, device) -> torch.Tensor:
    """(S, 1, 1, L) bool: which gathered positions each decode row attends to; built once per step."""
    key = ("decode_mask", window, length)
    if key not in meta.step_cache:
        s_real = len(meta.query_lens)
        pos = torch.arange(length, device=device)[None, :]  # (1, L)
        ctx = meta.context_lens[:s_real, None].to(device)  # (S, 1); the query sits at position ctx - 1
        allowed = pos < ctx
        if window is not None:
            allowed &= pos >= ctx - window
        allowed |= (ctx <= 0) & (pos == 0)  # an empty padding sequence must not make a NaN row
        meta.step_cache[key] = allowed[:, None, None, :]
    return meta.step_cache[key]


def decode_batched(q: torch.Tensor, cache: KVPages, meta: PagedAttentionMetadata,
                   window: int | None) -> torch.Tensor:
    """q (S, H, D), one new token per sequence -> (S, H, D) with one gather and one SDPA call."""
    s, h, d = q.shape
    s_real = len(meta.query_lens)
    hkv = cache[0].shape[2]
    k = gather_blocks(cache[0], meta.block_tables[:s_real], meta.max_context_len).transpose(1, 2)  # (S, H_kv, L, D)
    v = gather_blocks(cache[1], meta.block_tables[:s_real], meta.max_context_len).transpose(1, 2)
    allowed = _decode_mask(meta, window, k.shape[2], q.device)
    # GQA without expanding the cache: a kv head's query heads become its query rows (same mask for all).
    qg = q[:s_real].reshape(s_real, hkv, h // hkv, d)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=allowed)  # (S, H_kv, G, D)
    if s_real == s:
        return out.reshape(s, h, d)
    return torch.cat([out.reshape(s_real, h, d), q.new_zeros(s - s_real, h, d)])


def varlen_loop(q: torch.Tensor, cache: KVPages, meta: PagedAttentionMetadata,
                window: int | None, skip_decodes: bool = False) -> torch.Tensor:
    """q (N, H, D), any mix of prefill chunks and decodes -> (N, H, D), one SDPA per sequence.

    skip_decodes: leave single-token sequences' rows as zeros (another kernel computes them)."""
    h = q.shape[1]
    out = q.new_zeros(q.shape)
    starts = [0, *accumulate(meta.query_lens)]
    for i, (q_len, ctx) in enumerate(zip(meta.query_lens, meta.context_lens_list, strict=True)):
        if q_len == 0 or (skip_decodes and q_len == 1):
            continue
        k = gather_blocks(cache[0], meta.block_tables[i], ctx)[:ctx].transpose(0, 1)  # (H_kv, ctx, D)
        v = gather_blocks(cache[1], meta.block_tables[i], ctx)[:ctx].transpose(0, 1)
        k, v = expand_kv_heads(k, h), expand_kv_heads(v, h)  # (H, ctx, D)
        qs = q[starts[i]:starts[i + 1]].transpose(0, 1)  # (H, q_len, D)
        mask = offset_causal_mask(q_len, ctx, window, q.device)
        # 4-D: SDPA's fused CPU kernel takes only (B, H, L, D); 3-D inputs ran its math path at half the speed
        o = F.scaled_dot_product_attention(qs[None], k[None], v[None], attn_mask=mask,
                                           is_causal=mask is None and q_len > 1)
        out[starts[i]:starts[i + 1]] = o[0].transpose(0, 1)
    return out


def expand_kv_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(H_kv, L, D) -> (H, L, D), each kv head repeated for its consecutive query heads."""
    hkv, length, d = x.shape
    groups = num_heads // hkv
    if groups == 1:
        return x
    return x[:, None].expand(hkv, groups, length, d).reshape(num_heads, length, d)


def offset_causal_mask(q_len: int, k_len: int, window: int | None, device) -> torch.Tensor | None:
    """(q_len, k_len) bool mask for the last q_len of k_len positions; None when plain causal suffices."""
    if window is None and q_len in (1, k_len):
        return None
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


def flex_attention_paged(q: torch.Tensor, cache: KVPages, meta: PagedAttentionMetadata,
                         window: int | None) -> torch.Tensor:
    """q (N, H, D) -> (N, H, D) with FlexAttention reading the physical cache directly (no gather).

    The mask maps each physical slot to its logical position through a per-sequence inverse page table, so
    blocks shared by several sequences (prefix caching) stay correct. Compiled on CUDA; eager elsewhere.
    Its speed against the torch path has not been measured yet: tiles of 128 flat queries span several
    sequences, so decode computes more scores than it keeps.
    """
    # lazy: pulls in torch's compiler stack
    from torch.nn.attention.flex_attention import flex_attention

    k_cache, v_cache = cache
    hkv, d = k_cache.shape[2:]
    key = ("flex", window)
    if key not in meta.step_cache:  # one block mask per step, shared by every layer
        meta.step_cache[key] = _flex_block_mask(meta, k_cache.shape[0], q.shape[0], window, q.device)
    k = k_cache.view(1, -1, hkv, d).transpose(1, 2)  # (1, H_kv, slots, D)
    v = v_cache.view(1, -1, hkv, d).transpose(1, 2)
    attend = _compiled_flex() if q.is_cuda else flex_attention
    out = attend(q.transpose(0, 1)[None], k, v, block_mask=meta.step_cache[key], enable_gqa=True)
    return out[0].transpose(0, 1)  # (N, H, D)


def _flex_block_mask(meta: PagedAttentionMetadata, num_blocks: int, n: int, window: int | None, device):
    from torch.nn.attention.flex_attention import create_block_mask

    bs, s = meta.block_size, len(meta.query_lens)
    q_seq = torch.full((n,), -1, dtype=torch.long)  # (N,) owning sequence of each flat query, -1 = padding
    q_pos = torch.zeros(n, dtype=torch.long)  # (N,) absolute position of each flat query
    start = 0
    for i, (q_len, ctx) in enumerate(zip(meta.query_lens, meta.context_lens_list, strict=True)):
        q_seq[start:start + q_len] = i
        q_pos[start:start + q_len] = torch.arange(ctx - q_len, ctx)
        start += q_len
    q_seq, q_pos = q_seq.to(device), q_pos.to(device)
    tables = meta.block_tables[:s, :(meta.max_context_len + bs - 1) // bs].long().to(device)
    cols = torch.arange(tables.shape[1], device=device)[None, :]
    used = cols < (meta.context_lens[:s, None].to(device) + bs - 1) // bs
    # (S, num_blocks + 1) logical block index per physical block, -1 = not this sequence's; the extra
    # column soaks up the padding entries so the scatter needs no boolean index.
    logical = torch.full((s, num_blocks + 1), -1, dtype=torch.long, device=device)
    logical.scatter_(1, torch.where(used, tables, num_blocks), torch.where(used, cols, -1))

    def mask_mod(b, h, q_idx, kv_idx):
        seq = q_seq[q_idx]
        block = logical[seq.clamp(min=0), kv_idx // bs]
        k_pos = block * bs + kv_idx % bs
        allowed = (seq >= 0) & (block >= 0) & (k_pos <= q_pos[q_idx])
        if window is not None:
            allowed = allowed & (k_pos > q_pos[q_idx] - window)
        return allowed

    return create_block_mask(mask_mod, 1, None, n, num_blocks * bs, device=device)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)
