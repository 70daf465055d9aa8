"""Pieces every API format uses to answer: server-sent events, collecting a run to its end, the first
snapshot before the response starts (so refusals still get a proper status), and token text."""

from __future__ import annotations

import json
import math
import re
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import StreamingResponse

from llavakit.engine.llm_engine import CompletionOutput, RequestOutput
from llavakit.serve.errors import APIError
from llavakit.serve.service import Run, Service

DONE = "data: [DONE]\n\n"
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def sse(data: BaseModel | dict[str, Any], exclude_none: bool = True) -> str:
    """One server-sent event. OpenAI chunks leave unset fields out; TGI's events keep them as null."""
    body = data.model_dump_json(exclude_none=exclude_none) if isinstance(data, BaseModel) else json.dumps(data)
    return f"data: {body}\n\n"


def event_stream(events: AsyncIterator[str], media_type: str = "text/event-stream",
                 error_event: Callable[[dict], str] = lambda body: sse(body) + DONE) -> StreamingResponse:
    """A streaming response of `events`; an APIError after the headers went out ends the stream with
    `error_event` of its OpenAI body (an SSE error event and [DONE] by default)."""
    async def guarded() -> AsyncIterator[str]:
        async with aclosing(events):
            try:
                async for event in events:
                    yield event
            except APIError as e:
                yield error_event(e.body())

    return StreamingResponse(guarded(), media_type=media_type,
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def final_output(service: Service, request: Request, run: Run) -> RequestOutput:
    """The finished output of a run; aborted at once if the client disconnects while waiting."""
    async def last() -> RequestOutput:
        out = None
        async for snapshot in run.stream:
            out = snapshot  # each snapshot supersedes the one before; the last is the finished output
        return out

    try:
        return await service.until_disconnect(request, last())
    finally:
        await run.aclose()


async def first_output(service: Service, request: Request, run: Run) -> RequestOutput:
    """The first snapshot, awaited before a stream's headers go out: an engine refusal is still a 400."""
    try:
        return await service.until_disconnect(request, anext(run.stream))
    except BaseException:
        await run.aclose()
        raise


async def snapshots(first: RequestOutput, run: Run) -> AsyncIterator[RequestOutput]:
    """The first snapshot again, then the rest; the run is closed (aborted if unfinished) at the end."""
    try:
        yield first
        if not first.finished:
            async for out in run.stream:
                yield out
    finally:
        await run.aclose()


async def text_deltas(first: RequestOutput, run: Run
                      ) -> AsyncIterator[tuple[RequestOutput, CompletionOutput, str]]:
    """(snapshot, choice, its new text) whenever a choice's text grows or it finishes; a finished choice
    appears once more with its finish_reason set and never again."""
    sent: dict[int, str] = {}
    done: set[int] = set()
    async with aclosing(snapshots(first, run)) as outs:
        async for out in outs:
            for o in out.outputs:
                if o.index in done:
                    continue
                delta = o.text[len(sent.get(o.index, "")):]
                if o.finish_reason:
                    done.add(o.index)
                if delta or o.finish_reason:
                    sent[o.index] = o.text
                    yield out, o, delta


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The bytes a token stands for: sentencepiece pieces with "▁" as a space, <0xNN> byte pieces as
    that byte, anything else as its decoded text."""
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if isinstance(piece, str):
        byte = _BYTE_PIECE.fullmatch(piece)
        if byte:
            return bytes([int(byte.group(1), 16)])
        if "▁" in piece:
            return piece.replace("▁", " ").encode()
    return tokenizer.decode([token_id]).encode()


def token_text(tokenizer: Any, token_id: int) -> str:
    return token_bytes(tokenizer, token_id).decode("utf-8", errors="replace")


def finite(logprob: float) -> float:
    """A logprob JSON can carry: -inf and NaN become OpenAI's -9999.0."""
    return logprob if not math.isnan(logprob) and logprob > -9999.0 else -9999.0
