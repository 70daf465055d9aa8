"""vLLM's simple API: POST /generate {"prompt", "multi_modal_data"?, sampling fields} -> {"text": [...]}
(SPEC §7), each text being the prompt followed by one completion. With "stream": true, one JSON object per
line, each holding the texts so far. The route itself lives in tgi_api, which shares the path."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import StreamingResponse

from llavakit.engine.llm_engine import RequestOutput
from llavakit.serve.openai_api import sampling_kwargs
from llavakit.serve.prompts import raw_text
from llavakit.serve.protocol import VLLMRequest, VLLMResponse
from llavakit.serve.service import Run, Service
from llavakit.serve.streaming import event_stream, final_output, first_output, snapshots


async def generate(body: VLLMRequest, request: Request) -> VLLMResponse | StreamingResponse:
    svc: Service = request.app.state.service
    image = body.multi_modal_data.image if body.multi_modal_data else None
    urls = [image] if isinstance(image, str) else list(image or [])

    def build():
        text = raw_text(body.prompt, len(urls), "prompt")
        images = svc.load_images(urls, "multi_modal_data.image")
        return svc.inputs(text, images)

    run = await svc.start(request, body.n, build, body.max_tokens, sampling_kwargs(body))
    if body.stream:
        first = await first_output(svc, request, run)
        return event_stream(_lines(run, first, body.prompt), media_type="application/x-ndjson",
                            error_event=lambda error: json.dumps(error) + "\n")
    out = await final_output(svc, request, run)
    return VLLMResponse(text=[body.prompt + o.text for o in out.outputs])


async def _lines(run: Run, first: RequestOutput, prompt: str) -> AsyncIterator[str]:
    async with aclosing(snapshots(first, run)) as snaps:
        async for snap in snaps:
            yield json.dumps({"text": [prompt + o.text for o in snap.outputs]}) + "\n"
