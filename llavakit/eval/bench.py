"""`llavakit bench`: serving-speed measurements of the engine, and of transformers on the same weights and
the very same requests.

(a) MindIE's performance protocol: batch 1..10, one image per request, 256 output tokens: TTFT, decode
tokens/s and throughput per batch size. (b) offline throughput: N requests with images, mixed prompt and
output lengths, all submitted at once. (c) transformers' generate on the requests of (a) and (b): batch-1
TTFT and decode on (a)'s batch-1 request, (b) one by one and as one padded batch; printed as ratios.

What keeps the numbers honest:
- warm-up: before the first timed run of each shape (each protocol batch size, the offline set), an untimed
  run of the same shape (batch size, prompts, output lengths) on other images, so the first size measured
  pays no one-off costs (allocator growth, kernel selection, lazy initialisation) and the engine's vision
  cache holds none of the timed images;
- distinct images: every request has its own image unless `distinct_images` asks for fewer. With fewer, the
  engine encodes each distinct image once (its vision and prefix caches) while transformers encodes every
  request's, so such a run flatters the engine: quote it as such. Every result records how many distinct
  images its requests held and how many the engine encoded;
- repeats: with `repeats` > 1 the whole sequence (engine, then transformers) runs again on fresh images, so
  load on a shared machine hits both sides; medians, minima and maxima are reported, ratios are medians of
  the per-round (paired) ratios.
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from llavakit.config import EngineConfig
from llavakit.engine.llm_engine import LLMEngine
from llavakit.sampling import SamplingParams

PROTOCOL_KEY = "mindie_protocol"


def protocol_name(batch_sizes=range(1, 11), output_tokens: int = 256) -> str:
    """"MindIE's performance protocol (batch 1-10 x 256 tokens)", with the sizes and length actually run."""
    sizes = list(batch_sizes)
    span = (f"{sizes[0]}-{sizes[-1]}" if len(sizes) > 2 and sizes == list(range(sizes[0], sizes[-1] + 1))
            else ",".join(map(str, sizes)))
    return f"MindIE's performance protocol (batch {span} x {output_tokens} tokens)"


QUESTIONS = ["Describe this image.", "What is in the picture? Answer in detail, mentioning every object you see.",
             "Colour?", "Tell me about the shapes, their positions and their colours, one by one, left to right."]

# What a workload's images are for: part of their seeds, so no two workloads share an image.
TIMED, WARMUP, OFFLINE, OFFLINE_WARMUP = 1, 2, 3, 4


def noise(seed: int | tuple[int, ...], size: int = 336) -> Image.Image:
    """A size x size RGB noise image; equal seeds give equal images, different seeds different ones."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


def images_for(n: int, seed: tuple[int, ...], distinct: int | None = None) -> list[Image.Image]:
    """n images of which `distinct` (default: all n) differ; request k gets image k mod distinct."""
    d = n if distinct is None else max(1, min(distinct, n))
    pool = [noise((*seed, k)) for k in range(d)]
    return [pool[k % d] for k in range(n)]


def image_key(image: Image.Image) -> str:
    return hashlib.sha256(f"{image.size} {image.mode}".encode() + image.tobytes()).hexdigest()


def count_distinct_images(requests: list[dict]) -> int:
    """Distinct images (by content) over the requests."""
    return len({image_key(im) for r in requests for im in r.get("images") or []})


@dataclass
class BatchResult:
    batch_size: int
    ttft_ms: float
    decode_tokens_per_s: float
    throughput_tokens_per_s: float
    total_s: float
    distinct_images: int = 0
    images_encoded: int = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_batch(engine: BenchEngine, requests: list[dict], params: list[SamplingParams]) -> BatchResult:
    """Submit all requests at once and run them to the end; first-token time is the batch's mean."""
    device = engine.runner.device
    encoded = engine.runner.images_encoded
    start = time.perf_counter()
    for i, (r, p) in enumerate(zip(requests, params, strict=True)):
        engine.submit(f"bench-{start}-{i}", r, p)
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
    return BatchResult(len(requests), ttft * 1e3, decode_tokens / max(decode_time, 1e-9), generated / total, total,
                       count_distinct_images(requests), engine.runner.images_encoded - encoded)


def protocol_requests(batch_size: int, output_tokens: int = 256, *, purpose: int = TIMED, repeat: int = 0,
                      distinct_images: int | None = None) -> tuple[list[dict], list[SamplingParams]]:
    """One protocol batch: the same question, one 336-px image each, a fixed output length."""
    images = images_for(batch_size, (purpose, repeat, batch_size), distinct_images)
    reqs = [{"prompt": QUESTIONS[0], "images": [im]} for im in images]
    return reqs, [SamplingParams(max_tokens=output_tokens, ignore_eos=True) for _ in reqs]


