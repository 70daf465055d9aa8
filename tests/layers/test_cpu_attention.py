"""The "cpu" paged-attention backend (the C kernel) against the torch reference path, on random paged layouts:
shuffled and shared blocks, varying lengths, block sizes that do not divide them, sliding windows, GQA, mixed
prefill and decode steps, one and two threads; and its fallbacks."""

from __future__ import annotations

import pytest
import torch

from llavakit.layers import cpu_attention as cpu_attention_module
from llavakit.layers.attention import paged_attention
from llavakit.layers.cpu_attention import cpu_attention, cpu_library
from llavakit.layers.paged_attention import PagedAttentionMetadata, torch_attention, write_kv

pytestmark = pytest.mark.skipif(cpu_library() is None, reason="the C kernel does not build here (no cc or no AVX2)")


def random_step(seed: int, lens: list[tuple[int, int]], heads: int, kv_heads: int, dim: int, bs: int,
                dtype=torch.float32):
    """A filled cache, flat q (N, H, D) and metadata for sequences of (cached, new) tokens; blocks shuffled,
    the first block of sequence 1 shared with sequence 0 (prefix caching), tables padded with -1."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-(c + n) // bs) for c, n in lens]
    num_blocks = sum(need) + 3
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[free.pop() for _ in range(k)] for k in need]
    if len(tables) > 1 and lens[0][0] >= bs and lens[1][0] >= bs:
        tables[1][0] = tables[0][0]
    cache = tuple(torch.randn(num_blocks, bs, kv_heads, dim, generator=gen).to(dtype) for _ in range(2))
    width = max(need) + 1
    q_lens, ctx = [n for _, n in lens], [c + n for c, n in lens]
    meta = PagedAttentionMetadata(
        slot_mapping=torch.tensor([tables[i][p // bs] * bs + p % bs for i, (c, n) in enumerate(lens)
                                   for p in range(c, c + n)]),
        query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()]),
        context_lens=torch.tensor(ctx), block_size=bs, query_lens=q_lens, context_lens_list=ctx,
        block_tables=torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32))
    q = torch.randn(sum(q_lens), heads, dim, generator=gen).to(dtype)
    return q, cache, meta


LAYOUTS = [  # (cached, new) per sequence, heads, kv heads, head dim, block size
    ([(c, 1) for c in (0, 5, 16, 17, 40, 63, 100, 31)], 8, 8, 64, 16),  # decode only, MHA
    ([(c, 1) for c in (3, 29, 8, 57)], 8, 2, 32, 5),  # GQA, a block size dividing nothing
    ([(c, 1) for c in (12, 1, 44)], 4, 1, 128, 16),  # MQA, 128-wide heads
    ([(0, 7), (5, 1), (9, 3), (0, 1), (12, 1), (30, 6)], 4, 2, 16, 4),  # prefill chunks mixed with decodes
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("layout", range(len(LAYOUTS)))
def test_kernel_matches_torch_reference(layout, window, threads, monkeypatch):
    lens, h, hkv, d, bs = LAYOUTS[layout]
    q, cache, meta = random_step(layout, lens, h, hkv, d, bs)
    monkeypatch.setattr(cpu_attention_module, "PARALLEL_GRAIN", 1)  # these small steps too take every thread
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = cpu_attention(q, cache, meta, window)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(out, torch_attention(q, cache, meta, window), rtol=1e-5, atol=1e-5)


def test_dispatch_writes_the_new_tokens_then_attends_like_torch():
    lens, h, hkv, d, bs = LAYOUTS[1]
    q, cache, meta = random_step(7, lens, h, hkv, d, bs)
    k, v = (torch.randn(len(lens), hkv, d) for _ in range(2))
    outs = []
    for backend in ("cpu", "torch"):
        pages = tuple(c.clone() for c in cache)
        meta.backend = backend
        outs.append(paged_attention(q[None], k[None], v[None], pages, meta, None))
        assert torch.equal(pages[0].view(-1, hkv, d)[meta.slot_mapping], k)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_other_dtypes_take_the_torch_path_unchanged():
    lens, h, hkv, d, bs = LAYOUTS[0]
    q, cache, meta = random_step(3, lens, h, hkv, d, bs, dtype=torch.bfloat16)
    assert torch.equal(cpu_attention(q, cache, meta, None), torch_attention(q, cache, meta, None))


def test_loading_the_kernel_keeps_denormals():
    """A library linked with -ffast-math would switch the process to flush-to-zero when loaded."""
    assert cpu_library() is not None
    tiny = torch.tensor([1e-39]) * 1.0
    assert tiny.item() != 0.0


@pytest.mark.parametrize("fused", [False, True], ids=["own-tensors", "views-into-qkv"])
def test_the_kernels_kv_write_equals_index_copy(fused):
    torch.manual_seed(0)
    n, h, hkv, d, blocks, bs = 5, 4, 2, 16, 6, 4
    if fused:  # k and v as the fused q/k/v product's views: rows (h + 2 hkv) * d apart
        qkv = torch.randn(n, (h + 2 * hkv) * d)
        _, k, v = qkv.split([h * d, hkv * d, hkv * d], dim=-1)
        k, v = k.view(n, hkv, d), v.view(n, hkv, d)
    else:
        k, v = torch.randn(n, hkv, d), torch.randn(n, hkv, d)
    slots = torch.tensor([3, -1, 17, 0, 22])  # -1: a padding row, skipped
    mine = tuple(torch.randn(blocks, bs, hkv, d) for _ in range(2))
    theirs = tuple(c.clone() for c in mine)
    assert cpu_attention_module.write_kv(mine, k, v, slots)
    write_kv(theirs, k, v, slots, may_skip=True)
    assert torch.equal(mine[0], theirs[0]) and torch.equal(mine[1], theirs[1])
    assert not cpu_attention_module.write_kv(mine, k.transpose(1, 2), v, slots)  # heads not contiguous: refused
