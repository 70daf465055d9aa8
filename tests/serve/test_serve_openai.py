"""The OpenAI API through the official `openai` client against a real server: outputs, usage and logprobs
equal the offline engine's on the same checkpoint; streaming equals non-streaming; 32 concurrent clients
get what sequential requests get; a client that disconnects frees its KV blocks."""

from __future__ import annotations

import asyncio
import io
import time

import httpx
import openai
import pytest
from conftest import noise_image
from PIL import Image, ImageOps

from llavakit.sampling import SamplingParams

from .harness import API_KEY, AUTH, GOOD_PNG, data_url, metric, png_bytes

IMAGE = Image.open(io.BytesIO(GOOD_PNG))
IMAGE_URL = data_url(GOOD_PNG)
GREEDY = {"temperature": 0, "max_tokens": 12}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key=API_KEY, base_url=server.url + "/v1", max_retries=0)


def reference(offline, request: dict, **params):
    return offline.generate([request], SamplingParams(**{"max_tokens": 12, **params}), use_tqdm=False)[0]


def chat(client, messages, **kw):
    return client.chat.completions.create(model="tiny", messages=messages, **{**GREEDY, **kw})


def image_part(url: str = IMAGE_URL) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


CONVERSATION = [{"role": "user", "content": [image_part(), {"type": "text", "text": "What is in the picture?"}]},
                {"role": "assistant", "content": "A square with noise."},
                {"role": "user", "content": "Which colours?"}]
PLAIN_MESSAGES = [{"role": "user", "content": "Tell me a story."}]
IMAGE_MESSAGES = CONVERSATION[:1]


@pytest.mark.parametrize("messages, request_", [
    (PLAIN_MESSAGES, {"messages": PLAIN_MESSAGES}),
    (IMAGE_MESSAGES, {"messages": [{"role": "user", "content": "What is in the picture?"}], "images": [IMAGE]}),
    (CONVERSATION, {"messages": [{"role": "user", "content": "What is in the picture?"}, *CONVERSATION[1:]],
                    "images": [IMAGE]}),
], ids=["plain", "image-base64", "two-turns"])
def test_chat_equals_the_offline_engine(client, offline, messages, request_):
    ref = reference(offline, request_)
    out = chat(client, messages)
    assert out.choices[0].message.content == ref.text
    assert out.choices[0].finish_reason == ref.outputs[0].finish_reason
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == len(ref.token_ids)
    assert out.model == "tiny" and out.id.startswith("chatcmpl-")
    stream = chat(client, messages, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == len(ref.prompt_token_ids)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [ref.outputs[0].finish_reason]


def _rgba_png() -> bytes:
    rgba = IMAGE.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))  # from opaque to fully transparent
    return png_bytes(rgba)


def _rotated_jpeg() -> bytes:
    buf, exif = io.BytesIO(), Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    IMAGE.save(buf, format="JPEG", exif=exif)
    return buf.getvalue()


@pytest.mark.parametrize("raw, mime", [(_rgba_png(), "image/png"), (_rotated_jpeg(), "image/jpeg")],
                         ids=["alpha-onto-white", "exif-orientation"])
def test_transparency_and_orientation_as_offline(client, offline, raw, mime):
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(raw)))
    flat = Image.alpha_composite(Image.new("RGBA", upright.size, "white"), upright.convert("RGBA")).convert("RGB")
    assert flat.size == ((IMAGE.height, IMAGE.width) if mime == "image/jpeg" else IMAGE.size)  # turned upright
    ref = reference(offline, {"messages": [{"role": "user", "content": "Hi"}], "images": [flat]})
    out = chat(client, [{"role": "user", "content": [image_part(data_url(raw, mime)), {"type": "text", "text": "Hi"}]}])
    assert out.choices[0].message.content == ref.text


def test_two_images_in_one_message(client, offline):
    other = noise_image(25, 60, seed=9)
    ref = reference(offline, {"messages": [{"role": "user", "content": "Compare them."}], "images": [IMAGE, other]})
    out = chat(client, [{"role": "user", "content": [image_part(), image_part(data_url(png_bytes(other))),
                                                     {"type": "text", "text": "Compare them."}]}])
    assert out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_image_by_http_url_and_file_url(client, offline, server, media_server):
    ref = reference(offline, {"messages": [{"role": "user", "content": "Hi"}], "images": [IMAGE]})
    for url in (media_server.url + "/redirect-ok", f"file://{server.media_root}/ok.png"):
        out = chat(client, [{"role": "user", "content": [image_part(url), {"type": "text", "text": "Hi"}]}])
        assert out.choices[0].message.content == ref.text, url


