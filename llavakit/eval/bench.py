"""`llavakit bench`: serving-speed measurements of the engine, and of transformers on the same weights.

(a) seed-004 protocol: batch 1..10, one image per request, 256 output tokens: TTFT, decode tokens/s and
throughput per batch size. (b) offline throughput: N requests with images (half distinct, half repeated),
mixed prompt and output lengths. (c) transformers' generate on the same checkpoint: one by one, padded
batches, and batch-1 decode; printed as ratios.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

from llavakit.config import EngineConfig
from llavakit.engine.llm_engine import LLMEngine
from llavakit.sampling import SamplingParams

QUESTIONS = ["Describe this image.", "What is in the picture? Answer in detail, mentioning every object you see.",
             "Colour?", "Tell me about the shapes, their positions and their colours, one by one, left to right."]


def noise(seed: int, size: int = 336) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8"))


@dataclass
class BatchResult:
    batch_size: int
    ttft_ms: float
    decode_tokens_per_s: float
    throughput_tokens_per_s: float
    total_s: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_batch(engine: LLMEngine, requests: list[dict], params: list[SamplingParams]) -> BatchResult:
    """Submit all requests at once and run them to the end; first-token time is the batch's mean."""
    device = engine.runner.device
    start = time.perf_counter()
    for i, (r, p) in enumerate(zip(requests, params)):
        engine.add_request(f"bench-{start}-{i}", r, p)
    first: dict[str, float] = {}
    generated = 0
    while engine.has_unfinished():
        outs = engine.step()
        _sync(device)
        now = time.perf_counter()
        for out in outs:
            first.setdefault(out.request_id, now)
            if out.finished:
                generated += sum(len(o.token_ids) for o in out.outputs)
    total = time.perf_counter() - start
    ttft = sum(first.values()) / len(first) - start
    decode_time = total - ttft
    decode_tokens = generated - len(requests)
    return BatchResult(len(requests), ttft * 1e3, decode_tokens / max(decode_time, 1e-9), generated / total, total)


def seed004(engine: LLMEngine, batch_sizes=range(1, 11), output_tokens: int = 256) -> list[BatchResult]:
    """The MindIE performance protocol: one image per request, fixed output length."""
    results = []
    for bs in batch_sizes:
        reqs = [{"prompt": QUESTIONS[0], "images": [noise(1000 * bs + i)]} for i in range(bs)]
        params = [SamplingParams(max_tokens=output_tokens, ignore_eos=True)] * bs
        results.append(run_batch(engine, reqs, params))
    return results


def mixed_workload(n: int, seed: int = 0, max_out: int = 256) -> tuple[list[dict], list[SamplingParams]]:
    """n requests: half with distinct images, half repeating four images; mixed question and answer lengths."""
    rng = random.Random(seed)
    reqs, params, images = [], [], {}
    for i in range(n):
        key = i if i % 2 == 0 else 10_000 + i % 4
        image = images.setdefault(key, noise(key))
        reqs.append({"prompt": rng.choice(QUESTIONS), "images": [image]})
        params.append(SamplingParams(max_tokens=rng.randint(max_out // 8, max_out), ignore_eos=True))
    return reqs, params


@dataclass
class HFResult:
    name: str
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def hf_generate(hf, pipe, requests: list[dict], params: list[SamplingParams], batch: int) -> HFResult:
    """transformers' generate over the requests, `batch` at a time (left-padded), greedy, fixed lengths."""
    tok = pipe.tokenizer
    device = next(hf.parameters()).device
    total_tokens, start = 0, time.perf_counter()
    for k in range(0, len(requests), batch):
        chunk, ps = requests[k:k + batch], params[k:k + batch]
        ids = [pipe.tokenize(r["prompt"], images=r["images"]) for r in chunk]
        pixels = torch.cat([p.pixel_values for r in chunk for p in pipe.processor.prepare_images(r["images"])])
        width = max(map(len, ids))
        pad = tok.pad_token_id or 0
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        new = max(p.max_tokens for p in ps)  # a padded batch runs to its longest answer
        with torch.inference_mode():
            hf.generate(input_ids=input_ids, attention_mask=mask, pixel_values=pixels.to(device, hf.dtype),
                        max_new_tokens=new, min_new_tokens=new, do_sample=False)
        _sync(device)
        total_tokens += sum(p.max_tokens for p in ps)  # only the tokens the requests asked for count
    return HFResult(f"transformers batch {batch}", total_tokens, time.perf_counter() - start)


def engine_for(pipe, **kw) -> LLMEngine:
    return LLMEngine(pipe, EngineConfig(**kw))


def as_rows(results: list[BatchResult]) -> list[dict]:
    return [asdict(r) for r in results]
