"""The synchronous engine: requests in, one scheduled step at a time, outputs out; and `LLM`, the offline
batch API on top of it.

A request is {"prompt": str, "images": [...], "videos": [...], "conv_mode": None | "raw" | name} (the
meaning of `Pipeline.generate`), {"messages": [...], "images": [...], "videos": [...]} (of
`Pipeline.chat`), or {"prompt_token_ids": [...], "images": [...], "videos": [...]} (ids already expanded,
for benchmarks). "images" and "videos" are optional.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from llavakit.config import EngineConfig
from llavakit.engine.block_manager import BlockManager
from llavakit.engine.model_runner import ModelRunner, num_kv_blocks
from llavakit.engine.scheduler import Scheduler
from llavakit.engine.sequence import ImageSpan, Sequence
from llavakit.generation import find_stop, partial_stop_length
from llavakit.layers.sampler import sample_batch
from llavakit.pipeline import Pipeline
from llavakit.processing.detokenizer import IncrementalDetokenizer
from llavakit.processing.prompt import Media, PreparedImage, PreparedVideo
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


def image_hash(image: Media) -> str:
    """Content hash of a preprocessed image (pixels and original size) or video (its sampled frames)."""
    key = f"video {image.num_frames}" if isinstance(image, PreparedVideo) else str(image.size)
    h = hashlib.sha256(key.encode())
    h.update(image.pixel_values.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class _Track:
    """Per-sequence text state: detokenizer, stop strings, the text streamed so far, sampling state."""

    seq: Sequence
    index: int
    detok: IncrementalDetokenizer
    stops: list[str]
    generator: torch.Generator | None
    counts: Counter = field(default_factory=Counter)
    cut: int | None = None
    logprobs: list = field(default_factory=list)


class LLMEngine:
    """Continuous batching over one loaded model: add_request / abort / step."""

    def __init__(self, pipe: Pipeline, cfg: EngineConfig | None = None):
        self.pipe, self.cfg = pipe, cfg or EngineConfig()
        context = pipe.config.text.context_length
        self.max_model_len = min(self.cfg.max_model_len or context, context)
        blocks = num_kv_blocks(pipe.model, self.cfg, self.max_model_len)
        self.block_manager = BlockManager(blocks, self.cfg.block_size, self.cfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.cfg, self.block_manager, self.max_model_len)
        self.runner = ModelRunner(pipe.model, self.cfg, blocks, self.max_model_len)
        self.eos = {i for i in pipe.config.text.eos_token_ids + [pipe.tokenizer.eos_token_id] if i is not None}
        self._ids = itertools.count()
        self._tracks: dict[int, _Track] = {}
        self._requests: dict[str, RequestOutput] = {}
        self._images: dict[str, Media] = {}
        self._request_images: dict[str, list[str]] = {}

    def add_request(self, request_id: str, request: dict[str, Any], params: SamplingParams | None = None) -> None:
        """Queue a request (see the module docstring for its shape)."""
        params = params or SamplingParams()
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids, prepared, spans, stop = self._prepare(request)
        if len(ids) >= self.max_model_len:
            raise ValueError(f"the prompt is {len(ids)} tokens but the model's context is {self.max_model_len}; "
                             "shorten the text or use fewer / smaller images (or fewer video frames)")
        hashes = [image_hash(p) for p in prepared]
        self._images.update(zip(hashes, prepared))
        self._request_images[request_id] = hashes
        images = [ImageSpan(start, length, h) for (start, length), h in zip(spans, hashes)]
        n = getattr(params, "n", 1)
        self._requests[request_id] = RequestOutput(request_id, ids, [CompletionOutput(i) for i in range(n)])
        for i in range(n):
            seq = Sequence(next(self._ids), request_id, ids, params, images,
                           frozenset() if params.ignore_eos else frozenset(self.eos))
            seed = None if params.seed is None else params.seed + i
            generator = torch.Generator(self.runner.device).manual_seed(seed) if seed is not None else None
            stops = list(params.stop) + ([stop] if stop else [])
            self._tracks[seq.seq_id] = _Track(seq, i, IncrementalDetokenizer(self.pipe.tokenizer), stops, generator)
            self.scheduler.add(seq)

    def _prepare(self, request: dict[str, Any]):
        """(ids, images and videos in prompt order, their (start, length) runs, template stop string)."""
        proc = self.pipe.processor
        prepared = [im if isinstance(im, PreparedImage) else proc.prepare_images([im])[0]
                    for im in request.get("images") or []]
        videos = proc.prepare_videos(list(request.get("videos") or []))  # prepared ones pass through
        conv_mode = request.get("conv_mode")
        stop = (proc.template if conv_mode in (None, "raw") else proc.template_for(conv_mode)).stop_str
        if "prompt_token_ids" in request:
            ids = list(request["prompt_token_ids"])
            runs = sorted(_placeholder_runs(ids, proc.cfg.image_token_id, prepared, "image")
                          + _placeholder_runs(ids, proc.cfg.video_token_id, videos, "video"), key=lambda r: r[0])
            return ids, [item for _, item in runs], [(start, item.num_tokens) for start, item in runs], stop
        if "messages" in request:
            text = proc.render_messages(request["messages"], len(prepared), conv_mode, len(videos))
        else:
            text = proc.render_prompt(request["prompt"], len(prepared), conv_mode, len(videos))
        inputs = proc.encode_prompt(text, prepared, videos)
        return inputs.ids, inputs.media, inputs.spans, stop

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
        seq_ids, logits = self.runner.execute(batch, self._images)
        tracks = [self._tracks[i] for i in seq_ids]
        tokens, logprobs = sample_batch(
            logits, [t.seq.params for t in tracks],
            [t.seq.token_ids for t in tracks], [t.counts for t in tracks], [t.generator for t in tracks])
        done = {seq.seq_id: seq for seq in self.scheduler.update(batch, dict(zip(seq_ids, tokens)))}
        changed = {}
        for track, token, lp in zip(tracks, tokens, logprobs):
            self._on_token(track, token, lp)
            changed[track.seq.request_id] = self._requests[track.seq.request_id]
            if track.cut is not None and track.seq.seq_id not in done:  # a stop string ended it
                self.scheduler.finish(track.seq, "stop")
                done[track.seq.seq_id] = track.seq
        for seq in done.values():
            changed[seq.request_id] = self._finish(seq)
        return list(changed.values())

    def _on_token(self, track: _Track, token: int, logprob) -> None:
        track.counts[token] += 1
        if logprob is not None:
            track.logprobs.append(logprob)
        if token in track.seq.eos_token_ids or token in track.seq.params.stop_token_ids or track.cut is not None:
            return
        track.detok.push(token)
        cut = track.cut = find_stop(track.detok.text, track.stops)
        out = self._requests[track.seq.request_id].outputs[track.index]
        text = track.detok.text
        safe = cut if cut is not None else len(text) - partial_stop_length(text, track.stops)
        out.text = text[:safe]
        out.token_ids = list(track.seq.output_token_ids)

    def _finish(self, seq: Sequence) -> RequestOutput:
        track = self._tracks.pop(seq.seq_id)
        req = self._requests[seq.request_id]
        out = req.outputs[track.index]
        out.text = track.detok.text if track.cut is None else track.detok.text[:track.cut]
        out.token_ids, out.finish_reason = list(seq.output_token_ids), seq.finish_reason
        out.logprobs = track.logprobs if seq.params.logprobs is not None else None
        req.num_cached_tokens = max(req.num_cached_tokens, seq.num_cached_tokens)
        if all(o.finish_reason for o in req.outputs):
            req.finished = True
            self._forget(seq.request_id)
        return req

    def _forget(self, request_id: str) -> None:
        """Drop a finished or aborted request and the images no other live request uses."""
        self._requests.pop(request_id, None)
        live = {h for r, hs in self._request_images.items() if r != request_id for h in hs}
        for h in self._request_images.pop(request_id, []):
            if h not in live:
                self._images.pop(h, None)


def _placeholder_runs(ids: list[int], token_id: int | None, items: list[Media], kind: str) -> list[tuple[int, Media]]:
    """(start, item) of each image (or each video) in ids that were expanded by the caller, in order."""
    runs, pos = [], 0
    for item in items:
        while pos < len(ids) and ids[pos] != token_id:
            pos += 1
        if ids[pos:pos + item.num_tokens] != [token_id] * item.num_tokens:
            raise ValueError(f"prompt_token_ids lack the {item.num_tokens} placeholders of {kind} {len(runs) + 1}")
        runs.append((pos, item))
        pos += item.num_tokens
    return runs


class LLM:
    """Offline batches: `LLM(model).generate(requests, sampling_params)` -> outputs in request order.

    The keywords past the engine's limits go to `llavakit.load`: vision_tower, conv_mode, revision, load_format,
    tokenizer, num_frames, fetch_policy and image_aspect_ratio ("pad": LLaVA-1.5's expand2square, what it was
    trained and evaluated with; "crop": what transformers' llava-hf processor does; "anyres": LLaVA-NeXT tiling;
    default None: what the checkpoint's files say).
    """

    def __init__(self, model: str = "demo", dtype: str = "auto", device: str = "auto", *,
                 max_model_len: int | None = None, max_num_seqs: int = 64, max_num_batched_tokens: int = 4096,
                 kv_cache_memory: int | None = None, gpu_memory_utilization: float = 0.9,
                 num_kv_blocks: int | None = None, block_size: int = 16, enable_prefix_caching: bool = True,
                 enable_chunked_prefill: bool = True, attention_backend: str = "auto", enforce_eager: bool = False,
                 **load_kwargs):
        from llavakit.pipeline import load

        cfg = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                           max_model_len=max_model_len, block_size=block_size, num_kv_blocks=num_kv_blocks,
                           kv_cache_memory=kv_cache_memory, gpu_memory_utilization=gpu_memory_utilization,
                           enable_prefix_caching=enable_prefix_caching, enable_chunked_prefill=enable_chunked_prefill,
                           attention_backend=attention_backend, cuda_graphs=not enforce_eager)
        self.engine = LLMEngine(load(model, dtype=dtype, device=device, **load_kwargs), cfg)

    def generate(self, requests, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every request to the end. A request may be a prompt string or a request dict."""
        requests = [requests] if isinstance(requests, (str, dict)) else list(requests)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(requests)
        if len(params) != len(requests):
            raise ValueError(f"{len(params)} sampling params for {len(requests)} requests")
        ids = [f"offline-{next(self.engine._ids)}" for _ in requests]
        for rid, req, p in zip(ids, requests, params):
            self.engine.add_request(rid, {"prompt": req} if isinstance(req, str) else req, p)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(requests), desc="generate", unit="req", disable=not use_tqdm or None)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [results[i] for i in ids]
