"""Paged attention against a dense reference: each sequence's full K/V concatenated, causal softmax by hand.

Blocks are shuffled (non-contiguous), heads are grouped (H=4, H_kv=2), batches mix prefill chunks with
decodes, one sequence shares a prefix block with another, and some caches were filled by earlier calls.
"""

from __future__ import annotations

import math

import pytest
import torch

from llavakit.layers.attention import Attention, AttentionMetadata, PagedAttentionMetadata, paged_attention
from llavakit.layers.paged_attention import decode_batched, varlen_loop, write_kv

H, HKV, D, BS, NUM_BLOCKS = 4, 2, 8, 4, 80


def dense_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None) -> torch.Tensor:
    """q (T, H, D) are the last T positions of k/v (L, H_kv, D) -> (T, H, D), written out in full."""
    t, length = q.shape[0], k.shape[0]
    k, v = k.repeat_interleave(H // HKV, dim=1), v.repeat_interleave(H // HKV, dim=1)  # (L, H, D)
    scores = torch.einsum("thd,lhd->htl", q, k) / math.sqrt(D)
    q_pos = torch.arange(length - t, length)[:, None]
    k_pos = torch.arange(length)[None, :]
    allowed = (k_pos <= q_pos) & ((k_pos > q_pos - window) if window else True)
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("htl,lhd->thd", probs, v)


class Batch:
    """Sequences given as (cached, new) lengths, their full K/V, and shuffled block tables."""

    def __init__(self, lens: list[tuple[int, int]], share_first_block: dict[int, int] | None = None):
        gen = torch.Generator().manual_seed(1)
        free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
        self.lens = lens
        self.k = [torch.randn(c + n, HKV, D, generator=gen) for c, n in lens]
        self.v = [torch.randn(c + n, HKV, D, generator=gen) for c, n in lens]
        self.q = [torch.randn(n, H, D, generator=gen) for _, n in lens]
        self.tables = [[free.pop() for _ in range(-(-(c + n) // BS))] for c, n in lens]
        for seq, owner in (share_first_block or {}).items():  # prefix caching: same block, same content
            self.tables[seq][0] = self.tables[owner][0]
            self.k[seq][:BS], self.v[seq][:BS] = self.k[owner][:BS], self.v[owner][:BS]
        self.cache = (torch.zeros(NUM_BLOCKS, BS, HKV, D), torch.zeros(NUM_BLOCKS, BS, HKV, D))

    def slot(self, seq: int, pos: int) -> int:
        return self.tables[seq][pos // BS] * BS + pos % BS

    def write_cached(self) -> None:
        """Store the already-cached tokens, as earlier steps would have."""
        for i, (c, _) in enumerate(self.lens):
            slots = torch.tensor([self.slot(i, p) for p in range(c)], dtype=torch.long)
            write_kv(self.cache, self.k[i][:c], self.v[i][:c], slots)

    def meta(self, backend: str = "torch", pad_tokens: int = 0) -> PagedAttentionMetadata:
        slots = [self.slot(i, p) for i, (c, n) in enumerate(self.lens) for p in range(c, c + n)] + [-1] * pad_tokens
        width = max(len(t) for t in self.tables) + 1
        tables = torch.tensor([t + [-1] * (width - len(t)) for t in self.tables], dtype=torch.int32)
        q_lens, ctx = [n for _, n in self.lens], [c + n for c, n in self.lens]
        return PagedAttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long),
            query_start_loc=torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32),
            context_lens=torch.tensor(ctx, dtype=torch.int32), block_tables=tables, block_size=BS,
            query_lens=q_lens, context_lens_list=ctx, backend=backend)

    def new_tokens(self, pad_tokens: int = 0):
        """Flat (1, N, ., D) q/k/v of this step's new tokens, padding tokens last."""
        pad_q, pad_kv = torch.randn(pad_tokens, H, D), torch.randn(pad_tokens, HKV, D)
        q = torch.cat([*self.q, pad_q])
        k = torch.cat([k[c:] for k, (c, _) in zip(self.k, self.lens, strict=True)] + [pad_kv])
        v = torch.cat([v[c:] for v, (c, _) in zip(self.v, self.lens, strict=True)] + [pad_kv])
        return q[None], k[None], v[None]

    def reference(self, window: int | None) -> torch.Tensor:
        return torch.cat([dense_reference(q, k, v, window) for q, k, v in zip(self.q, self.k, self.v, strict=True)])


MIXED = [(0, 7), (5, 1), (9, 3), (0, 1), (12, 1), (3, 6)]


@pytest.mark.parametrize("window", [None, 3, 6])
def test_mixed_batch_matches_dense(window):
    batch = Batch(MIXED, share_first_block={4: 2})
    batch.write_cached()
    q, k, v = batch.new_tokens()
    out = paged_attention(q, k, v, batch.cache, batch.meta(), window)
    assert out.shape == (1, q.shape[1], H * D)
    torch.testing.assert_close(out[0].view(-1, H, D), batch.reference(window), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
def test_chunked_prefill_over_two_steps(window):
    """Step 1 writes the first chunks; step 2 sees them only through the cache."""
    final = Batch([(0, 10), (0, 6), (0, 3)])
    first = [(0, 6), (0, 6), (0, 2)]
    step1 = Batch(first)
    step1.k = [k[:c + n] for k, (c, n) in zip(final.k, first, strict=True)]
    step1.v = [v[:c + n] for v, (c, n) in zip(final.v, first, strict=True)]
    step1.q = [q[:n] for q, (_, n) in zip(final.q, first, strict=True)]
    step1.tables, step1.cache = final.tables, final.cache
    q, k, v = step1.new_tokens()
    out1 = paged_attention(q, k, v, step1.cache, step1.meta(), window)
    torch.testing.assert_close(out1[0].view(-1, H, D), step1.reference(window), atol=1e-5, rtol=1e-5)

    final.lens = [(6, 4), (6, 0), (2, 1)]  # the second sequence has nothing new this step
    final.q = [q[c:] for q, (c, _) in zip(final.q, final.lens, strict=True)]
    final.q[1] = final.q[1][:0]
    q, k, v = final.new_tokens()
    out2 = paged_attention(q, k, v, final.cache, final.meta(), window)
    torch.testing.assert_close(out2[0].view(-1, H, D), final.reference(window), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 4])
def test_decode_batched_equals_loop_and_dense(window):
    batch = Batch([(0, 1), (6, 1), (13, 1), (2, 1), (20, 1)], share_first_block={2: 4})
    batch.write_cached()
    q, k, v = batch.new_tokens(pad_tokens=2)
    meta = batch.meta(pad_tokens=2)
    assert meta.decode_only and meta.max_context_len == 21
    write_kv(batch.cache, k[0], v[0], meta.slot_mapping)
    fast, loop = decode_batched(q[0], batch.cache, meta, window), varlen_loop(q[0], batch.cache, meta, window)
    torch.testing.assert_close(fast, loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[:5], batch.reference(window), atol=1e-5, rtol=1e-5)
    assert torch.equal(fast[5:], torch.zeros(2, H, D))  # padding tokens attend to nothing


def test_write_respects_slot_minus_one():
    cache = (torch.full((4, BS, HKV, D), 7.0), torch.full((4, BS, HKV, D), 7.0))
    k, v = torch.randn(3, HKV, D), torch.randn(3, HKV, D)
    write_kv(cache, k, v, torch.tensor([5, -1, 14]))
    flat_k, flat_v = cache[0].view(-1, HKV, D), cache[1].view(-1, HKV, D)
    assert torch.equal(flat_k[5], k[0]) and torch.equal(flat_k[14], k[2]) and torch.equal(flat_v[14], v[2])
    untouched = torch.ones(4 * BS, dtype=torch.bool)
    untouched[[5, 14]] = False
    assert (flat_k[untouched] == 7).all() and (flat_v[untouched] == 7).all()


def test_attention_module_dispatches_on_metadata():
    """The model's unchanged call `self.attn(q, k, v, cache, meta)` takes either kind of metadata."""
    attn = Attention(H, HKV, D, sliding_window=5)
    batch = Batch([(4, 3), (8, 1)])
    batch.write_cached()
    q, k, v = batch.new_tokens()
    out = attn(q, k, v, batch.cache, batch.meta())
    torch.testing.assert_close(out[0].view(-1, H, D), batch.reference(5), atol=1e-5, rtol=1e-5)
    # the contiguous path is still there: one sequence, all positions at once
    qd, kd, vd = torch.randn(1, 6, H, D), torch.randn(1, 6, HKV, D), torch.randn(1, 6, HKV, D)
    dense = attn(qd, kd, vd, None, AttentionMetadata())
    torch.testing.assert_close(dense[0].view(6, H, D), dense_reference(qd[0], kd[0], vd[0], 5), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_llama_decoder_gives_the_same_hidden_states_with_either_cache():
    """Two sequences prefilled together then decoded together through the unchanged model code."""
    from llavakit.config import TextConfig
    from llavakit.layers.attention import KVCache
    from llavakit.models.llama import LlamaModel

    cfg = TextConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=H, num_key_value_heads=HKV, sliding_window=5)
    model = LlamaModel(cfg).eval()
    lens, embeds = [7, 4], [torch.randn(8, 32), torch.randn(5, 32)]  # prompt + one decoded token each
    want = []
    for n, x in zip(lens, embeds, strict=True):
        cache = KVCache(2, 1, HKV, 16, D, torch.float32, "cpu")
        pre = model(x[None, :n], torch.arange(n)[None], cache, AttentionMetadata(0))
        dec = model(x[None, n:], torch.tensor([[n]]), cache, AttentionMetadata(n))
        want.append((pre[0], dec[0]))
    pages = [(torch.zeros(NUM_BLOCKS, BS, HKV, D), torch.zeros(NUM_BLOCKS, BS, HKV, D)) for _ in range(2)]
    for step, seq_lens in enumerate([[(0, 7), (0, 4)], [(7, 1), (4, 1)]]):
        batch = Batch(seq_lens)
        batch.tables = [[3, 9], [30, 1]]
        x = torch.cat([e[c:c + n] for e, (c, n) in zip(embeds, seq_lens, strict=True)])[None]
        positions = torch.cat([torch.arange(c, c + n) for c, n in seq_lens])[None]
        meta = batch.meta()
        assert meta.decode_only == (step == 1)
        out = model(x, positions, pages, meta)[0]
        torch.testing.assert_close(out, torch.cat([w[step] for w in want]), atol=1e-5, rtol=1e-5)


def test_unknown_backend_and_bad_metadata_raise():
    batch = Batch([(0, 2)])
    q, k, v = batch.new_tokens()
    with pytest.raises(ValueError, match="unknown paged attention backend 'nope'"):
        paged_attention(q, k, v, batch.cache, batch.meta(backend="nope"), None)
    with pytest.raises(ValueError, match="more new tokens than context"):
        PagedAttentionMetadata(torch.zeros(3), torch.zeros(2), torch.zeros(1), torch.zeros(1, 1), BS, [3], [2])
    with pytest.raises(ValueError, match="decode_only=True but query_lens are \\[2\\]"):
        PagedAttentionMetadata(torch.zeros(2), torch.zeros(2), torch.zeros(1), torch.zeros(1, 1), BS, [2], [2],
                               decode_only=True)


def _backend_against_torch(backend: str, device: str, window: int | None, lens=MIXED, pad_tokens: int = 1,
                           dtype=torch.float32, atol: float = 2e-5):
    batch = Batch(lens, share_first_block={4: 2})
    batch.write_cached()
    batch.cache = tuple(c.to(device, dtype) for c in batch.cache)
    q, k, v = (x.to(device, dtype) for x in batch.new_tokens(pad_tokens=pad_tokens))
    meta_torch, meta_other = batch.meta(pad_tokens=pad_tokens), batch.meta(backend, pad_tokens=pad_tokens)
    for meta in (meta_torch, meta_other):
        for name in ("slot_mapping", "query_start_loc", "context_lens", "block_tables"):
            setattr(meta, name, getattr(meta, name).to(device))
    cache_before = tuple(c.clone() for c in batch.cache)
    ref = paged_attention(q, k, v, batch.cache, meta_torch, window)
    batch.cache = cache_before  # the second call writes the same new keys again, from the same start
    out = paged_attention(q, k, v, batch.cache, meta_other, window)
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-5 if dtype == torch.float32 else 1e-2)
    return out


def _flex_against_torch(device: str, window: int | None):
    _backend_against_torch("flex", device, window)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("window", [None, 3])
def test_flex_backend_matches_torch_on_cpu(window):
    """FlexAttention in eager mode: the mask logic (inverse page table, shared blocks, padding)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    _flex_against_torch("cpu", window)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 3])
def test_flex_backend_matches_torch_on_cuda(window):
    """The compiled FlexAttention kernel on the GPU against the torch path."""
    _flex_against_torch("cuda", window)


DECODES = [(0, 1), (6, 1), (13, 1), (2, 1), (70, 1), (130, 1)]  # contexts past one 64-position tile


@pytest.mark.parametrize("window", [None, 3, 100])
@pytest.mark.parametrize("lens", [DECODES, MIXED], ids=["decode", "mixed"])
def test_triton_backend_matches_torch_interpreted(interpreted_triton, window, lens):
    """The kernel's indexing (block tables, GQA, window, padding rows, mixed steps) on the CPU interpreter."""
    out = _backend_against_torch("triton", "cpu", window, lens, pad_tokens=2)
    assert torch.equal(out[0, -2:], torch.zeros(2, H * D))  # padding tokens attend to nothing


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 3, 100])
@pytest.mark.parametrize("lens", [DECODES, MIXED], ids=["decode", "mixed"])
def test_triton_backend_matches_torch_on_cuda(window, lens, dtype):
    pytest.importorskip("triton")
    _backend_against_torch("triton", "cuda", window, lens, pad_tokens=2, dtype=dtype,
                           atol=2e-5 if dtype == torch.float32 else 2e-2)


