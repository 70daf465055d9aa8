"""Text Generation Inference routes: POST /generate and /generate_stream (SPEC §7). TGI's /generate and
vLLM's share a path; the body tells them apart ({"inputs"} is TGI, {"prompt"} is vLLM).

Inputs are raw text (no chat template), with images inline as markdown: ![](https://...) or
![](data:image/png;base64,...), each read where it stands. The inputs are parsed on a worker thread.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, Request

from llavakit.engine.llm_engine import CompletionOutput, RequestOutput
from llavakit.serve import vllm_api
from llavakit.serve.openai_api import ERRORS
from llavakit.serve.prompts import markdown_images
from llavakit.serve.protocol import (
    GenerateRequest,
    TGIDetails,
    TGIRequest,
    TGIResponse,
    TGIStreamEvent,
    TGIToken,
    VLLMRequest,
    VLLMResponse,
)
from llavakit.serve.service import Run, Service
from llavakit.serve.streaming import (
    event_stream,
    final_output,
    finite,
    first_output,
    snapshots,
    sse,
    token_text,
)

DEFAULT_MAX_NEW_TOKENS = 100  # TGI's default, lowered to what the context has room for
router = APIRouter(responses=ERRORS)


@router.post("/generate", response_model=TGIResponse | VLLMResponse,
             responses={200: {"content": {"text/event-stream": {}, "application/x-ndjson": {}}}})
async def generate(body: GenerateRequest, request: Request):
    """TGI {"inputs", "parameters"} -> {"generated_text"}; vLLM {"prompt", ...} -> {"text": [...]}. A body
    with "prompt" (and no "inputs") is read as vLLM's, any other as TGI's."""
    if isinstance(body, VLLMRequest):
        return await vllm_api.generate(body, request)
    return await _tgi(body, request, stream=body.stream)


@router.post("/generate_stream", responses={200: {"content": {"text/event-stream": {}}}})
async def generate_stream(body: TGIRequest, request: Request):
    """TGI streaming: one SSE event per generated token; the last one carries generated_text and details."""
    return await _tgi(body, request, stream=True)


async def _tgi(body: TGIRequest, request: Request, stream: bool):
    svc: Service = request.app.state.service

    def build():
        text, urls = markdown_images(body.inputs, "inputs")
        images = svc.load_images(urls, "inputs")
        return svc.inputs(text, images)

    p = body.parameters
    sample = p.do_sample or any(v is not None for v in (p.temperature, p.top_p, p.top_k))
    sampling = {"temperature": (p.temperature or 1.0) if sample else 0.0, "top_p": p.top_p, "top_k": p.top_k,
                "repetition_penalty": p.repetition_penalty, "seed": p.seed, "stop": list(p.stop),
                "logprobs": 0 if p.details and not stream else None}
    max_new = p.max_new_tokens or _default_max_new(svc)
    run = await svc.start(request, 1, build, max_new, sampling)
    prefix = body.inputs if p.return_full_text else ""
    if stream:
        first = await first_output(svc, request, run)
        return event_stream(_events(svc, run, first, prefix), error_event=sse)
    out = (await final_output(svc, request, run)).outputs[0]
    details = _details(svc, out, run, with_tokens=True) if p.details else None
    return TGIResponse(generated_text=prefix + out.text, details=details)


def _default_max_new(svc: Service) -> int | None:
    """TGI's default; None (the rest of the context) when the context is shorter than that."""
    return DEFAULT_MAX_NEW_TOKENS if svc.max_seq_len > 2 * DEFAULT_MAX_NEW_TOKENS else None


def _finish_reason(svc: Service, out: CompletionOutput) -> str:
    if out.finish_reason == "length":
        return "length"
    return "eos_token" if out.token_ids and out.token_ids[-1] in svc.llm.eos else "stop_sequence"


def _details(svc: Service, out: CompletionOutput, run: Run, with_tokens: bool) -> TGIDetails:
    tokens = None
    if with_tokens:
        tok, logprobs = svc.processor.tokenizer, out.logprobs or []
        tokens = [TGIToken(id=i, text=token_text(tok, i), special=i in svc.llm.eos,
                           logprob=finite(logprobs[k].logprob) if k < len(logprobs) else None)
                  for k, i in enumerate(out.token_ids)]
    return TGIDetails(finish_reason=_finish_reason(svc, out), generated_tokens=len(out.token_ids),
                      seed=run.params.seed, tokens=tokens)


async def _events(svc: Service, run: Run, first: RequestOutput, prefix: str) -> AsyncIterator[str]:
    """One event per new token. A snapshot's new text goes with its last new token (text can lag tokens
    while a stop string might be forming), so the tokens' texts add up to generated_text."""
    sent_tokens, sent_text = 0, ""
    async with aclosing(snapshots(first, run)) as snaps:
        async for snap in snaps:
            out = snap.outputs[0]
            new = out.token_ids[sent_tokens:]
            for k, token_id in enumerate(new):
                last = k == len(new) - 1
                done = last and out.finish_reason is not None
                token = TGIToken(id=token_id, text=out.text[len(sent_text):] if last else "",
                                 special=token_id in svc.llm.eos)
                event = TGIStreamEvent(index=sent_tokens + k, token=token,
                                       generated_text=prefix + out.text if done else None,
                                       details=_details(svc, out, run, with_tokens=False) if done else None)
                yield sse(event, exclude_none=False)
            sent_tokens += len(new)
            if new:
                sent_text = out.text
