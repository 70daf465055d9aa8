"""Videos over /v1/chat/completions against a real server on a tiny LLaVA-NeXT-Video checkpoint: a data: URL
video and one fetched from a (trusted) host answer exactly what the offline engine answers; the guarded
fetcher refuses internal addresses without reaching them; bad, oversized and too long videos, too many
videos and videos for a model without video support are 400s in the OpenAI error shape, and the server
goes on serving; typed "<video>" never becomes a video slot; the CLI flags reach ServeConfig."""

from __future__ import annotations

import io
import struct

import httpx
import openai
import pytest
from PIL import Image
from videos import next_video_checkpoint, noise_frames, write_audio, write_video

import llavakit
from llavakit.config import EngineConfig
from llavakit.processing.prompt import IMAGE_TAG, VIDEO_TAG
from llavakit.sampling import SamplingParams
from llavakit.serve.config import server_fetch_policy
from llavakit.serve.prompts import chat_input, render_chat
from llavakit.serve.protocol import ChatMessage

from .harness import (
    API_KEY,
    AUTH,
    GOOD_PNG,
    CountingServer,
    data_url,
    redirect,
    send,
    start_server,
)

FRAMES = 3  # frames sampled per video; 4 tokens each on this checkpoint
TOKENS_PER_FRAME = 4
MAX_VIDEO_BYTES = 32 * 1024  # the clips are ~4 KB; "big.mp4" is ~64 KB
MAX_VIDEO_SECONDS = 2.0  # "long.mp4" lasts 3 s
GREEDY = {"temperature": 0, "max_tokens": 8}


def _mdat_offset(mp4: bytes) -> int:
    """Where the top-level 'mdat' box (the coded frames) starts."""
    pos = 0
    while pos + 8 <= len(mp4):
        size, kind = struct.unpack(">I4s", mp4[pos:pos + 8])
        if kind == b"mdat":
            return pos
        pos += size
    raise AssertionError("no mdat box")


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("clips")
    ok = write_video(root / "ok.mp4", noise_frames(6, 32, 24, seed=1))  # 0.75 s at 8 fps
    faststart = write_video(root / "faststart.mp4", noise_frames(6, 32, 24, seed=2),
                            options={"movflags": "faststart"}).read_bytes()  # header first, then frames
    out = {
        "root": root,
        "ok_path": ok,
        "ok": ok.read_bytes(),
        "long": write_video(root / "long.mp4", noise_frames(6, 32, 24, seed=3), fps=2).read_bytes(),  # 3 s
        "big": write_video(root / "big.mp4", noise_frames(24, 96, 96, seed=4)).read_bytes(),  # over the cap
        "no_frames": faststart[:_mdat_offset(faststart) + 8],  # a complete header, not one coded frame
        "cut_header": faststart[:400],
        "audio": write_audio(root / "tone.wav").read_bytes(),
    }
    assert len(out["ok"]) < MAX_VIDEO_BYTES < len(out["big"])
    return out


@pytest.fixture(scope="module")
def clip_server(clips, internal_server):
    """Stands for a public video host (the video server trusts its host:port)."""
    server = CountingServer({
        "/ok.mp4": send(clips["ok"], "video/mp4"),
        "/big.mp4": send(clips["big"], "video/mp4", length=False),  # no Content-Length: the cap trips mid-stream
        "/page.html": send(b"<html><body>not a video</body></html>" * 20, "video/mp4"),
        "/redirect-ok": redirect("/ok.mp4"),
        "/redirect-internal": redirect(f"{internal_server.url}/clip.mp4"),
    })
    yield server
    server.close()


@pytest.fixture(scope="module")
def video_checkpoint(tmp_path_factory):
    return next_video_checkpoint(tmp_path_factory.mktemp("serve-video") / "ck", seed=3)[1]


