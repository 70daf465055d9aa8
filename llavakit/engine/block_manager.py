"""BlockManager: which KV-cache blocks each sequence owns, with ref-counted prefix caching. Pure Python.

A block is in one of three states: used (ref count > 0), free and cached (ref count 0 but its hash still
findable, so a later sequence with the same prefix reuses its KV), or free and blank. Allocation takes
blank blocks first, then evicts free cached blocks least recently freed first (LRU).

A block's hash is registered only once its KV has been computed (`mark_computed`), never at allocation:
with chunked prefill a prompt's blocks are allocated long before they are filled, and a sequence that
matched an unfilled block would attend to garbage.
"""

from __future__ import annotations

from collections import deque

from llavakit.engine.sequence import Sequence


class BlockManager:
    """Owns the block ids 0..num_blocks-1 of the KV cache."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self._free_blank: deque[int] = deque(range(num_blocks))
        self._free_cached: dict[int, None] = {}  # insertion order = LRU order
        self.cache_queries = 0  # full prompt blocks looked up by allocate()
        self.cache_hits = 0  # of those, blocks reused from the cache

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blank) + len(self._free_cached)

    def _blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids of the longest cached prefix of seq's tokens, leaving its last token to compute."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for h in seq.block_hashes(self.block_size):
            block = self.hash_to_block.get(h)
            if block is None:
                break
            hits.append(block)
        if len(hits) * self.block_size >= seq.num_tokens:  # logits of the last token are still needed
            hits.pop()
        return hits

    def cached_prefix_tokens(self, seq: Sequence) -> int:
        """Tokens that allocate() would take from the prefix cache right now."""
        return len(self._cached_prefix(seq)) * self.block_size

    def can_allocate(self, seq: Sequence) -> bool:
        """Enough free blocks for all of seq's tokens, counting reusable cached blocks as owned."""
        hits = self._cached_prefix(seq)
        free_hits = sum(1 for b in hits if self.ref_counts[b] == 0)
        need = self._blocks_needed(seq.num_tokens) - len(hits)
        return self.num_free_blocks - free_hits >= need

    def allocate(self, seq: Sequence) -> None:
        """Give seq blocks for all its tokens, reusing the cached prefix; sets its computed/cached counts."""
        assert not seq.block_table, f"{seq} already holds blocks"
        hits = self._cached_prefix(seq)
        self.cache_queries += len(seq.block_hashes(self.block_size)) if self.enable_prefix_caching else 0
        self.cache_hits += len(hits)
        for block in hits:
            if self.ref_counts[block] == 0:
                del self._free_cached[block]
            self.ref_counts[block] += 1
        fresh = [self._take_block() for _ in range(self._blocks_needed(seq.num_tokens) - len(hits))]
        seq.block_table = hits + fresh
        seq.num_cached_tokens = seq.num_computed_tokens = len(hits) * self.block_size

    def _take_block(self) -> int:
        """A free block with ref count 1: a blank one, else the least recently freed cached one."""
        if self._free_blank:
            block = self._free_blank.popleft()
        else:
            block = next(iter(self._free_cached))
            del self._free_cached[block]
            self._forget_hash(block)
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        return block

    def _forget_hash(self, block: int) -> None:
        h, self.block_hash[block] = self.block_hash[block], None
        if h is not None and self.hash_to_block.get(h) == block:
            del self.hash_to_block[h]

    def can_append(self, seq: Sequence) -> bool:
        """Room for KV of all seq's tokens: its blocks already cover them, or a block is free."""
        return len(seq.block_table) * self.block_size >= seq.num_tokens or self.num_free_blocks > 0

    def may_append(self, seq: Sequence) -> None:
        """After a token was appended: give seq a new block when its last one is full."""
        if len(seq.block_table) * self.block_size < seq.num_tokens:
            seq.block_table.append(self._take_block())
        assert len(seq.block_table) * self.block_size >= seq.num_tokens

    def mark_computed(self, seq: Sequence) -> None:
        """Register the hashes of seq's full blocks whose KV is now computed, so others can reuse them."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        first = full
        while first > 0 and self.block_hash[seq.block_table[first - 1]] is None:
            first -= 1
        if first == full:
            return
        hashes = seq.block_hashes(self.block_size)
        for i in range(first, full):
            block, h = seq.block_table[i], hashes[i]
            self.block_hash[block] = h
            self.hash_to_block.setdefault(h, block)  # an equal block computed earlier stays the one found

    def deallocate(self, seq: Sequence) -> None:
        """Release seq's blocks; the ones whose hash is findable stay cached until evicted."""
        for block in reversed(seq.block_table):  # the tail first, so LRU evicts a prefix's end first
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                self._release(block)
        seq.block_table = []

    def _release(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None and self.hash_to_block.get(h) == block:
            self._free_cached[block] = None
        else:
            self.block_hash[block] = None
            self._free_blank.append(block)
