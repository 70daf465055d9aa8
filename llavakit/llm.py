"""`llavakit.LLM`: offline batches on the continuous-batching engine, as vLLM's `LLM`.

`LLM(model, **settings)` loads the checkpoint (`llavakit.load`'s keywords) and builds the engine
(`EngineConfig`'s fields, plus vLLM's `enforce_eager`); `generate` runs a list of requests to the end.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from llavakit.config import EngineConfig
from llavakit.engine.llm_engine import LLMEngine, RequestOutput
from llavakit.pipeline import load
from llavakit.processing.prompt import PromptInputs
from llavakit.sampling import SamplingParams

ENGINE_SETTINGS = frozenset(f.name for f in dataclasses.fields(EngineConfig))
LOAD_SETTINGS = frozenset(inspect.signature(load).parameters) - {"model", "dtype", "device"}


class LLM:
    """Offline batches: `LLM(model).generate(requests, sampling_params)` -> outputs in request order.

    Keywords are `EngineConfig` fields (max_model_len, max_num_seqs, num_kv_blocks, ...; enforce_eager=True is
    cuda_graphs=False) or `llavakit.load`'s: vision_tower, conv_mode, revision, load_format, tokenizer,
    num_frames, fetch_policy, quantization ("w8a16", "w4a16" or a QuantConfig) and image_aspect_ratio
    ("pad": LLaVA-1.5's expand2square, what it was trained and evaluated with; "crop": what transformers'
    llava-hf processor does; "anyres": LLaVA-NeXT tiling; default None: what the checkpoint's files say).
    """

    def __init__(self, model: str = "demo", dtype: str = "auto", device: str = "auto", *,
                 enforce_eager: bool = False, **settings: Any):
        unknown = settings.keys() - ENGINE_SETTINGS - LOAD_SETTINGS
        if unknown:
            raise TypeError(f"LLM() got unknown keyword(s) {', '.join(sorted(unknown))}; engine settings are "
                            f"{', '.join(sorted(ENGINE_SETTINGS))}, loading settings "
                            f"{', '.join(sorted(LOAD_SETTINGS))}")
        engine = {k: v for k, v in settings.items() if k in ENGINE_SETTINGS}
        if enforce_eager:
            engine["cuda_graphs"] = False
        cfg = EngineConfig(**engine)
        self.pipe = load(model, dtype=dtype, device=device, **{k: v for k, v in settings.items() if k in LOAD_SETTINGS})
        self.processor = self.pipe.processor
        self.engine = LLMEngine(self.pipe.model, self.pipe.tokenizer, cfg)

    def generate(self, requests: str | dict | PromptInputs | Sequence, sampling_params: SamplingParams
                 | list[SamplingParams] | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every request to the end; outputs in request order. A request is a prompt string, a dict
        (see `PromptProcessor.request_inputs`) or a PromptInputs."""
        requests = [requests] if isinstance(requests, (str, dict, PromptInputs)) else list(requests)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(requests)
        if len(params) != len(requests):
            raise ValueError(f"{len(params)} sampling params for {len(requests)} requests")
        ids = []
        for request, p in zip(requests, params, strict=True):
            ids.append(self.engine.new_request_id("offline"))
            self.engine.add_request(ids[-1], self.processor.request_inputs(request), p)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(requests), desc="generate", unit="req", disable=not use_tqdm or None)
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    bar.update(1)
        bar.close()
        return [results[i] for i in ids]
