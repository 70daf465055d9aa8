"""The synchronous engine: requests in, one scheduled step at a time, outputs out.

A request is a `PromptInputs` (built by `PromptProcessor`: ids with every placeholder run expanded, the
images and videos in prompt order, the template's stop string) and its `SamplingParams`. `llavakit.LLM`
(llavakit/llm.py) is the offline batch API on top; the server's AsyncLLMEngine the online one.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from llavakit.config import EngineConfig
from llavakit.engine.block_manager import BlockManager
from llavakit.engine.model_runner import make_runner
from llavakit.engine.scheduler import Scheduler
from llavakit.engine.sequence import MediaSpan, Sequence
from llavakit.layers.sampler import sample_batch
from llavakit.models.llava import LlavaForConditionalGeneration
from llavakit.processing.detokenizer import TextStream
from llavakit.processing.prompt import Media, PromptInputs
from llavakit.sampling import SamplingParams


@dataclass(slots=True)
class CompletionOutput:
    """One of a request's n answers."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list | None = None


@dataclass(slots=True)
class RequestOutput:
    """A request's state after a step: `outputs[i]` grows as tokens arrive; `finished` at the end."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids


@dataclass(slots=True)
class EngineStats:
    """Sequences waiting and running, KV blocks in use (free prefix-cached blocks count as free)."""

    num_waiting: int
    num_running: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total


@dataclass
class _Track:
    """Per-sequence state beside the scheduler's: the answer's text stream and the sampling state."""

    seq: Sequence
    index: int
    text: TextStream
    generator: torch.Generator | None
    counts: Counter = field(default_factory=Counter)
    logprobs: list = field(default_factory=list)


class LLMEngine:
    """Continuous batching over one loaded model: add_request / abort / step."""

    def __init__(self, model: LlavaForConditionalGeneration, tokenizer: Any, cfg: EngineConfig | None = None):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg or EngineConfig()
        context = model.cfg.text.context_length
        self.max_model_len = min(self.cfg.max_model_len or context, context)
        self.runner = make_runner(model, self.cfg, self.max_model_len)
        self.block_manager = BlockManager(self.runner.num_blocks, self.cfg.block_size, self.cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.cfg, self.block_manager, self.max_model_len)
        self.eos = {i for i in model.cfg.text.eos_token_ids + [tokenizer.eos_token_id] if i is not None}
        self._ids = itertools.count()
        self._tracks: dict[int, _Track] = {}
        self._requests: dict[str, RequestOutput] = {}
        self._media: dict[str, Media] = {}
        self._request_media: dict[str, list[str]] = {}

    def new_request_id(self, prefix: str = "request") -> str:
        return f"{prefix}-{next(self._ids)}"

    def add_request(self, request_id: str, inputs: PromptInputs, params: SamplingParams | None = None) -> None:
        """Queue a request: its prompt (see the module docstring) and how to sample it."""
        params = params or SamplingParams()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = inputs.ids
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt is {len(ids)} tokens but the model's context is {self.max_model_len}; "
                             "shorten the text or use fewer / smaller images (or fewer video frames)")
        hashes = inputs.hashes()
        self._media.update(zip(hashes, inputs.media, strict=True))
        self._request_media[request_id] = hashes
        spans = [MediaSpan(start, length, h) for (start, length), h in zip(inputs.spans, hashes, strict=True)]
        self._requests[request_id] = RequestOutput(request_id, ids, [CompletionOutput(i) for i in range(params.n)])
        stops = list(params.stop) + ([inputs.stop] if inputs.stop else [])
        eos = frozenset() if params.ignore_eos else frozenset(self.eos)
        for i in range(params.n):
            seq = Sequence(next(self._ids), request_id, ids, params, spans, eos)
            seed = None if params.seed is None else params.seed + i
            generator = torch.Generator(self.runner.device).manual_seed(seed) if seed is not None else None
            text = TextStream(self.tokenizer, stops, eos | set(params.stop_token_ids))
            self._tracks[seq.seq_id] = _Track(seq, i, text, generator)
            self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks."""
        for seq in self.scheduler.abort(request_id):
            self._tracks.pop(seq.seq_id, None)
        self._forget(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        """Queue, batch and KV-cache occupancy now (for a server's metrics; plain ints, safe to read from
        another thread between steps or during one)."""
        bm = self.block_manager
        return EngineStats(len(self.scheduler.waiting), len(self.scheduler.running),
                           bm.num_blocks - bm.num_free_blocks, bm.num_blocks, self.scheduler.num_preemptions)

    def step(self) -> list[RequestOutput]:
        """Run one scheduled step; returns the requests whose output changed (finished ones last time)."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            return []
        seq_ids, logits = self.runner.execute(batch, self._media)
        tracks = [self._tracks[i] for i in seq_ids]
        tokens, logprobs = sample_batch(
            logits, [t.seq.params for t in tracks],
            [t.seq.token_ids for t in tracks], [t.counts for t in tracks], [t.generator for t in tracks])
        done = {seq.seq_id: seq for seq in self.scheduler.update(batch, dict(zip(seq_ids, tokens, strict=True)))}
        changed = {}
        for track, token, lp in zip(tracks, tokens, logprobs, strict=True):
            self._on_token(track, token, lp)
            changed[track.seq.request_id] = self._requests[track.seq.request_id]
            if track.text.stopped and track.seq.seq_id not in done:  # a stop string ended it
                self.scheduler.finish(track.seq, "stop")
                done[track.seq.seq_id] = track.seq
        for seq in done.values():
            changed[seq.request_id] = self._finish(seq)
        return list(changed.values())

    def _on_token(self, track: _Track, token: int, logprob) -> None:
        track.counts[token] += 1
        if logprob is not None:
            track.logprobs.append(logprob)
        if track.text.stopped:
            return
        track.text.push(token)
        out = self._requests[track.seq.request_id].outputs[track.index]
        out.text = track.text.visible
        out.token_ids = list(track.seq.output_token_ids)

    def _finish(self, seq: Sequence) -> RequestOutput:
        track = self._tracks.pop(seq.seq_id)
        req = self._requests[seq.request_id]
        out = req.outputs[track.index]
        out.text = track.text.text
        out.token_ids, out.finish_reason = list(seq.output_token_ids), seq.finish_reason
        out.logprobs = track.logprobs if seq.params.logprobs is not None else None
        req.num_cached_tokens = max(req.num_cached_tokens, seq.num_cached_tokens)
        if all(o.finish_reason for o in req.outputs):
            req.finished = True
            self._forget(seq.request_id)
        return req

    def _forget(self, request_id: str) -> None:
        """Drop a finished or aborted request and the media no other live request uses."""
        self._requests.pop(request_id, None)
        live = {h for r, hs in self._request_media.items() if r != request_id for h in hs}
        for h in self._request_media.pop(request_id, []):
            if h not in live:
                self._media.pop(h, None)
