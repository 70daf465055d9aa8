"""Helpers for the server tests: servers on 127.0.0.1 with free ports (uvicorn in a thread), /metrics
reading, and a local HTTP server that serves test images and counts hits."""

from __future__ import annotations

import base64
import io
import os
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
from conftest import noise_image

from llavakit.config import EngineConfig
from llavakit.serve.config import ServeConfig
from llavakit.serve.server import make_server
from llavakit.serve.service import Service

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class ServerThread:
    """uvicorn serving `service` on a free 127.0.0.1 port, in a daemon thread."""

    def __init__(self, service: Service):
        self.service = service
        self.sock = free_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = make_server(service, log_level="warning")
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def start_server(pipe, engine_cfg: EngineConfig | None = None, **cfg) -> ServerThread:
    engine_cfg = engine_cfg or EngineConfig(num_kv_blocks=256, max_model_len=256)
    return ServerThread(Service(pipe, engine_cfg, ServeConfig(**cfg)))


def metric(url: str, name: str) -> float:
    """One sample's value from /metrics (the first line starting with `name`)."""
    text = httpx.get(url + "/metrics").text
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# --- local image servers --------------------------------------------------------------------------------------


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels but holds almost no data (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


class CountingServer:
    """A threaded HTTP server on 127.0.0.1 that counts hits per path; `routes` maps a path to a function
    (handler) -> None that answers it."""

    def __init__(self, routes: dict):
        hits = self.hits = Counter()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hits[self.path] += 1
                route = routes.get(self.path) or routes.get("*")
                if route is None:
                    self.send_error(404)
                else:
                    route(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def total(self) -> int:
        return sum(self.hits.values())

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def send(body: bytes, content_type: str = "image/png", length: bool = True):
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        if length:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)
    return route


def redirect(location: str):
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(302)
        h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()
    return route


def drip(h: BaseHTTPRequestHandler) -> None:
    """A valid start, then one byte every 0.1 s: each read is quick, only a total deadline stops it."""
    h.send_response(200)
    h.send_header("Content-Type", "image/png")
    h.end_headers()
    try:
        for _ in range(100):
            h.wfile.write(b"\0")
            h.wfile.flush()
            time.sleep(0.1)
    except OSError:
        pass


GOOD_PNG = png_bytes(noise_image(40, 30, seed=3))


# --- `llavakit serve` in its own process, and raw sockets -------------------------------------------------------


class ServeProcess:
    """`llavakit serve` on the tiny checkpoint, on a free 127.0.0.1 port, in a subprocess (for limits that
    are per process: descriptors, memory). `fd_limit`: its soft and hard limits on open files, set as it
    starts (long before it serves: loading the model takes seconds)."""

    def __init__(self, checkpoint, *flags: str, fd_limit: int | None = None):
        sock = free_socket()
        self.port = sock.getsockname()[1]
        sock.close()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "llavakit", "serve", "--model", str(checkpoint), "--port", str(self.port),
                     "--device", "cpu", "--dtype", "float32", "--served-model-name", "tiny", "--log-level", "warning",
                     *flags]
        self.fd_limit = fd_limit

    def __enter__(self):
        self.proc = subprocess.Popen(self.args, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if self.fd_limit is not None:
            resource.prlimit(self.proc.pid, resource.RLIMIT_NOFILE, (self.fd_limit, self.fd_limit))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError("the server did not come up")

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait()
        self.proc.stderr.close()


def read_reply(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read until the server closes: the status, headers (lower-case names) and body of its one reply
    (status 0 and an empty body if it closed without one)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    if not data:
        return 0, {}, b""
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body
