"""Fixtures for the server tests: one tiny checkpoint and its pipeline, the offline engine on it, and two
local HTTP servers standing for a public image host and an internal service. (tests/serve is a package
so that this conftest does not take the name of tests/conftest.py, which other tests import.)"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from checkpoints import (
    build_hf_model,
    processor_config,
    text_config_dict,
    write_hf_checkpoint,
)
from conftest import noise_image

import llavakit
from llavakit.config import EngineConfig
from llavakit.serve.config import server_fetch_policy

from .harness import (
    API_KEY,
    GOOD_PNG,
    CountingServer,
    drip,
    png_bytes,
    png_header,
    redirect,
    send,
    start_server,
)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny llava-1.5-style checkpoint (pad mode, 4 features per image, 512-token context)."""
    hf = build_hf_model("llava", text=text_config_dict(num_key_value_heads=2), seed=5)
    return write_hf_checkpoint(hf, tmp_path_factory.mktemp("serve") / "ck", "hub",
                               processor=processor_config("LlavaImageProcessor", do_pad=True))


@pytest.fixture(scope="session")
def pipe(checkpoint):
    return llavakit.load(checkpoint, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def internal_server():
    """Stands for an internal service: nothing may ever reach it through an image URL."""
    server = CountingServer({"*": send(GOOD_PNG)})
    yield server
    server.close()


@pytest.fixture(scope="session")
def media_server(internal_server):
    """Stands for a public image host (the servers trust its host:port)."""
    frames = [noise_image(20, 20, seed=i).convert("P") for i in range(2)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    jpeg = io.BytesIO()
    noise_image(64, 64, seed=4).save(jpeg, format="JPEG")
    routes = {
        "/ok.png": send(GOOD_PNG),
        "/tiny.png": send(png_bytes(noise_image(1, 1))),
        "/tall.png": send(png_bytes(noise_image(1, 10000))),
        "/anim.gif": send(gif.getvalue(), "image/gif"),
        "/bomb.png": send(png_header(30000, 30000)),
        "/truncated.jpg": send(jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "image/jpeg"),
        "/page.html": send(b"<html><body>not an image</body></html>" * 20, "image/png"),
        "/big.png": send(b"\0" * (1 << 20), length=False),
        "/slow.png": drip,
        "/redirect-ok": redirect("/ok.png"),
        "/redirect-internal": redirect(f"{internal_server.url}/secret"),
        "/redirect-metadata": redirect("http://169.254.169.254/latest/meta-data/"),
        **{f"/hop/{n}": redirect(f"/hop/{n - 1}" if n > 1 else "/ok.png") for n in range(1, 6)},
    }
    server = CountingServer(routes)
    yield server
    server.close()


@pytest.fixture(scope="session")
def server(pipe, media_server, tmp_path_factory):
    """The server most tests talk to: API key, 256-token context, 256 KiB per image, 1.5 s per download,
    1 MiB bodies, file:// under a temporary directory, the media server trusted as if it were public."""
    root = tmp_path_factory.mktemp("media")
    (root / "ok.png").write_bytes(GOOD_PNG)
    fetch = server_fetch_policy(256 * 1024, str(root), total_timeout=1.5, connect_timeout=1.0,
                                trusted_hosts=(f"127.0.0.1:{media_server.port}",))
    with start_server(pipe, EngineConfig(num_kv_blocks=256, max_model_len=256), model_name="tiny", api_key=API_KEY,
                      max_body_bytes=2**20, fetch=fetch) as srv:
        srv.media_root = root
        yield srv


@pytest.fixture(scope="session")
def offline(checkpoint):
    """The offline engine on the same checkpoint, with the server's engine limits."""
    return llavakit.LLM(str(checkpoint), dtype="float32", device="cpu", num_kv_blocks=256, max_model_len=256)
