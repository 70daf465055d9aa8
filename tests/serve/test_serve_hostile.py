"""Hostile clients against a real server: pathological text in every field the server parses (answered at once,
while /health keeps answering), media URLs that used to fail the server (a NUL byte, a non-ASCII path), error
messages that named exception classes, library texts or what a host name resolves to, loosely typed fields,
and vLLM bodies judged by TGI's schema."""

from __future__ import annotations

import http.client
import json
import random
import re
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from llavakit.config import VideoConfig
from llavakit.processing.video import VideoLimits
from llavakit.serve.config import server_fetch_policy
from llavakit.serve.errors import APIError
from llavakit.serve.prompts import markdown_images
from llavakit.serve.videos import VideoSettings, prepare_videos

from .harness import AUTH

JSON = {**AUTH, "Content-Type": "application/json"}


def post(server, path: str, body: dict, timeout: float = 30) -> httpx.Response:
    """POST `body` as JSON with \\u escapes, so that NUL bytes and lone surrogates reach the server as sent."""
    return httpx.post(server.url + path, content=json.dumps(body).encode(), headers=JSON, timeout=timeout)


# --- parsing in linear time --------------------------------------------------------------------------------------

# TGI's rule for a markdown image, as the regex it once was: the reference the linear parser must agree with.
MARKDOWN_REFERENCE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
PATHOLOGICAL = ["![](", "![", "![](a", "![]( ", "![]", "![a](b", "![](a] ", "![![](", "!", "<image>![]("]


def test_markdown_images_are_those_the_regex_finds():
    rng = random.Random(0)
    for _ in range(20_000):
        text = "".join(rng.choice("![]()a \n") for _ in range(rng.randint(0, 30)))
        pieces = MARKDOWN_REFERENCE.split(text)
        assert markdown_images(text, "inputs") == ("<image>".join(pieces[0::2]), pieces[1::2]), text
    assert markdown_images("a ![x](u1) b ![](u2)c", "inputs") == ("a <image> b <image>c", ["u1", "u2"])


def test_markdown_parsing_is_linear():
    """The regex took a second on 20 KB of "![](", and four times that on twice as much. (20 KB first, so that
    a quadratic parser fails in seconds rather than hanging on 1 MB.)"""
    for size, limit in [(20_000, 0.5), (1_000_000, 1.0)]:
        cases = [p * (size // len(p)) for p in PATHOLOGICAL]
        cases += ["![" * (size // 4) + "](" + "x" * (size // 2), "![](" + "a]" * (size // 2) + " "]
        for text in cases:
            start = time.perf_counter()
            markdown_images(text, "inputs")
            assert time.perf_counter() - start < limit, (size, text[:20])


def _body(route: str, text: str) -> tuple[str, dict]:
    """A request whose one parsed text field is `text`."""
    return {
        "tgi": ("/generate", {"inputs": text}),
        "tgi-stream": ("/generate_stream", {"inputs": text}),
        "vllm": ("/generate", {"prompt": text}),
        "triton": ("/v2/models/tiny/generate", {"text_input": text}),
        "completions": ("/v1/completions", {"prompt": text}),
        "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}),
        "chat-parts": ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
            {"type": "text", "text": text}]}]}),
    }[route]