def _split_decode_against_torch(device: str, splits: int, window: int | None, dtype=torch.float32):
    from llavakit.layers.triton_attention import paged_decode

    batch = Batch(DECODES, share_first_block={4: 2})
    batch.write_cached()
    batch.cache = tuple(c.to(device, dtype) for c in batch.cache)
    q, k, v = (x.to(device, dtype) for x in batch.new_tokens())
    meta = batch.meta()
    for name in ("slot_mapping", "query_start_loc", "context_lens", "block_tables"):
        setattr(meta, name, getattr(meta, name).to(device))
    ref = paged_attention(q, k, v, batch.cache, meta, window)[0].view(-1, H, D)
    rows = torch.arange(len(DECODES), device=device, dtype=torch.int32)
    out = torch.full_like(q[0], float("nan"))  # every row must be written
    paged_decode(q[0], batch.cache, rows, meta.block_tables, meta.context_lens, window, out, splits=splits)
    torch.testing.assert_close(out, ref, atol=2e-5 if dtype == torch.float32 else 2e-2, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 3, 100])
@pytest.mark.parametrize("splits", [2, 8])
def test_triton_context_splits_interpreted(interpreted_triton, splits, window):
    """Contexts cut into parts (some empty: 8 parts of a 1-token context) merge to the same attention."""
    _split_decode_against_torch("cpu", splits, window)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("window", [None, 3, 100])