def test_completions_equal_raw_prompts(client, offline):
    prompt = "The capital of France is"
    ref = reference(offline, {"prompt": prompt, "conv_mode": "raw"})
    out = client.completions.create(model="tiny", prompt=prompt, **GREEDY)
    assert out.choices[0].text == ref.text and out.usage.prompt_tokens == len(ref.prompt_token_ids)
    streamed = list(client.completions.create(model="tiny", prompt=prompt, stream=True, **GREEDY))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == ref.text
    lp = client.completions.create(model="tiny", prompt=prompt, logprobs=2, **GREEDY).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ref.token_ids)
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(chosen)
               for top, chosen in zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    assert lp.text_offset == sorted(lp.text_offset) and "".join(lp.tokens).strip() == ref.text.strip()


def test_n_seed_stop_and_logprobs(client, offline):
    seeded = {"temperature": 1.0, "seed": 7, "n": 3, "max_tokens": 10}
    ref = reference(offline, {"messages": PLAIN_MESSAGES}, **seeded)
    out = chat(client, PLAIN_MESSAGES, **seeded)
    assert [c.message.content for c in out.choices] == [o.text for o in ref.outputs]
    assert len({c.message.content for c in out.choices}) > 1

    full = reference(offline, {"messages": PLAIN_MESSAGES}, max_tokens=12).text
    needle = full[len(full) // 2:][:3]
    stopped = chat(client, PLAIN_MESSAGES, stop=[needle])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == full[:full.index(needle)]

    lp = chat(client, PLAIN_MESSAGES, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert len(lp) == 12
    for entry in lp:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert entry.logprob >= entry.top_logprobs[1].logprob
        assert bytes(entry.bytes).decode(errors="replace") == entry.token


def test_models_health_and_metrics(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert metric(server.url, "llavakit_prompt_tokens_total") > 0
    assert metric(server.url, "llavakit_generation_tokens_total") > 0
    assert metric(server.url, "llavakit_time_to_first_token_seconds_count") > 0
    for name in ("llavakit_requests_waiting", "llavakit_requests_running", "llavakit_kv_cache_usage_ratio",
                 "llavakit_generation_tokens_per_second", "llavakit_request_latency_seconds_count"):
        metric(server.url, name)


def test_32_concurrent_clients_get_the_sequential_answers(server):
    bodies = [{"model": "tiny", "max_tokens": 8, "temperature": 0,
               "messages": [{"role": "user", "content": [image_part(), {"type": "text", "text": f"Question {i}?"}]
                             if i % 3 == 0 else f"Question number {i}, please."}]} for i in range(32)]
    url = server.url + "/v1/chat/completions"
    sequential = [httpx.post(url, json=b, headers=AUTH, timeout=60).json()["choices"][0]["message"]["content"]
                  for b in bodies]

    async def concurrently():
        async with httpx.AsyncClient(headers=AUTH, timeout=120) as http:
            return await asyncio.gather(*[http.post(url, json=b) for b in bodies])

    responses = asyncio.run(concurrently())
    assert [r.status_code for r in responses] == [200] * 32
    assert [r.json()["choices"][0]["message"]["content"] for r in responses] == sequential


def _kv_back_to(url: str, baseline: float) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if (metric(url, "llavakit_kv_cache_usage_ratio") == baseline and metric(url, "llavakit_requests_running") == 0
                and metric(url, "llavakit_requests_in_flight") == 0):
            return True
        time.sleep(0.05)
    return False


ABANDONED = 'llavakit_requests_total{outcome="abandoned"}'


def test_disconnect_mid_stream_frees_the_kv_blocks(server):
    baseline = metric(server.url, "llavakit_kv_cache_usage_ratio")
    abandoned = _count(server.url, ABANDONED)
    body = {"model": "tiny", "messages": PLAIN_MESSAGES, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert metric(server.url, "llavakit_kv_cache_usage_ratio") > baseline
    assert _kv_back_to(server.url, baseline)
    assert _count(server.url, ABANDONED) == abandoned + 1


def test_disconnect_while_waiting_for_a_whole_answer_aborts_it(server):
    baseline = metric(server.url, "llavakit_kv_cache_usage_ratio")
    abandoned = _count(server.url, ABANDONED)
    body = {"model": "tiny", "messages": PLAIN_MESSAGES, "max_tokens": 200, "ignore_eos": True, "n": 4}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=0.25)
    assert _kv_back_to(server.url, baseline)
    assert _count(server.url, ABANDONED) == abandoned + 1


def _count(url: str, name: str) -> float:
    try:
        return metric(url, name)
    except AssertionError:  # a labelled counter appears once it was first incremented
        return 0.0