@pytest.fixture(scope="module")
def video_server(video_checkpoint, clip_server, clips):
    """256 KiB per image, MAX_VIDEO_BYTES per video, 3 s per download, file:// under the clips' directory."""
    pipe = llavakit.load(video_checkpoint, dtype="float32", device="cpu", num_frames=FRAMES)
    fetch = server_fetch_policy(256 * 1024, str(clips["root"]), total_timeout=3.0, connect_timeout=1.0,
                                trusted_hosts=(f"127.0.0.1:{clip_server.port}",))
    with start_server(pipe, EngineConfig(num_kv_blocks=128, max_model_len=512), model_name="tiny-video",
                      api_key=API_KEY, fetch=fetch, max_video_bytes=MAX_VIDEO_BYTES,
                      max_video_seconds=MAX_VIDEO_SECONDS) as srv:
        yield srv


@pytest.fixture(scope="module")
def video_offline(video_checkpoint):
    return llavakit.LLM(str(video_checkpoint), dtype="float32", device="cpu", num_kv_blocks=128, max_model_len=512,
                        num_frames=FRAMES)


@pytest.fixture(scope="module")
def client(video_server):
    return openai.OpenAI(api_key=API_KEY, base_url=video_server.url + "/v1", max_retries=0)


def video_part(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def reference(offline, request: dict):
    return offline.generate([request], SamplingParams(max_tokens=GREEDY["max_tokens"]), use_tqdm=False)[0]


def post(server, body: dict) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=AUTH, timeout=30)


# --- answers equal the offline engine's --------------------------------------------------------------------