@pytest.mark.parametrize("splits", [1, 2, 8, 16])
def test_triton_context_splits_on_cuda(splits, window):
    pytest.importorskip("triton")
    _split_decode_against_torch("cuda", splits, window)


@torch.no_grad()
def test_fused_projections_give_the_same_outputs_and_keep_the_parameters():
    from llavakit.config import TextConfig
    from llavakit.models.llama import LlamaModel, fuse_projections

    cfg = TextConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=H, num_key_value_heads=HKV)
    model = LlamaModel(cfg).eval()
    x, pos = torch.randn(1, 5, 32), torch.arange(5)[None]
    want = model(x, pos, None, AttentionMetadata())
    names = {n: p.clone() for n, p in model.named_parameters()}
    assert fuse_projections(model) == 4
    assert fuse_projections(model) == 0  # a second engine on the same model finds them fused
    assert model.layers[0].self_attn.qkv_weight.shape == (H * D + 2 * HKV * D, 32)
    torch.testing.assert_close(model(x, pos, None, AttentionMetadata()), want, atol=1e-6, rtol=1e-6)
    assert {n: p for n, p in model.named_parameters()}.keys() == names.keys()
    assert all(torch.equal(p, names[n]) for n, p in model.named_parameters())
    model.layers[0].mlp.up_proj.weight.mul_(2)  # the Linear weights are views: the fused copy follows
    assert torch.equal(model.layers[0].mlp.gate_up_weight[64:], model.layers[0].mlp.up_proj.weight)
