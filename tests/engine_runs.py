"""Drive an LLMEngine to completion in tests: the outputs of a batch of requests, in request order."""

from __future__ import annotations

from llavakit.engine.llm_engine import LLMEngine
from llavakit.pipeline import Pipeline


def engine_for(pipe: Pipeline, cfg=None) -> LLMEngine:
    return LLMEngine(pipe.model, pipe.tokenizer, cfg)


def run(engine: LLMEngine, pipe: Pipeline, reqs, params):
    """Add every request (dicts in LLM.generate's forms; one SamplingParams for all, or one each), step until
    done, return the outputs."""
    params = params if isinstance(params, list) else [params] * len(reqs)
    for i, (r, p) in enumerate(zip(reqs, params, strict=True)):
        engine.add_request(f"r{i}", pipe.processor.request_inputs(r), p)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[f"r{i}"] for i in range(len(reqs))]
