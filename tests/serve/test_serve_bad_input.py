"""A table of bad requests against a real server: internal addresses in every spelling, redirects to them,
other schemes and local files, oversized, slow and malicious images, bad sampling values, malformed and
oversized bodies, missing credentials. Each gets the expected status and an OpenAI-shaped error, the
next normal request succeeds, and the internal test server is never reached."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from .harness import AUTH, GOOD_PNG, data_url, png_header

JSON = {**AUTH, "Content-Type": "application/json"}


def chat(content, **fields) -> dict:
    return {"model": "tiny", "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": content}],
            **fields}


def with_image(url: str, count: int = 1) -> dict:
    return chat([*[{"type": "image_url", "image_url": {"url": url}}] * count, {"type": "text", "text": "hi"}])


# (id, request, expected status, expected error code). A request is a JSON body for /v1/chat/completions,
# or ("raw", bytes), or (method, path, body, headers). "{internal}" / "{media}" / "{root}" are filled in.
CASES = [
    ("loopback", with_image("http://127.0.0.1:{internal}/x.png"), 400, "invalid_image_url"),
    ("localhost", with_image("http://localhost:{internal}/x.png"), 400, "invalid_image_url"),
    ("ipv6-loopback", with_image("http://[::1]:{internal}/x.png"), 400, "invalid_image_url"),
    ("ipv4-mapped-ipv6", with_image("http://[::ffff:127.0.0.1]:{internal}/x.png"), 400, "invalid_image_url"),
    ("decimal-ip", with_image("http://2130706433:{internal}/x.png"), 400, "invalid_image_url"),
    ("hex-ip", with_image("http://0x7f000001:{internal}/x.png"), 400, "invalid_image_url"),
    ("octal-short-ip", with_image("http://0177.1:{internal}/x.png"), 400, "invalid_image_url"),
    ("unspecified-0.0.0.0", with_image("http://0.0.0.0:{internal}/x.png"), 400, "invalid_image_url"),
    ("metadata", with_image("http://169.254.169.254/latest/meta-data/"), 400, "invalid_image_url"),
    ("metadata-decimal", with_image("http://2852039166/latest/meta-data/"), 400, "invalid_image_url"),
    ("link-local-ipv6", with_image("http://[fe80::1]/x.png"), 400, "invalid_image_url"),
    ("private-10/8", with_image("http://10.0.0.1/x.png"), 400, "invalid_image_url"),
    ("redirect-to-internal", with_image("{media}/redirect-internal"), 400, "invalid_image_url"),
    ("redirect-to-metadata", with_image("{media}/redirect-metadata"), 400, "invalid_image_url"),
    ("four-redirects", with_image("{media}/hop/4"), 400, "invalid_image_url"),
    ("file-outside-root", with_image("file:///etc/passwd"), 400, "invalid_image_url"),
    ("file-dot-dot", with_image("file://{root}/../../../etc/passwd"), 400, "invalid_image_url"),
    ("plain-path", with_image("/etc/passwd"), 400, "invalid_image_url"),
    ("ftp-scheme", with_image("ftp://127.0.0.1/x.png"), 400, "invalid_image_url"),
    ("oversized-download", with_image("{media}/big.png"), 400, "invalid_image_url"),
    ("slow-drip-download", with_image("{media}/slow.png"), 400, "invalid_image_url"),
    ("oversized-base64", with_image(data_url(b"\0" * 300_000)), 400, "invalid_image_url"),
    ("invalid-base64", with_image("data:image/png;base64,@@@@"), 400, "invalid_image_url"),
    ("bomb-png", with_image("{media}/bomb.png"), 400, "invalid_image"),
    ("25-megapixel-png", with_image(data_url(png_header(5000, 5000))), 400, "invalid_image"),
    ("truncated-jpeg", with_image("{media}/truncated.jpg"), 400, "invalid_image"),
    ("html-as-image", with_image("{media}/page.html"), 400, "invalid_image"),
    ("animated-gif", with_image("{media}/anim.gif"), 400, "invalid_image"),
    ("1x10000-image", with_image("{media}/tall.png"), 400, "invalid_image"),
    ("1x1-image", with_image("{media}/tiny.png"), 200, None),
    ("five-images", with_image(data_url(GOOD_PNG), count=5), 400, "too_many_images"),
    ("image-in-system-message", {"model": "tiny", "messages": [
        {"role": "system", "content": [{"type": "image_url", "image_url": {"url": data_url(GOOD_PNG)}}]},
        {"role": "user", "content": "hi"}]}, 400, None),
    ("typed-image-tags", chat("<image> <image>\n<image>"), 200, None),
    ("lone-surrogate", ("raw", b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\ud800b"}]}'),
     400, None),
    ("temperature-negative", chat("hi", temperature=-1), 400, "invalid_request"),
    ("temperature-nan", ("raw", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'), 400, None),
    ("top-p-zero", chat("hi", top_p=0), 400, "invalid_request"),
    ("n-9", chat("hi", n=9), 400, "invalid_request"),
    ("max-tokens-0", chat("hi", max_tokens=0), 400, "invalid_request"),
    ("top-logprobs-21", chat("hi", logprobs=True, top_logprobs=21), 400, "invalid_request"),
    ("top-logprobs-without-logprobs", chat("hi", top_logprobs=2), 400, None),
    ("empty-stop", chat("hi", stop=[""]), 400, "invalid_request"),
    ("seed-negative", chat("hi", seed=-1), 400, "invalid_request"),
    ("seed-over-int64", chat("hi", seed=2**70), 400, "invalid_request"),
    ("context-exceeded", chat("hi", max_tokens=300), 400, "context_length_exceeded"),
    ("prompt-over-context", chat("word " * 1000), 400, "context_length_exceeded"),
    ("prompt-far-over-context", chat("a" * 100_000), 400, "context_length_exceeded"),
    ("unknown-field", chat("hi", tools=[{"type": "function"}]), 400, "invalid_request"),
    ("unknown-model", chat("hi", model="gpt-4"), 404, "model_not_found"),
    ("unknown-part-type", chat([{"type": "input_audio", "input_audio": {}}]), 400, "invalid_request"),
    ("empty-messages", {"model": "tiny", "messages": []}, 400, "invalid_request"),
    ("last-message-assistant", {"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}, 400, None),
    ("roles-out-of-order", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     400, None),
    ("malformed-json", ("raw", b'{"messages": [{"role": "user", "content": "hi"}'), 400, "invalid_request"),
    ("json-array-body", ("raw", b"[1, 2, 3]"), 400, "invalid_request"),
    ("oversized-body", ("raw", b'{"x": "' + b"a" * (2**20) + b'"}'), 413, "request_too_large"),
    ("no-api-key", ("POST", "/v1/chat/completions", chat("hi"), {}), 401, "invalid_api_key"),
    ("wrong-api-key", ("POST", "/v1/chat/completions", chat("hi"), {"Authorization": "Bearer nope"}), 401,
     "invalid_api_key"),
    ("get-on-a-post-route", ("GET", "/v1/chat/completions", None, AUTH), 405, "method_not_allowed"),
    ("unknown-route", ("POST", "/v1/embeddings", {"input": "x"}, AUTH), 404, "not_found"),
    ("completions-typed-tag", ("POST", "/v1/completions", {"prompt": "<image>", "max_tokens": 2}, AUTH), 200, None),
]


def _fill(value, urls: dict):
    if isinstance(value, str):
        for key, url in urls.items():
            value = value.replace("{" + key + "}", str(url))
        return value
    if isinstance(value, dict):
        return {k: _fill(v, urls) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, urls) for v in value]
    return value


def _send(server, request, urls: dict) -> httpx.Response:
    with httpx.Client(base_url=server.url, timeout=30) as http:
        if isinstance(request, dict):
            return http.post("/v1/chat/completions", json=_fill(request, urls), headers=AUTH)
        if request[0] == "raw":
            return http.post("/v1/chat/completions", content=request[1], headers=JSON)
        method, path, body, headers = request
        return http.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize("name, request_, status, code", CASES, ids=[c[0] for c in CASES])
def test_bad_input(server, media_server, internal_server, name, request_, status, code):
    urls = {"internal": internal_server.port, "media": media_server.url, "root": server.media_root}
    start = time.monotonic()
    r = _send(server, request_, urls)
    assert r.status_code == status, r.text
    assert time.monotonic() - start < 10
    if status != 200:
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert isinstance(error["message"], str) and 0 < len(error["message"]) < 1000
        assert "Traceback" not in error["message"] and "Error(" not in error["message"]
        if code is not None:
            assert error["code"] == code, error
    assert internal_server.total == 0, internal_server.hits
    normal = _send(server, chat("Still there?"), urls)
    assert normal.status_code == 200 and normal.json()["choices"][0]["message"]["content"]


def test_slow_body_gets_408_and_the_server_goes_on(server):
    """A client that sends its body slowly is cut off by the body timeout (here shortened)."""
    old, server.service.cfg.body_timeout = server.service.cfg.body_timeout, 0.5

    def dribble():
        yield b'{"messages": ['
        time.sleep(1.5)
        yield b"]}"

    try:
        r = httpx.post(server.url + "/v1/chat/completions", content=dribble(), headers=JSON, timeout=10)
    finally:
        server.service.cfg.body_timeout = old
    assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout"


def test_a_slow_download_does_not_hold_up_other_requests(server, media_server):
    """Images are fetched on worker threads: while one request waits for a dripping image host, another
    request is answered."""
    slow_done = []

    def slow():
        body = _fill(with_image("{media}/slow.png"), {"media": media_server.url})
        slow_done.append((_send(server, body, {}).status_code, time.monotonic()))

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(0.2)
    normal = _send(server, chat("Quick one?"), {})
    answered = time.monotonic()
    thread.join(10)
    assert normal.status_code == 200 and slow_done[0][0] == 400
    assert answered < slow_done[0][1] - 0.5