class HealthProbe:
    """GET /health in a loop on its own connection, keeping the slowest answer."""

    def __init__(self, url: str):
        self.url, self.slowest, self.count = url, 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                start = time.perf_counter()
                assert http.get(self.url + "/health").status_code == 200
                self.slowest = max(self.slowest, time.perf_counter() - start)
                self.count += 1
                time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        deadline = time.monotonic() + 10
        while self.count == 0 and time.monotonic() < deadline:  # probing before the first body is sent
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.mark.parametrize("route", ["tgi", "tgi-stream", "vllm", "triton", "completions", "chat", "chat-parts"])
def test_pathological_bodies_are_answered_at_once_and_health_meanwhile(server, route):
    """Bodies up to the 1 MiB limit of text built to make parsers backtrack: each is refused in well under a
    second (the text is over the context), and /health answers quickly all the while."""
    with HealthProbe(server.url) as probe:
        for size, pattern in [(64_000, "![]("), (1_000_000, "![]("), (1_000_000, "![]( "), (1_000_000, "<image>!["),
                              (1_000_000, "\x00llavakit:typed-image-tag\x00![")]:
            text = pattern * (size // (len(json.dumps(pattern)) - 2))  # JSON escapes NUL as \u0000
            start = time.perf_counter()
            r = post(server, *_body(route, text), timeout=20)
            took = time.perf_counter() - start
            assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
            assert took < 1.0, (route, size, pattern, took)
    assert probe.count >= 2 and probe.slowest < 0.5, (probe.count, probe.slowest)


# --- media failures are 400s, and the connection lives on ----------------------------------------------------------

def image_chat(url: str) -> dict:
    return {"model": "tiny", "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "hi"}]}]}


@pytest.mark.parametrize("url", ["file://{root}/a%00.png", "file://{root}/a\x00.png", "file://{root}/" + "a/" * 3000,
                                 "{media}/café.png", "http://127.0.0.1:99999/a.png", "http://a..b/a.png",
                                 "http://[::1/a.png"])
def test_bad_media_urls_are_400s_on_a_connection_that_goes_on(server, media_server, url):
    url = url.format(root=server.media_root, media=media_server.url)
    conn = http.client.HTTPConnection("127.0.0.1", int(server.url.rsplit(":", 1)[1]), timeout=30)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(image_chat(url)).encode(), JSON)
        bad = conn.getresponse()
        error = json.loads(bad.read())["error"]
        assert bad.status == 400 and error["code"] == "invalid_image_url", error
        sock = conn.sock
        assert sock is not None, "the server closed the connection"
        conn.request("POST", "/v1/chat/completions", json.dumps(image_chat(f"{media_server.url}/ok.png")).encode(),
                     JSON)
        good = conn.getresponse()
        assert good.status == 200 and json.loads(good.read())["choices"][0]["message"]["content"]
        assert conn.sock is sock
    finally:
        conn.close()


def test_a_non_ascii_path_is_fetched_percent_encoded(server, media_server):
    before = media_server.hits["/caf%C3%A9.png"]
    error = post(server, "/v1/chat/completions", image_chat(f"{media_server.url}/café.png")).json()["error"]
    assert "answered HTTP 404" in error["message"]
    assert media_server.hits["/caf%C3%A9.png"] == before + 1


def test_a_video_that_cannot_be_read_is_a_400_that_says_why(tmp_path):
    """Videos are read by the same guarded reader: a file URL with a NUL byte is refused as such."""
    processor = SimpleNamespace(cfg=SimpleNamespace(video=VideoConfig(num_frames=2), tokens_per_frame=1))
    settings = VideoSettings(server_fetch_policy(local_media_root=str(tmp_path)), VideoLimits())
    with pytest.raises(APIError) as e:
        prepare_videos([f"file://{tmp_path}/a%00.mp4"], processor, settings)
    assert e.value.status == 400 and e.value.code == "invalid_video"
    assert e.value.message.startswith("video 1: ") and "not a valid file path" in e.value.message


# --- error messages say nothing of the server -----------------------------------------------------------------------

# What no message may hold: exception class names, library texts, the server's settings.
LEAKS = re.compile(r"[A-Z][a-z]+(?:Error|Exception)\b|Errno|out of range|cast to integer|Invalid IPv6|codec|"
                   r"ordinal|null byte|FetchPolicy|resolves to|timeouts|label")
ADDRESSES = {"metadata.google.internal": "169.254.169.254", "db.internal": "10.1.2.3"}

# (URL, what the message says, what it must not say besides LEAKS): "{internal}", "{media}", "{root}" filled in.
BAD_URLS = [
    ("http://metadata.google.internal/computeMetadata/v1/", "no public internet address", "169.254"),
    ("http://db.internal:5432/", "no public internet address", "10.1.2.3"),
    ("http://nowhere.internal/", "no public internet address", None),
    ("http://localhost:{internal}/x.png", "no public internet address", "127.0.0.1"),
    ("http://127.0.0.1:99999/x.png", "port", None),
    ("http://127.0.0.1:http/x.png", "port", None),
    ("http://[::1/x.png", "malformed", None),
    ("http://a..b/x.png", "invalid host name", None),
    ("https://127.0.0.1:{media_port}/ok.png", "could not fetch", "SSL"),
    ("{media}/big.png", "send a smaller file", None),
    ("{media}/hop/4", "send the final URL", None),
    ("{media}/slow.png", "took longer than", None),
    ("file://{root}/../../etc/passwd", "outside the allowed local media directory", None),
]


@pytest.fixture
def internal_dns(monkeypatch):
    """Names that resolve to internal addresses, as they would inside a cloud network; one that does not."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == "nowhere.internal":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(ADDRESSES.get(host, host), *args, **kwargs)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.mark.parametrize("url, says, hidden", BAD_URLS, ids=[u for u, _, _ in BAD_URLS])
def test_url_errors_say_what_is_wrong_in_the_clients_terms(server, media_server, internal_server, internal_dns,
                                                           url, says, hidden):
    url = url.format(internal=internal_server.port, media=media_server.url, media_port=media_server.port,
                     root=server.media_root)
    r = post(server, "/v1/chat/completions", image_chat(url))
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "invalid_image_url", error
    message = error["message"]
    assert message.startswith("image 1: ") and says in message, message
    assert not LEAKS.search(message), message
    assert hidden is None or hidden not in message, message


def test_whether_a_name_resolves_is_not_told(server, internal_dns):
    """A private address and no address at all read alike, so clients cannot map internal names."""
    def message(host: str) -> str:
        return post(server, "/v1/chat/completions", image_chat(f"http://{host}/x.png")).json()["error"]["message"]

    assert message("db.internal") == message("nowhere.internal").replace("nowhere", "db")


# --- strict types -------------------------------------------------------------------------------------------------

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"prompt": "hi", "max_tokens": 2}
TGI = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
VLLM = {"prompt": "hi", "max_tokens": 2}
TRITON = {"text_input": "hi", "parameters": {"max_tokens": 2}}
TRITON_PATH = "/v2/models/tiny/generate"

# (path, body, the field at fault)
LOOSE_TYPES = [
    *[("/v1/chat/completions", {**CHAT, field: value}, field) for field, value in [
        ("stream", "yes"), ("stream", 1), ("logprobs", "yes"), ("logprobs", 1), ("max_tokens", True),
        ("max_tokens", "2"), ("max_tokens", 2.0), ("max_completion_tokens", True), ("n", True), ("n", 1.5),
        ("temperature", True), ("temperature", "0.5"), ("top_p", False), ("top_k", True), ("min_p", "0"),
        ("seed", True), ("seed", "1"), ("presence_penalty", True), ("frequency_penalty", "0"),
        ("repetition_penalty", True), ("ignore_eos", "true"), ("top_logprobs", True)]],
    ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": 1}},
     "stream_options.include_usage"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": 5}}]}]}, "messages.0.content.0.image_url.url"),
    *[("/v1/completions", {**COMPLETION, field: value}, field) for field, value in [
        ("logprobs", True), ("stream", "yes"), ("max_tokens", True), ("n", "2"), ("temperature", True)]],
    *[("/generate", {**TGI, "parameters": {field: value}}, f"parameters.{field}") for field, value in [
        ("max_new_tokens", True), ("do_sample", "yes"), ("details", 1), ("return_full_text", "true"),
        ("temperature", "1"), ("top_p", True), ("top_k", True), ("seed", 1.5), ("repetition_penalty", True)]],
    ("/generate", {**TGI, "stream": "yes"}, "stream"),
    ("/generate_stream", {**TGI, "parameters": {"details": "yes"}}, "parameters.details"),
    *[("/generate", {**VLLM, field: value}, field) for field, value in [
        ("stream", "yes"), ("n", True), ("max_tokens", 1.0), ("temperature", True), ("ignore_eos", 1)]],
    *[(TRITON_PATH, {**TRITON, "parameters": {field: value}}, f"parameters.{field}") for field, value in [
        ("max_tokens", True), ("exclude_input_in_output", "yes"), ("temperature", "0"), ("seed", True),
        ("top_k", 2.0)]],
]


@pytest.mark.parametrize("path, body, param", LOOSE_TYPES, ids=[f"{p} {pa}={json.dumps(b)[-20:]}"
                                                               for p, b, pa in LOOSE_TYPES])
def test_fields_are_typed_as_strictly_as_openai_types_them(server, path, body, param):
    r = post(server, path, body)
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "invalid_request", error
    assert error["param"] == param and error["message"].startswith(f"{param}: "), error


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {**CHAT, "temperature": 0, "top_p": 1, "presence_penalty": 0}),
    ("/generate", {**TGI, "parameters": {"max_new_tokens": 2, "temperature": 1, "top_p": 1}}),
    ("/generate", {**VLLM, "temperature": 0, "min_p": 0}),
    (TRITON_PATH, {**TRITON, "parameters": {"max_tokens": 2, "temperature": 0}}),
])
def test_a_number_field_takes_an_integer(server, path, body):
    assert post(server, path, body).status_code == 200


# --- /generate: vLLM's errors for vLLM's bodies -----------------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    ({"prompt": 1}, "prompt"),
    ({"prompt": "hi", "best_of": 2}, "best_of"),
    ({"prompt": "hi", "n": "2"}, "n"),
    ({"prompt": "hi", "multi_modal_data": {"image": 5}}, "multi_modal_data.image"),
    ({"inputs": 1}, "inputs"),
    ({"inputs": "hi", "prompt": "hi"}, "prompt"),
    ({}, "inputs"),
])
def test_generate_errors_name_a_field_of_the_api_the_body_is_written_for(server, body, param):
    """A body with "prompt" is judged as vLLM's, any other as TGI's: never "inputs: Field required" for a
    vLLM body."""
    r = post(server, "/generate", body)
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == param and error["message"].startswith(f"{param}: "), error