def test_a_data_url_video_equals_the_offline_engine(client, video_offline, clips):
    question = "What happens in the clip?"
    ref = reference(video_offline, {"messages": [{"role": "user", "content": question}],
                                    "videos": [str(clips["ok_path"])]})
    video_id = video_offline.pipe.config.video_token_id
    assert ref.prompt_token_ids.count(video_id) == FRAMES * TOKENS_PER_FRAME
    messages = [{"role": "user", "content": [video_part(data_url(clips["ok"], "video/mp4")), text_part(question)]}]
    out = client.chat.completions.create(model="tiny-video", messages=messages, **GREEDY)
    assert out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == len(ref.token_ids)
    chunks = list(client.chat.completions.create(model="tiny-video", messages=messages, stream=True, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text


def test_an_image_and_a_video_equal_the_offline_engine(client, video_offline, clips):
    """Images go before videos in their message whatever the part order, as the offline template puts them; the
    server, LLM.generate and Pipeline.chat (the plain loop) give the same answer: one request path."""
    question = "Compare the picture with the clip."
    messages = [{"role": "user", "content": question}]
    media = {"images": [Image.open(io.BytesIO(GOOD_PNG))], "videos": [str(clips["ok_path"])]}
    ref = reference(video_offline, {"messages": messages, **media})
    plain = video_offline.pipe.chat(messages, **media, max_new_tokens=GREEDY["max_tokens"])
    assert (plain.text, plain.token_ids, plain.prompt_token_ids) == (ref.text, ref.token_ids, ref.prompt_token_ids)
    content = [video_part(data_url(clips["ok"], "video/mp4")), text_part(question), image_part(data_url(GOOD_PNG))]
    out = client.chat.completions.create(model="tiny-video", messages=[{"role": "user", "content": content}],
                                         **GREEDY)
    assert out.choices[0].message.content == ref.text
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_a_video_from_a_host_or_the_media_directory_works(client, clip_server, clips):
    def ask(url: str):
        messages = [{"role": "user", "content": [video_part(url), text_part("Describe it.")]}]
        return client.chat.completions.create(model="tiny-video", messages=messages, **GREEDY)

    before = clip_server.hits["/ok.mp4"]
    fetched = ask(f"{clip_server.url}/ok.mp4")
    assert clip_server.hits["/ok.mp4"] == before + 1
    inline = ask(data_url(clips["ok"], "video/mp4"))
    assert fetched.choices[0].message.content == inline.choices[0].message.content
    assert fetched.usage == inline.usage
    redirected = ask(f"{clip_server.url}/redirect-ok")
    assert redirected.choices[0].message.content == inline.choices[0].message.content
    local = ask(clips["ok_path"].as_uri())
    assert local.choices[0].message.content == inline.choices[0].message.content


def test_typed_video_tags_stay_text(video_server, clips):
    svc = video_server.service
    cfg = svc.processor.cfg
    video = svc.load_videos([data_url(clips["ok"], "video/mp4")], "messages")
    chat = chat_input([ChatMessage(role="user", content=[video_part("x"), text_part("Is <video> or <image> here?")])])
    assert chat.videos == ["x"] and chat.images == []
    ids = svc.inputs(render_chat(svc.processor, chat.messages), [], video).ids
    assert ids.count(cfg.video_token_id) == video[0].num_tokens == FRAMES * TOKENS_PER_FRAME
    start = ids.index(cfg.video_token_id)
    assert ids[start:start + video[0].num_tokens] == [cfg.video_token_id] * video[0].num_tokens
    assert cfg.image_token_id not in ids
    text = svc.processor.tokenizer.decode(ids[start + video[0].num_tokens:])
    assert f"Is {VIDEO_TAG} or {IMAGE_TAG} here?" in text
    for content in ("<video>", "<video><video>\n<image>", [text_part("<video>"), image_part(data_url(GOOD_PNG))]):
        r = post(video_server, {"model": "tiny-video", "messages": [{"role": "user", "content": content}], **GREEDY})
        assert r.status_code == 200, r.text


# --- refusals --------------------------------------------------------------------------------------------------


def with_video(url: str, count: int = 1) -> dict:
    return {"model": "tiny-video", "messages": [{"role": "user", "content": [
        *[video_part(url)] * count, text_part("What happens?")]}], **GREEDY}


# (id, request body, expected status, expected code); "{internal}", "{clips}" (the clip server), "{root}" (the
# media directory) and "{clip:NAME}" (a data: URL of that clip) are filled in.
CASES = [
    ("loopback-url", with_video("http://127.0.0.1:{internal}/clip.mp4"), 400, "invalid_video"),
    ("localhost-url", with_video("http://localhost:{internal}/clip.mp4"), 400, "invalid_video"),
    ("metadata-url", with_video("http://169.254.169.254/latest/meta-data/"), 400, "invalid_video"),
    ("redirect-to-internal", with_video("{clips}/redirect-internal"), 400, "invalid_video"),
    ("file-outside-root", with_video("file:///etc/passwd"), 400, "invalid_video"),
    ("file-dot-dot", with_video("file://{root}/../../../../etc/passwd"), 400, "invalid_video"),
    ("oversized-file", with_video("file://{root}/big.mp4"), 400, "invalid_video"),
    ("plain-path", with_video("/etc/passwd"), 400, "invalid_video"),
    ("ftp-url", with_video("ftp://127.0.0.1/clip.mp4"), 400, "invalid_video"),
    ("invalid-base64", with_video("data:video/mp4;base64,@@@@"), 400, "invalid_video"),
    ("not-a-video", with_video(data_url(b"certainly not a video " * 40, "video/mp4")), 400, "invalid_video"),
    ("png-as-video", with_video(data_url(GOOD_PNG, "video/mp4")), 400, "invalid_video"),
    ("html-served-as-video", with_video("{clips}/page.html"), 400, "invalid_video"),
    ("audio-only", with_video("{clip:audio}"), 400, "invalid_video"),
    ("no-decodable-frames", with_video("{clip:no_frames}"), 400, "invalid_video"),
    ("cut-header", with_video("{clip:cut_header}"), 400, "invalid_video"),
    ("oversized-base64", with_video("{clip:big}"), 400, "invalid_video"),
    ("oversized-download", with_video("{clips}/big.mp4"), 400, "invalid_video"),
    ("too-long", with_video("{clip:long}"), 400, "invalid_video"),
    ("two-videos", with_video("{clip:ok}", count=2), 400, "too_many_videos"),
    ("empty-url", with_video(""), 400, "invalid_request"),
    ("unknown-field", {**with_video("{clip:ok}"), "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": "x", "fps": 2}}]}]}, 400, "invalid_request"),
    ("video-in-assistant-message", {"model": "tiny-video", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": [video_part("{clip:ok}")]},
        {"role": "user", "content": "and?"}]}, 400, None),
    ("video-and-text-over-context", {**with_video("{clip:ok}"), "max_tokens": 500}, 400, "context_length_exceeded"),
]


def _fill(value, urls: dict, clips: dict):
    if isinstance(value, str):
        for key, url in urls.items():
            value = value.replace("{" + key + "}", str(url))
        if value.startswith("{clip:"):
            value = data_url(clips[value[len("{clip:"):-1]], "video/mp4")
        return value
    if isinstance(value, dict):
        return {k: _fill(v, urls, clips) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, urls, clips) for v in value]
    return value


