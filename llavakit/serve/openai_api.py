"""OpenAI-compatible routes: POST /v1/chat/completions (text, images and videos, streaming, n, logprobs),
POST /v1/completions (raw text), GET /v1/models. Client text is parsed and tokenized on a worker thread."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request

from llavakit.engine.llm_engine import CompletionOutput, RequestOutput
from llavakit.serve.errors import bad_request
from llavakit.serve.prompts import chat_input, raw_text, render_chat
from llavakit.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChunkChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Delta,
    ErrorResponse,
    ModelCard,
    ModelList,
    SamplingFields,
    StreamOptions,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from llavakit.serve.service import Run, Service
from llavakit.serve.streaming import (
    DONE,
    event_stream,
    final_output,
    finite,
    first_output,
    sse,
    text_deltas,
    token_bytes,
    token_text,
)

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)}
router = APIRouter(responses=ERRORS)


def sampling_kwargs(body: SamplingFields) -> dict[str, Any]:
    """SamplingParams keywords from the fields OpenAI and vLLM share (temperature defaults to 1)."""
    return {"temperature": 1.0 if body.temperature is None else body.temperature, "top_p": body.top_p,
            "top_k": body.top_k, "min_p": body.min_p, "repetition_penalty": body.repetition_penalty,
            "presence_penalty": body.presence_penalty, "frequency_penalty": body.frequency_penalty,
            "stop": [body.stop] if isinstance(body.stop, str) else body.stop, "seed": body.seed,
            "ignore_eos": body.ignore_eos}


def usage(out: RequestOutput) -> Usage:
    completion = sum(len(o.token_ids) for o in out.outputs)
    return Usage(prompt_tokens=len(out.prompt_token_ids), completion_tokens=completion,
                 total_tokens=len(out.prompt_token_ids) + completion)


def _service(request: Request) -> Service:
    return request.app.state.service


@router.get("/v1/models", response_model=ModelList)
async def list_models(request: Request) -> ModelList:
    svc = _service(request)
    return ModelList(data=[ModelCard(id=svc.cfg.model_name, created=svc.created, max_model_len=svc.max_seq_len)])


# --- chat ---------------------------------------------------------------------------------------------------


@router.post("/v1/chat/completions", response_model=ChatCompletionResponse,
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream"}})
async def chat_completions(body: ChatCompletionRequest, request: Request):
    svc = _service(request)
    svc.check_model(body.model)
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")

    def build():
        chat = chat_input(body.messages)
        svc.check_videos(len(chat.videos), "messages")  # before any fetch
        images = svc.load_images(chat.images, "messages")
        videos = svc.load_videos(chat.videos, "messages")
        return svc.inputs(render_chat(svc.processor, chat.messages), images, videos)

    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    run = await svc.start(request, body.n, build, body.max_completion_tokens or body.max_tokens,
                          dict(sampling_kwargs(body), logprobs=logprobs))
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": svc.cfg.model_name}
    if body.stream:
        first = await first_output(svc, request, run)
        return event_stream(_chat_events(svc, run, first, meta, _include_usage(body.stream_options)))
    out = await final_output(svc, request, run)
    choices = [ChatChoice(index=o.index, message=AssistantMessage(content=o.text), finish_reason=o.finish_reason,
                          logprobs=_chat_logprobs(svc, o)) for o in out.outputs]
    return ChatCompletionResponse(choices=choices, usage=usage(out), **meta)


def _include_usage(options: StreamOptions | None) -> bool:
    return options is None or options.include_usage


async def _chat_events(svc: Service, run: Run, first: RequestOutput, meta: dict, include_usage: bool
                       ) -> AsyncIterator[str]:
    def chunk(choices: list[ChunkChoice], **kw) -> str:
        return sse(ChatCompletionChunk(choices=choices, **meta, **kw))

    yield chunk([ChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(run.params.n)])
    last = first
    async with aclosing(text_deltas(first, run)) as deltas:
        async for snapshot, o, delta in deltas:
            last = snapshot  # the usage chunk reports the latest snapshot
            yield chunk([ChunkChoice(index=o.index, delta=Delta(content=delta), finish_reason=o.finish_reason,
                                     logprobs=_chat_logprobs(svc, o) if o.finish_reason else None)])
    if include_usage:
        yield chunk([], usage=usage(last))
    yield DONE


def _chat_logprobs(svc: Service, out: CompletionOutput) -> ChatLogprobs | None:
    if out.logprobs is None:
        return None
    tok = svc.processor.tokenizer

    def entry(token_id: int, logprob: float) -> dict:
        raw = token_bytes(tok, token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": finite(logprob), "bytes": list(raw)}

    return ChatLogprobs(content=[TokenLogprob(**entry(lp.token_id, lp.logprob),
                                              top_logprobs=[TopLogprob(**entry(i, v)) for i, v in lp.top])
                                 for lp in out.logprobs])


# --- completions --------------------------------------------------------------------------------------------


@router.post("/v1/completions", response_model=CompletionResponse,
             responses={200: {"content": {"text/event-stream": {}}, "description": "JSON, or SSE when stream"}})
async def completions(body: CompletionRequest, request: Request):
    svc = _service(request)
    svc.check_model(body.model)
    run = await svc.start(request, body.n, lambda: svc.inputs(raw_text(body.prompt, 0, "prompt")),
                          body.max_tokens, dict(sampling_kwargs(body), logprobs=body.logprobs))
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": svc.cfg.model_name}
    if body.stream:
        first = await first_output(svc, request, run)
        return event_stream(_completion_events(svc, run, first, meta, _include_usage(body.stream_options)))
    out = await final_output(svc, request, run)
    choices = [CompletionChoice(index=o.index, text=o.text, finish_reason=o.finish_reason,
                                logprobs=_completion_logprobs(svc, o)) for o in out.outputs]
    return CompletionResponse(choices=choices, usage=usage(out), **meta)


async def _completion_events(svc: Service, run: Run, first: RequestOutput, meta: dict, include_usage: bool
                             ) -> AsyncIterator[str]:
    last = first
    async with aclosing(text_deltas(first, run)) as deltas:
        async for snapshot, o, delta in deltas:
            last = snapshot  # the usage event reports the latest snapshot
            yield sse(CompletionResponse(choices=[CompletionChoice(
                index=o.index, text=delta, finish_reason=o.finish_reason,
                logprobs=_completion_logprobs(svc, o) if o.finish_reason else None)], **meta))
    if include_usage:
        yield sse(CompletionResponse(choices=[], usage=usage(last), **meta))
    yield DONE


def _completion_logprobs(svc: Service, out: CompletionOutput) -> CompletionLogprobs | None:
    if out.logprobs is None:
        return None
    tok = svc.processor.tokenizer
    tokens = [token_text(tok, lp.token_id) for lp in out.logprobs]
    offsets, pos = [], 0
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return CompletionLogprobs(tokens=tokens, token_logprobs=[finite(lp.logprob) for lp in out.logprobs],
                              top_logprobs=[{token_text(tok, i): finite(v) for i, v in lp.top} for lp in out.logprobs],
                              text_offset=offsets)
