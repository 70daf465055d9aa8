"""The plain generation loop: prefill once, then decode token by token over a contiguous KV cache.

`generate_tokens` yields sampled ids; `Generation` turns them into text with stop handling and
timings. The continuous-batching engine replaces the loop, not the model or the processing.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from llavakit.layers.attention import AttentionMetadata, KVCache
from llavakit.layers.sampler import sample_batch
from llavakit.models.llava import LlavaForConditionalGeneration
from llavakit.processing.detokenizer import TextStream
from llavakit.processing.prompt import Media, PromptInputs
from llavakit.sampling import SamplingParams


@dataclass(slots=True)
class Timings:
    """Milliseconds spent in each phase of one generation."""

    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0


@dataclass(slots=True)
class GenerationOutput:
    """The generated part only: `text` (stop strings cut off) and `token_ids` (EOS included)."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    timings: Timings = field(default_factory=Timings)


def _now(device: torch.device) -> float:
    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.inference_mode()
def generate_tokens(model: LlavaForConditionalGeneration, ids: list[int], media: list[Media],
                    params: SamplingParams, timings: Timings | None = None) -> Iterator[int]:
    """Sampled token ids, one per step; stops after params.max_tokens or at the context limit. `media`:
    the prompt's images and videos in the order their placeholder runs appear in `ids`."""
    cfg, device = model.cfg.text, model.device
    timings = timings if timings is not None else Timings()
    limit = cfg.context_length
    if len(ids) >= limit:
        raise ValueError(f"the prompt is {len(ids)} tokens but the model's context is {limit}; "
                         "shorten the text or use fewer / smaller images (or fewer video frames)")
    max_len = min(len(ids) + params.max_tokens, limit)
    cache = KVCache(cfg.num_hidden_layers, 1, model.language_model.num_kv_heads, max_len, cfg.head_dim,
                    model.dtype, device)
    t0 = _now(device)
    feats = model.encode_media([m.pixel_values.to(device) for m in media], [m.size for m in media]) if media else None
    t1 = _now(device)
    seen = torch.tensor(ids, device=device)
    hidden = model(model.embed_inputs(seen[None], feats), torch.arange(len(ids), device=device)[None], cache)
    generator = torch.Generator(device).manual_seed(params.seed) if params.seed is not None else None
    timings.vision_ms = (t1 - t0) * 1e3
    start = t1
    counts: Counter = Counter()
    for pos in range(len(ids), max_len + 1):
        logits = model.compute_logits(hidden[0, -1:]).float()
        token = sample_batch(logits, [params], [seen], [counts], [generator])[0][0]
        counts[token] += 1
        now = _now(device)
        if pos == len(ids):
            timings.prefill_ms = (now - start) * 1e3
        else:
            timings.decode_ms += (now - start) * 1e3
        yield token
        if pos == max_len:
            return
        start = _now(device)
        step = torch.tensor([[token]], device=device)
        seen = torch.cat([seen, step[0]])
        hidden = model(model.embed_inputs(step), torch.tensor([[pos]], device=device), cache,
                       AttentionMetadata(start_pos=pos))


class Generation:
    """One request: iterating yields text deltas (never a partial stop string); `output` is set at the end."""

    def __init__(self, model: LlavaForConditionalGeneration, tokenizer: Any, inputs: PromptInputs,
                 params: SamplingParams, timings: Timings | None = None):
        self.model, self.tokenizer, self.inputs, self.params = model, tokenizer, inputs, params
        self.stops = list(params.stop) + ([inputs.stop] if inputs.stop else [])
        eos = [] if params.ignore_eos else model.cfg.text.eos_token_ids + [tokenizer.eos_token_id]
        self.stop_ids = {i for i in eos + list(params.stop_token_ids) if i is not None}
        self.timings = timings or Timings()
        self.output: GenerationOutput | None = None

    def __iter__(self) -> Iterator[str]:
        stream = TextStream(self.tokenizer, self.stops, self.stop_ids)
        tokens: list[int] = []
        emitted = 0
        for token in self._tokens():
            tokens.append(token)
            if stream.push(token) or len(tokens) >= self.params.max_tokens:
                break
            if len(stream.visible) > emitted:
                yield stream.visible[emitted:]
                emitted = len(stream.visible)
        if len(stream.text) > emitted:
            yield stream.text[emitted:]
        finish = "stop" if stream.stopped else "length"
        self.output = GenerationOutput(stream.text, tokens, self.inputs.ids, finish, self.timings)

    def _tokens(self) -> Iterator[int]:
        return generate_tokens(self.model, self.inputs.ids, self.inputs.media, self.params, self.timings)

    def run(self) -> GenerationOutput:
        """Generate to the end and return the output."""
        for _ in self:
            pass
        assert self.output is not None
        return self.output
