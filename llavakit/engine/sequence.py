"""Sequence: one generation stream's tokens, media (images and videos) and KV bookkeeping, plus the block
hashes that prefix caching matches on. Pure Python (no torch), so the scheduler and block manager are testable
alone.

A block's hash chains the previous block's hash with the block's token ids and, for every image or video
whose placeholder tokens overlap the block, its content hash and the overlap's offsets. Placeholder ids are
the same for every item, so without the content hash two different images would share KV blocks.
"""

from __future__ import annotations

import enum
import hashlib
from array import array
from dataclasses import dataclass


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(slots=True)
class MediaSpan:
    """One image's or video's run of placeholder tokens inside a sequence."""

    start: int  # position of its first placeholder token
    length: int  # number of placeholder tokens (= its number of image or video features)
    content_hash: str  # hex digest of the content (distinct images or videos -> distinct hashes)


def block_hash(prev: int | None, token_ids: list[int], media: list[tuple[MediaSpan, int, int]],
               block_start: int) -> int:
    """128-bit hash of one full block, chained on `prev` (None for the first block)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(b"-" if prev is None else prev.to_bytes(16, "little"))
    h.update(array("q", token_ids).tobytes())
    for span, a, b in media:
        h.update(f"|{span.content_hash}:{a}:{b}@{span.start + a - block_start}".encode())
    return int.from_bytes(h.digest(), "little")


class Sequence:
    """Prompt + generated tokens of one output stream, with its place in the KV cache."""

    def __init__(self, seq_id: int, request_id: str, prompt_token_ids: list[int], params,
                 media: list[MediaSpan] = (), eos_token_ids: set[int] = frozenset()):
        if not prompt_token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.seq_id, self.request_id, self.params = seq_id, request_id, params
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.media = sorted(media, key=lambda s: s.start)
        for span in self.media:
            if span.start < 0 or span.length < 1 or span.start + span.length > self.num_prompt_tokens:
                raise ValueError(f"media span [{span.start}, {span.start + span.length}) lies outside the "
                                 f"{self.num_prompt_tokens}-token prompt")
        self.eos_token_ids = frozenset(eos_token_ids)
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0  # tokens whose KV is in the cache (prefix-cache hits included)
        self.num_cached_tokens = 0  # how many of those came from the prefix cache
        self.finish_reason: str | None = None
        self._hashes: list[int] = []
        self._hash_block_size = 0

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, {self.status.name}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def media_in(self, start: int, end: int) -> list[tuple[MediaSpan, int, int]]:
        """Image spans overlapping token range [start, end), each with the overlap as [a, b) offsets into
        the span (so its features [a:b] belong to this range)."""
        out = []
        for span in self.media:
            a, b = max(start, span.start), min(end, span.start + span.length)
            if a < b:
                out.append((span, a - span.start, b - span.start))
        return out

    def block_hashes(self, block_size: int) -> list[int]:
        """One chained hash per full block of token_ids (a copy; computed incrementally, tokens only grow)."""
        if block_size != self._hash_block_size:
            self._hashes, self._hash_block_size = [], block_size
        for i in range(len(self._hashes), self.num_tokens // block_size):
            start = i * block_size
            prev = self._hashes[-1] if self._hashes else None
            ids = self.token_ids[start:start + block_size]
            self._hashes.append(block_hash(prev, ids, self.media_in(start, start + block_size), start))
        return list(self._hashes)
