"""Decode steps replayed from CUDA graphs: one graph per batch-size bucket, captured once at start-up.

A decode step runs the same kernels every time; only the token ids, positions, KV slots, context lengths
and block tables change. Those live in static device buffers that a step fills with one copy each, then
the bucket's graph is replayed: one launch instead of several hundred, which is what lets a batch-1
decode run at the GPU's memory speed rather than Python's launch speed.

A step of S sequences runs in the smallest bucket >= S. The padding rows are harmless: their KV write
goes to a spare block outside the block manager's range (the "trash" block), they attend to one slot
of it, and their logits are dropped. The triton attention backend reads lengths and tables from device
tensors, so the captured kernels stay right for any lengths; the torch backend sizes its tensors from
Python lists and cannot be captured.

`capture=False` runs the same padded static-buffer step eagerly: the CPU tests check the padding and
buffer logic with it, and the GPU run compares the captured graphs against it.
"""

from __future__ import annotations

import torch

from llavakit.layers.attention import PagedAttentionMetadata


def buckets_up_to(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8, up to and including max_batch (as vLLM sizes them)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return sorted(set(sizes) | {max_batch})


class DecodeGraphs:
    """Static buffers and (on CUDA) one captured graph per bucket for steps of single-token rows."""

    def __init__(self, model, kv_cache, backend: str, block_size: int, trash_block: int, max_batch: int,
                 max_blocks_per_seq: int, capture: bool):
        self.model, self.kv_cache, self.backend = model, kv_cache, backend
        self.block_size, self.trash_block = block_size, trash_block
        self.buckets = buckets_up_to(max_batch)
        self.max_batch = max_batch
        dev = model.device
        # rows: token id, position, KV slot, context length; padding rows point at the trash block
        self.rows = torch.zeros(4, max_batch, dtype=torch.long, device=dev)
        self.rows[2] = trash_block * block_size
        self.rows[3] = 1
        self.tables = torch.full((max_batch, max_blocks_per_seq), trash_block, dtype=torch.int32, device=dev)
        self.query_start = torch.arange(max_batch + 1, dtype=torch.long, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.captured = False
        self.steps = 0  # steps run through the buffers (replays when captured)
        if capture:
            self._capture()

    def bucket(self, n: int) -> int:
        return next(b for b in self.buckets if b >= n)

    def _forward(self, b: int, context_lens: list[int]) -> torch.Tensor:
        """The padded step over the static buffers' first b rows -> logits (b, V) in the model's dtype."""
        ids, positions, slots, ctx = self.rows[:, :b]
        meta = PagedAttentionMetadata(
            slot_mapping=slots, query_start_loc=self.query_start[:b + 1], context_lens=ctx,
            block_tables=self.tables[:b], block_size=self.block_size, query_lens=[1] * b,
            context_lens_list=context_lens, may_skip_slots=False, backend=self.backend, decode_only=True,
            max_context_bound=self.tables.shape[1] * self.block_size)
        embeds = self.model.language_model.embed_tokens(ids)[None]
        hidden = self.model(embeds, positions[None], self.kv_cache, meta)
        return self.model.compute_logits(hidden[0])

    @torch.inference_mode()
    def _capture(self) -> None:
        """Capture every bucket, largest first, all in one memory pool; warm up each once beforehand."""
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream: cuBLAS handles, Triton compilation
            for b in self.buckets:
                self._forward(b, [1] * b)
        torch.cuda.current_stream().wait_stream(stream)
        for b in reversed(self.buckets):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self._forward(b, [1] * b)  # lengths come from the buffers at replay
            self.graphs[b] = graph
        torch.cuda.synchronize()
        self.captured = True

    @torch.inference_mode()
    def run(self, token_ids: list[int], positions: list[int], slots: list[int],
            block_tables: list[list[int]]) -> torch.Tensor:
        """Fill the buffers with a step's rows (one decode token each), replay their bucket -> logits
        (rows, V), float32."""
        s = len(token_ids)
        b = self.bucket(s)
        pad = b - s
        context = [p + 1 for p in positions]
        rows = (token_ids, positions, slots, context)
        host = torch.tensor([r + [fill] * pad for r, fill in
                             zip(rows, (0, 0, self.trash_block * self.block_size, 1), strict=True)])
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [self.trash_block] * (width - len(t)) for t in block_tables], dtype=torch.int32)
        self.rows[:, :b].copy_(host, non_blocking=True)
        self.tables[:s, :width].copy_(tables, non_blocking=True)
        self.steps += 1
        if self.captured:
            self.graphs[b].replay()
            logits = self.outputs[b]
        else:
            logits = self._forward(b, context + [1] * pad)
        return logits[:s].to(torch.float32, copy=True)
