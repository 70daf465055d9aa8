"""Triton's generate extension: POST /v2/models/{model}/generate {"text_input", "parameters", "image"?}
-> {"model_name", "model_version", "text_output"} (SPEC §7). As Triton's vLLM backend does, text_output
starts with the input unless parameters.exclude_input_in_output is true. Images go before the text."""

from __future__ import annotations

from fastapi import APIRouter, Request

from llavakit.serve.openai_api import ERRORS
from llavakit.serve.prompts import raw_text
from llavakit.serve.protocol import TritonRequest, TritonResponse
from llavakit.serve.service import Service
from llavakit.serve.streaming import final_output

router = APIRouter(responses=ERRORS)


@router.post("/v2/models/{model}/generate", response_model=TritonResponse)
async def generate(model: str, body: TritonRequest, request: Request) -> TritonResponse:
    svc: Service = request.app.state.service
    svc.check_model(model)
    urls = [body.image] if isinstance(body.image, str) else list(body.image or [])

    def build():
        text = raw_text(body.text_input, len(urls), "text_input")
        images = svc.load_images(urls, "image")
        return svc.inputs(text, images)

    p = body.parameters
    sampling = {"temperature": 1.0 if p.temperature is None else p.temperature, "top_p": p.top_p,
                "top_k": p.top_k, "seed": p.seed, "stop": [p.stop] if isinstance(p.stop, str) else p.stop}
    run = await svc.start(request, 1, build, p.max_tokens, sampling)
    out = (await final_output(svc, request, run)).outputs[0]
    prefix = "" if p.exclude_input_in_output else body.text_input
    return TritonResponse(model_name=svc.cfg.model_name, text_output=prefix + out.text)
