"""Drive an LLMEngine to completion in tests: the outputs of a batch of requests, in request order."""

from __future__ import annotations

from llavakit.engine.llm_engine import LLMEngine


def run(engine: LLMEngine, reqs, params):
    """Add every request (one SamplingParams for all, or one each), step until done, return the outputs."""
    params = params if isinstance(params, list) else [params] * len(reqs)
    for i, (r, p) in enumerate(zip(reqs, params)):
        engine.add_request(f"r{i}", r, p)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[f"r{i}"] for i in range(len(reqs))]