def mindie_protocol(engine: BenchEngine, batch_sizes=range(1, 11), output_tokens: int = 256, *, warmup: bool = True,
                    repeat: int = 0, distinct_images: int | None = None) -> list[BatchResult]:
    """MindIE's performance protocol: for each batch size, one image per request, fixed output length. With
    warmup, each size's timed run follows an untimed run of the same shape on other images."""
    results = []
    for bs in batch_sizes:
        if warmup:
            run_batch(engine, *protocol_requests(bs, output_tokens, purpose=WARMUP, repeat=repeat,
                                                 distinct_images=distinct_images))
        results.append(run_batch(engine, *protocol_requests(bs, output_tokens, repeat=repeat,
                                                            distinct_images=distinct_images)))
    return results


def mixed_workload(n: int, seed: int = 0, max_out: int = 256, *, distinct_images: int | None = None,
                   purpose: int = OFFLINE, repeat: int = 0) -> tuple[list[dict], list[SamplingParams]]:
    """n requests with one image each (all distinct unless `distinct_images` is given), mixed question and
    answer lengths. The questions and lengths depend on `seed` only, the images on (purpose, repeat)."""
    rng = random.Random(seed)
    reqs, params = [], []
    for image in images_for(n, (purpose, repeat, n), distinct_images):
        reqs.append({"prompt": rng.choice(QUESTIONS), "images": [image]})
        params.append(SamplingParams(max_tokens=rng.randint(max(1, max_out // 8), max_out), ignore_eos=True))
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
        inputs = [pipe.inputs(r["prompt"], images=r["images"]) for r in chunk]  # each image prepared once
        ids = [x.ids for x in inputs]
        pixels = torch.cat([m.pixel_values for x in inputs for m in x.media])
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


def hf_measure(hf, pipe, one: list[dict], output_tokens: int, reqs: list[dict], params: list[SamplingParams],
               warmup: bool = True) -> dict:
    """transformers on the given requests: TTFT and decode of `one` (a single request), `reqs` one by one
    and as one padded batch. With warmup, untimed short runs of both shapes first."""
    if warmup:
        hf_generate(hf, pipe, one, [SamplingParams(max_tokens=2)], 1)
        hf_generate(hf, pipe, reqs, [SamplingParams(max_tokens=2)] * len(reqs), len(reqs))
    t1 = hf_generate(hf, pipe, one, [SamplingParams(max_tokens=1)], 1).seconds
    tn = hf_generate(hf, pipe, one, [SamplingParams(max_tokens=output_tokens)], 1).seconds
    single = hf_generate(hf, pipe, reqs, params, 1)
    padded = hf_generate(hf, pipe, reqs, params, len(reqs))
    return {"ttft_ms": t1 * 1e3, "bs1_decode_tokens_per_s": (output_tokens - 1) / max(tn - t1, 1e-9),
            "one_by_one_tokens_per_s": single.tokens_per_s, "padded_batch_tokens_per_s": padded.tokens_per_s}


def hf_twin(pipe):
    """transformers' LLaVA whose parameters are the engine model's own tensors (no second copy), except
    the tower layers llavakit never runs, which keep transformers' random initialisation."""
    import tempfile

    from transformers import AutoConfig, AutoModelForImageTextToText

    from llavakit.weights.name_maps import map_name
    from llavakit.weights.save import TO_LLAVA_HF, hf_config_dict

    model = pipe.model
    dtype = model.dtype
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(hf_config_dict(pipe.config, dtype=dtype)))
        config = AutoConfig.from_pretrained(tmp)
    with torch.device(model.device):
        hf = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    wanted = set(hf.state_dict())
    # hub names -> the module names of this transformers version (4.x: the hub names; 5.x: model.*)
    renames = [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector."),
               ("image_newline", "model.image_newline")]
    state = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        hub = map_name(name, TO_LLAVA_HF)
        candidates = [hub] + [new + hub[len(old):] for old, new in renames if hub.startswith(old)]
        candidates += [c.replace("vision_tower.vision_model.", "vision_tower.") for c in candidates]
        key = next((c for c in candidates if c in wanted), None)
        if key is None:
            raise KeyError(f"{name} -> {hub} has no place in transformers' model")
        state[key] = p.detach()
    result = hf.load_state_dict(state, strict=False, assign=True)
    left = [k for k in result.missing_keys if "vision_tower" not in k]
    if left or result.unexpected_keys:
        raise RuntimeError(f"transformers' model lacks {left[:5]} / has extra {result.unexpected_keys[:5]}")
    return hf.eval()


def needed_model_len(pipe, output_tokens: int) -> int:
    """The longest bench request's prompt (one 336-px image and the longest question) plus output_tokens:
    the engine needs no longer context, so its KV cache is no bigger than the bench can use."""
    image = noise(0)
    longest = max(len(pipe.tokenize(q, images=[image])) for q in QUESTIONS)
    return min(longest + output_tokens, pipe.config.text.context_length)


class BenchEngine(LLMEngine):
    """The engine with the pipeline it serves: bench requests are dicts in `LLM.generate`'s forms, turned into
    PromptInputs inside the timed region (as a server's preprocessing would be)."""

    def __init__(self, pipe, cfg: EngineConfig):
        super().__init__(pipe.model, pipe.tokenizer, cfg)
        self.pipe = pipe

    def submit(self, request_id: str, request: dict, params: SamplingParams) -> None:
        self.add_request(request_id, self.pipe.processor.request_inputs(request), params)


def engine_for(pipe, **kw) -> BenchEngine:
    return BenchEngine(pipe, EngineConfig(**kw))


def as_rows(results: list[BatchResult]) -> list[dict]:
    return [asdict(r) for r in results]


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


def _median_row(rows: list[dict]) -> dict:
    """Each field's median over repeats (the int fields are equal across repeats)."""
    return {k: statistics.median(r[k] for r in rows) if isinstance(rows[0][k], float) else rows[0][k]
            for k in rows[0]}


@dataclass
class Suite:
    """Everything `run_suite` measured: per-round raw results and the medians across rounds."""

    rounds: list[dict] = field(default_factory=list)

    def protocol(self) -> list[dict]:
        per_size = zip(*(r[PROTOCOL_KEY] for r in self.rounds), strict=True)
        return [_median_row(list(rows)) for rows in per_size]

    def offline(self) -> dict:
        return _median_row([r["offline"] for r in self.rounds])

    def transformers(self) -> dict | None:
        if "transformers" not in self.rounds[0]:
            return None
        keys = self.rounds[0]["transformers"]
        return {k: statistics.median(r["transformers"][k] for r in self.rounds) for k in keys}

    def ratios(self) -> dict:
        """Paired per round, then the median over rounds (None when a side is missing)."""
        out: dict[str, list[float]] = {}
        for r in self.rounds:
            hf = r.get("transformers")
            if hf is None:
                continue
            ours = {row["batch_size"]: row for row in r[PROTOCOL_KEY]}
            pairs = {"ratio_vs_one_by_one": (r["offline"]["throughput_tokens_per_s"], hf["one_by_one_tokens_per_s"]),
                     "ratio_vs_padded_batch": (r["offline"]["throughput_tokens_per_s"],
                                               hf["padded_batch_tokens_per_s"])}
            if 1 in ours:
                pairs["ratio_bs1_decode"] = (ours[1]["decode_tokens_per_s"], hf["bs1_decode_tokens_per_s"])
                pairs["ratio_ttft"] = (hf["ttft_ms"], ours[1]["ttft_ms"])  # > 1: the engine answers sooner
            for k, (a, b) in pairs.items():
                out.setdefault(k, []).append(a / b)
        return {k: spread(v) for k, v in out.items()}

    def summary(self) -> dict:
        """min / median / max over rounds of the headline figures."""
        s = {"offline_tokens_per_s": spread([r["offline"]["throughput_tokens_per_s"] for r in self.rounds])}
        bs1 = [row for r in self.rounds for row in r[PROTOCOL_KEY] if row["batch_size"] == 1]
        if bs1:
            s["bs1_decode_tokens_per_s"] = spread([row["decode_tokens_per_s"] for row in bs1])
            s["bs1_ttft_ms"] = spread([row["ttft_ms"] for row in bs1])
        if self.transformers() is not None:
            for k in self.rounds[0]["transformers"]:
                s[f"transformers_{k}"] = spread([r["transformers"][k] for r in self.rounds])
        return s


def run_suite(engine: BenchEngine, batch_sizes: list[int], output_tokens: int, requests: int, *, repeats: int = 1,
              distinct_images: int | None = None, hf=None, log: Callable[[str], None] = print) -> Suite:
    """`repeats` rounds of: the protocol, the offline set, then (with `hf`) transformers on the same requests.
    Each shape is warmed up (untimed, other images) before its first timed run; every round uses fresh images."""
    suite = Suite()
    for rnd in range(repeats):
        tag = f" (round {rnd + 1}/{repeats})" if repeats > 1 else ""
        log(f"{protocol_name(batch_sizes, output_tokens)}{tag} ...")
        protocol = mindie_protocol(engine, batch_sizes, output_tokens, warmup=rnd == 0, repeat=rnd,
                                   distinct_images=distinct_images)
        log(f"offline throughput, {requests} requests{tag} ...")
        reqs, params = mixed_workload(requests, max_out=output_tokens, distinct_images=distinct_images, repeat=rnd)
        if rnd == 0:
            run_batch(engine, *mixed_workload(requests, max_out=output_tokens, distinct_images=distinct_images,
                                              purpose=OFFLINE_WARMUP))
        offline = run_batch(engine, reqs, params)
        result = {PROTOCOL_KEY: as_rows(protocol), "offline": {"requests": requests, **asdict(offline)}}
        if hf is not None:
            log(f"transformers on the same requests{tag} ...")
            one, _ = protocol_requests(1, output_tokens, repeat=rnd, distinct_images=distinct_images)
            result["transformers"] = hf_measure(hf, engine.pipe, one, output_tokens, reqs, params, warmup=rnd == 0)
        suite.rounds.append(result)
    return suite
