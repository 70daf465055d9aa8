"""The TGI, vLLM and Triton formats against a real server: each answer equals the offline engine's on the
same raw prompt (images where the format puts them), streams add up to the whole answer, and TGI's and
vLLM's /generate are told apart by their body."""

from __future__ import annotations

import io
import json

import httpx
import pytest
from PIL import Image

from llavakit.sampling import SamplingParams

from .harness import AUTH, GOOD_PNG, data_url

IMAGE = Image.open(io.BytesIO(GOOD_PNG))


def raw(offline, prompt: str, images=(), **params):
    request = {"prompt": prompt, "conv_mode": "raw", "images": list(images)}
    return offline.generate([request], SamplingParams(**{"max_tokens": 10, **params}), use_tqdm=False)[0]


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=AUTH, timeout=60)


def sse_events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]


def test_tgi_generate_with_a_markdown_image(server, offline):
    ref = raw(offline, "Look: <image> what is it?", [IMAGE])
    body = {"inputs": f"Look: ![]({data_url(GOOD_PNG)}) what is it?",
            "parameters": {"max_new_tokens": 10, "details": True}}
    out = post(server, "/generate", body).json()
    assert out["generated_text"] == ref.text
    assert out["details"]["generated_tokens"] == len(ref.token_ids)
    assert [t["id"] for t in out["details"]["tokens"]] == ref.token_ids
    assert out["details"]["finish_reason"] == "length"

    events = sse_events(post(server, "/generate_stream", body))
    assert [e["token"]["id"] for e in events] == ref.token_ids
    assert "".join(e["token"]["text"] for e in events) == ref.text
    assert events[-1]["generated_text"] == ref.text and events[-1]["details"]["generated_tokens"] == 10
    assert all(e["generated_text"] is None for e in events[:-1])


def test_tgi_return_full_text_and_stop(server, offline):
    full = raw(offline, "Once upon a time", max_tokens=12).text
    needle = full[len(full) // 2:][:3]
    out = post(server, "/generate", {"inputs": "Once upon a time",
                                     "parameters": {"max_new_tokens": 12, "stop": [needle], "return_full_text": True,
                                                    "details": True}}).json()
    assert out["generated_text"] == "Once upon a time" + full[:full.index(needle)]
    assert out["details"]["finish_reason"] == "stop_sequence"


def test_vllm_generate(server, offline):
    ref = raw(offline, "<image>\nDescribe it.", [IMAGE], n=2, temperature=1.0, seed=3)
    body = {"prompt": "Describe it.", "multi_modal_data": {"image": data_url(GOOD_PNG)}, "n": 2, "temperature": 1.0,
            "seed": 3, "max_tokens": 10}
    out = post(server, "/generate", body).json()
    assert out == {"text": ["Describe it." + o.text for o in ref.outputs]}
    lines = [json.loads(line) for line in post(server, "/generate", {**body, "stream": True}).text.splitlines()]
    assert lines[-1] == out and len(lines) > 2


def test_triton_generate(server, offline):
    ref = raw(offline, "<image>\nHello", [IMAGE])
    body = {"text_input": "Hello", "image": data_url(GOOD_PNG), "parameters": {"max_tokens": 10, "temperature": 0}}
    out = post(server, "/v2/models/tiny/generate", body).json()
    assert out == {"model_name": "tiny", "model_version": "1", "text_output": "Hello" + ref.text}
    body["parameters"]["exclude_input_in_output"] = True
    assert post(server, "/v2/models/tiny/generate", body).json()["text_output"] == ref.text
    missing = post(server, "/v2/models/other/generate", body)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize("body", [{"inputs": "hi", "prompt": "hi"}, {"neither": 1}, {}])
def test_generate_needs_exactly_one_body_shape(server, body):
    r = post(server, "/generate", body)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
