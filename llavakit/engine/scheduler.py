"""Scheduler: which sequences compute which tokens each step (continuous batching). Pure Python.

Policy, each step, within `max_num_batched_tokens` tokens and `max_num_seqs` running sequences (fewer
when the token budget is smaller, so that every running sequence can always decode):
1. Decodes first. Every RUNNING sequence with exactly one token left to compute gets that token, oldest
   admitted first. When the block manager has no room for it, the most recently admitted running sequence
   is preempted by recompute (its blocks freed, num_computed_tokens and num_cached_tokens reset to 0, its
   generated tokens kept) and put at the FRONT of the waiting queue; that may be the sequence itself.
2. Prefills with the budget left: first running sequences whose prompt is partially computed, then
   WAITING sequences in FIFO order (no skipping: a head that does not fit blocks those behind it) while
   there is room for another sequence and the block manager can allocate it. No sequence is admitted in
   a step that preempted one (it would only evict again). With `enable_chunked_prefill` a prompt is
   split into chunks of whatever budget is left, so a long AnyRes prompt never stalls others' decoding;
   without it a prompt is admitted only when all its uncached tokens fit in the budget (so the
   constructor requires max_num_batched_tokens >= max_model_len, else a prompt could wait forever).
A preempted sequence re-prefills all its tokens (prompt + generated; the prefix cache usually still holds
most of them) and samples at the end of that re-prefill: those logits give its next token.

Limits: a sequence holds at most `max_model_len` tokens, and at most as many as the whole KV cache holds
plus the one sampled last (its KV is never needed). `add` raises ValueError for a prompt that leaves no
room for one generated token; a sequence that reaches the limit finishes with reason "length".
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from llavakit.config import EngineConfig
from llavakit.engine.block_manager import BlockManager
from llavakit.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSeq:
    """One sequence's work in a step: tokens [start, start + num_tokens) are computed."""

    seq: Sequence
    start: int  # == seq.num_computed_tokens at schedule time
    num_tokens: int  # 1 for a decode; a prompt chunk for a prefill
    samples: bool  # the step reaches the end of the known tokens, so a token is sampled there


@dataclass(slots=True)
class ScheduledBatch:
    """A step's work and the sequences preempted to make room for it."""

    items: list[ScheduledSeq]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)

    @property
    def is_empty(self) -> bool:
        return not self.items


class Scheduler:
    """Waiting and running queues over one BlockManager (see the module docstring for the policy)."""

    def __init__(self, config: EngineConfig, block_manager: BlockManager, max_model_len: int):
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < max_model_len:
            raise ValueError(f"without chunked prefill max_num_batched_tokens ({config.max_num_batched_tokens}) "
                             f"must be at least max_model_len ({max_model_len}) so any prompt fits one step; "
                             "raise it, lower max_model_len or enable chunked prefill")
        self.config, self.block_manager = config, block_manager
        self.max_model_len = max_model_len
        # Every running sequence must be able to decode in one step, so a small budget caps the batch.
        self.max_running = min(config.max_num_seqs, config.max_num_batched_tokens)
        self.kv_capacity = block_manager.num_blocks * block_manager.block_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    @property
    def max_seq_len(self) -> int:
        """Most tokens a sequence may hold: the model limit, or the KV cache's plus the last sampled one."""
        return min(self.max_model_len, self.kv_capacity + 1)

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence; ValueError when its prompt leaves no room for a generated token."""
        if seq.num_tokens >= self.max_model_len:
            raise ValueError(f"the prompt is {seq.num_tokens} tokens but max_model_len is {self.max_model_len}; "
                             "it must leave room for at least one generated token")
        if seq.num_tokens > self.kv_capacity:
            raise ValueError(f"the prompt is {seq.num_tokens} tokens but the whole KV cache holds "
                             f"{self.kv_capacity}; give the cache more memory or shorten the prompt")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish (reason "abort") and free every sequence of a request, waiting or running."""
        seqs = [s for s in (*self.running, *self.waiting) if s.request_id == request_id]
        for seq in seqs:
            self.finish(seq, "abort")
        return seqs

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End seq now (also for stop strings, which only the engine sees) and free its blocks."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.block_manager.deallocate(seq)
        else:
            self.waiting.remove(seq)
        seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason

    def _preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and queue it first to recompute everything it has (generated tokens kept)."""
        self.running.remove(seq)
        self.block_manager.deallocate(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> ScheduledBatch:
        """Pick this step's work: decodes first, then prefill chunks (see the module docstring)."""
        cfg, bm = self.config, self.block_manager
        budget = cfg.max_num_batched_tokens
        items: list[ScheduledSeq] = []
        preempted: list[Sequence] = []

        # 1. Decodes, oldest first; victims are taken from the newest end of `running`.
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or seq.num_tokens - seq.num_computed_tokens != 1:
                continue  # preempted below as a victim, or still prefilling
            while not bm.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            bm.may_append(seq)
            items.append(ScheduledSeq(seq, seq.num_computed_tokens, 1, True))
            budget -= 1
        assert budget >= 0, "at most max_num_batched_tokens sequences run"

        # 2a. Continue partially prefilled running sequences (only chunked prefill leaves any).
        for seq in self.running:
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining <= 1 or budget == 0:
                continue
            chunk = min(remaining, budget)
            items.append(ScheduledSeq(seq, seq.num_computed_tokens, chunk, chunk == remaining))
            budget -= chunk

        # 2b. Admit waiting sequences, FIFO.
        while self.waiting and not preempted and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if not cfg.enable_chunked_prefill and seq.num_tokens - bm.cached_prefix_tokens(seq) > budget:
                break
            if not bm.can_allocate(seq):
                break
            self.waiting.popleft()
            bm.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            remaining = seq.num_tokens - seq.num_computed_tokens
            chunk = min(remaining, budget)
            items.append(ScheduledSeq(seq, seq.num_computed_tokens, chunk, chunk == remaining))
            budget -= chunk
        return ScheduledBatch(items, preempted)

    def update(self, batch: ScheduledBatch, sampled: dict[int, int]) -> list[Sequence]:
        """Record a computed step: advance computed counts, append sampled tokens (seq_id -> token),
        apply the stop rules that need no text; returns the sequences that finished (already freed)."""
        finished = []
        for item in batch.items:
            seq = item.seq
            if seq.is_finished:  # aborted after it was scheduled
                continue
            assert seq.num_computed_tokens == item.start, f"{seq} changed since it was scheduled at {item.start}"
            seq.num_computed_tokens += item.num_tokens
            self.block_manager.mark_computed(seq)
            if not item.samples:
                continue
            seq.append_token(sampled[seq.seq_id])
            reason = self._stop_reason(seq)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def _stop_reason(self, seq: Sequence) -> str | None:
        """Why seq ends after its last token: EOS (unless ignore_eos) or a stop token id -> "stop";
        max_tokens or the length limit -> "length"; None to go on."""
        token, params = seq.token_ids[-1], seq.params
        if (token in seq.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            return "stop"
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_seq_len:
            return "length"
        return None
