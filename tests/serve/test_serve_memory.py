"""Memory under a burst of large images, held to the bound docs/serving.md gives: at most
--max-decoding-images images are decoded at once, the memory they took goes back to the operating system
afterwards, and the request bodies held at once stay under --max-buffered-body-mb (more get 503)."""

from __future__ import annotations

import asyncio
import io
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from llavakit.serve.config import server_fetch_policy

from .harness import GOOD_PNG, ServeProcess, data_url, start_server

SIDE, IMAGES, REQUESTS, SLOTS = 4000, 4, 8, 2  # the red team's burst: 8 requests of four 16-megapixel images
MiB = 2**20
SLACK = 64 * MiB  # allocator rounding, thread stacks, a response's own objects


def decode_bytes(width: int, height: int) -> int:
    """docs/serving.md's cost of decoding one image: the decoded pixels and one copy (3 bytes each), and
    LLaVA-1.5's square padding of its longer side before resizing (the tiny checkpoint pads)."""
    return 3 * (2 * width * height + max(width, height) ** 2)


def large_png(seed: int) -> bytes:
    """A 4000x4000 PNG that compresses to a few hundred KB (blocks of 100x100 pixels), made in a second."""
    blocks = (np.random.RandomState(seed).rand(SIDE // 100, SIDE // 100, 3) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(blocks).resize((SIDE, SIDE), Image.Resampling.NEAREST).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def chat(images: list[str]) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "hi"}]}], "max_tokens": 1}


def rss(pid: int) -> int:
    """A process's resident set size in bytes (Linux)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024


class PeakRSS:
    """The highest resident set size of a process, sampled every 5 ms while inside the block."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss(self.pid))

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the server's memory from /proc")
def test_a_burst_of_large_images_stays_under_the_bound(checkpoint):
    body = chat([data_url(large_png(0))] * IMAGES)
    body_bytes = len(httpx.Request("POST", "http://x", json=body).content)
    with ServeProcess(checkpoint, "--max-decoding-images", str(SLOTS)) as srv:
        warm = httpx.post(srv.url + "/v1/chat/completions", json=chat([data_url(large_png(1))]), timeout=60)
        assert warm.status_code == 200, warm.text
        base = rss(srv.proc.pid)

        async def burst():
            async with httpx.AsyncClient(base_url=srv.url, timeout=120) as http:
                return await asyncio.gather(*[http.post("/v1/chat/completions", json=body) for _ in range(REQUESTS)])

        with PeakRSS(srv.proc.pid) as peak:
            responses = asyncio.run(burst())
        time.sleep(0.5)
        after = rss(srv.proc.pid)
    assert [r.status_code for r in responses] == [200] * REQUESTS
    bound = SLOTS * decode_bytes(SIDE, SIDE) + 3 * REQUESTS * body_bytes + SLACK
    assert peak.peak - base < bound, f"peak {(peak.peak - base) / MiB:.0f} MiB over the base, bound {bound / MiB:.0f}"
    assert after - base < SLACK, f"{(after - base) / MiB:.0f} MiB still held after the burst"


def test_request_bodies_held_at_once_stay_under_the_budget(pipe):
    """One client holds 800 KB of an unfinished body; with a 1 MiB budget the next 400 KB body gets 503,
    and once the first client leaves, its bytes are released."""
    with start_server(pipe, model_name="tiny", max_body_bytes=MiB, max_buffered_body_bytes=MiB, retry_after=3) as srv:
        address = ("127.0.0.1", int(srv.url.rsplit(":", 1)[1]))
        second = {"messages": [{"role": "user", "content": "x" * 400_000}], "max_tokens": 1}
        with socket.create_connection(address, timeout=5) as slow:
            slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 900000\r\n\r\n" + b" " * 800_000)
            time.sleep(0.3)  # the server has read what was sent
            refused = httpx.post(srv.url + "/v1/chat/completions", json=second, timeout=10)
            assert refused.status_code == 503 and refused.headers["Retry-After"] == "3"
            assert refused.json()["error"]["code"] == "overloaded"
        time.sleep(0.3)  # the server has seen the first client leave
        after = httpx.post(srv.url + "/v1/chat/completions", json=second, timeout=30)
        assert after.status_code == 400 and after.json()["error"]["code"] == "context_length_exceeded"


def test_a_slow_download_holds_no_decoding_turn(pipe, media_server):
    """With one decoding turn, a request whose image URL drips (until the 1.5 s fetch timeout) does not hold up
    another request's decode: the turn is taken after the download, around decoding only."""
    fetch = server_fetch_policy(256 * 1024, total_timeout=1.5, connect_timeout=1.0,
                                trusted_hosts=(f"127.0.0.1:{media_server.port}",))
    with start_server(pipe, model_name="tiny", max_decoding_images=1, fetch=fetch) as srv:

        async def both():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as http:
                slow = asyncio.create_task(http.post("/v1/chat/completions",
                                                     json=chat([f"{media_server.url}/slow.png"])))
                await asyncio.sleep(0.3)  # the slow download is under way
                start = time.monotonic()
                fast = await http.post("/v1/chat/completions", json=chat([data_url(GOOD_PNG)]))
                took = time.monotonic() - start
                return await slow, fast, took

        slow, fast, took = asyncio.run(both())
    assert slow.status_code == 400 and fast.status_code == 200, (slow.text, fast.text)
    assert took < 1.0, f"the second request waited {took:.2f} s for the slow download's turn"