def check_error(r: httpx.Response, status: int, code: str | None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert isinstance(error["message"], str) and 0 < len(error["message"]) < 1000
    assert "Traceback" not in error["message"] and "Error(" not in error["message"]
    assert "Error:" not in error["message"] and "NoneType" not in error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.mark.parametrize("name, body, status, code", CASES, ids=[c[0] for c in CASES])
def test_bad_videos(video_server, clip_server, internal_server, clips, name, body, status, code):
    urls = {"internal": internal_server.port, "clips": clip_server.url, "root": clips["root"]}
    error = check_error(post(video_server, _fill(body, urls, clips)), status, code)
    if code == "invalid_video":
        assert error["message"].startswith("video 1"), error
        assert "FetchPolicy" not in error["message"] and "VideoLimits" not in error["message"], error
        assert "image" not in error["message"] or name == "png-as-video", error
    assert internal_server.total == 0, internal_server.hits
    normal = post(video_server, _fill(with_video("{clip:ok}"), urls, clips))
    assert normal.status_code == 200 and normal.json()["choices"][0]["message"]["content"]


def test_the_limits_are_named(video_server, clip_server, clips):
    too_long = post(video_server, with_video(data_url(clips["long"], "video/mp4"))).json()["error"]["message"]
    assert "lasts 3 s, over the 2 s limit" in too_long
    too_big = post(video_server, with_video(data_url(clips["big"], "video/mp4"))).json()["error"]["message"]
    assert f"over the {MAX_VIDEO_BYTES}-byte limit" in too_big
    download = post(video_server, with_video(f"{clip_server.url}/big.mp4")).json()["error"]["message"]
    assert f"more than the {MAX_VIDEO_BYTES}-byte limit" in download


def test_a_video_to_a_model_without_video_support(server, clip_server):
    """The llava-1.5 server of conftest: a video is refused before anything is fetched."""
    before = clip_server.total
    body = {"model": "tiny", "messages": [{"role": "user", "content": [
        video_part(f"{clip_server.url}/ok.mp4"), text_part("What happens?")]}], **GREEDY}
    error = check_error(post(server, body), 400, "invalid_request")
    assert "takes no videos" in error["message"] and "llava_next_video" in error["message"]
    assert clip_server.total == before
    typed = post(server, {"model": "tiny", "messages": [{"role": "user", "content": "<video> and <image>"}], **GREEDY})
    assert typed.status_code == 200, typed.text


# --- configuration ------------------------------------------------------------------------------------------


def test_the_cli_flags_reach_the_server_config(monkeypatch):
    import llavakit.cli.serve as serve_cli
    import llavakit.serve.server
    import llavakit.serve.service
    from llavakit.cli import main

    seen = {}
    monkeypatch.setattr(serve_cli, "load_pipeline", lambda args: seen.setdefault("frames", args.video_frames))
    monkeypatch.setattr(llavakit.serve.service, "Service", lambda pipe, engine_cfg, cfg: cfg)
    monkeypatch.setattr(llavakit.serve.server, "serve",
                        lambda cfg, log_level, sock=None: seen.setdefault("cfg", cfg))
    assert main(["serve", "--model", "x", "--port", "0"]) == 0
    cfg = seen.pop("cfg")
    assert (cfg.max_video_bytes, cfg.max_video_seconds, cfg.max_videos_per_request) == (64 * 2**20, 600, 1)
    assert seen.pop("frames") is None
    assert main(["serve", "--model", "x", "--port", "0", "--max-video-mb", "1.5", "--max-video-seconds", "30",
                 "--max-videos-per-request", "2", "--video-frames", "4"]) == 0
    cfg = seen["cfg"]
    assert (cfg.max_video_bytes, cfg.max_video_seconds, cfg.max_videos_per_request) == (int(1.5 * 2**20), 30, 2)
    assert seen["frames"] == 4
    with pytest.raises(SystemExit) as e:  # a usage error, refused before anything loads
        main(["serve", "--model", "x", "--max-video-seconds", "0"])
    assert e.value.code == 2
