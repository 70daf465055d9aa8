"""Hostile clients at the connection level, over raw sockets: bytes that are not HTTP get an OpenAI-shaped
JSON error and a closed connection (uvicorn alone answers plain text); slow, silent and idle connections
are closed after their timeouts; and beyond the connection cap a new client is still served, also when
1,100 half-open connections are held against a server limited to 1,024 file descriptors."""

from __future__ import annotations

import json
import os
import resource
import select
import socket
import sys
import time
from pathlib import Path

import httpx
import pytest

from .harness import ServeProcess, read_reply, start_server

TIMEOUT = 1.0  # the header and idle timeouts of the servers here


@pytest.fixture(scope="module")
def guarded(pipe):
    with start_server(pipe, model_name="tiny", header_timeout=TIMEOUT, idle_timeout=TIMEOUT) as srv:
        srv.address = ("127.0.0.1", int(srv.url.rsplit(":", 1)[1]))
        yield srv


def assert_error(status: int, headers: dict, body: bytes, expected_status: int, code: str) -> None:
    assert status == expected_status, body
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]


HEAD = b"GET /health HTTP/1.1\r\nHost: x\r\n"
CLIENT_HELLO = bytes.fromhex("16030100c8010000c40303") + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00"


@pytest.mark.parametrize("raw, status, code", [
    (HEAD + b"X-Big: " + b"a" * 2**20 + b"\r\n\r\n", 431, "request_header_too_large"),
    (b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, "invalid_request"),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400, "invalid_request"),
    (CLIENT_HELLO, 400, "invalid_request"),
    (b"GET /hea\x00lth HTTP/1.1\r\nHost: x\r\n\r\n", 400, "invalid_request"),
    (b"GET /health HTTP/1.1\r\n\r\n", 400, "invalid_request"),  # no Host
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "invalid_request"),
    (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "invalid_request"),
], ids=["1MB-header", "200KB-url", "length-negative", "length-abc", "tls", "nul", "no-host", "bad-chunk",
        "gzip-encoding"])
def test_unparsable_requests_get_json(guarded, raw, status, code):
    with socket.create_connection(guarded.address, timeout=5) as sock:
        sock.sendall(raw)
        assert_error(*read_reply(sock), status, code)  # read_reply returns once the server has closed
    assert httpx.get(guarded.url + "/health").status_code == 200


def test_headers_sent_slowly_time_out(guarded):
    """A header line every 0.2 s keeps the connection busy, but the deadline counts from its start."""
    with socket.create_connection(guarded.address, timeout=5) as sock:
        start = time.monotonic()
        sock.sendall(HEAD)
        for i in range(25):
            if select.select([sock], [], [], 0.2)[0]:  # the reply has come
                break
            sock.sendall(b"X-Slow-%d: y\r\n" % i)
        elapsed = time.monotonic() - start
        reply = read_reply(sock)
    assert TIMEOUT * 0.9 < elapsed < TIMEOUT + 1.5
    assert_error(*reply, 408, "request_timeout")


def test_silent_connection_times_out(guarded):
    with socket.create_connection(guarded.address, timeout=5) as sock:
        start = time.monotonic()
        reply = read_reply(sock)
        elapsed = time.monotonic() - start
    assert TIMEOUT * 0.9 < elapsed < TIMEOUT + 1.5
    assert_error(*reply, 408, "request_timeout")


def read_health(sock: socket.socket) -> bytes:
    """One /health reply on a connection that stays open (its body is the last 15 bytes)."""
    data = b""
    while not data.endswith(b'{"status":"ok"}'):
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def test_idle_keep_alive_connection_is_closed(guarded):
    with socket.create_connection(guarded.address, timeout=5) as sock:
        sock.sendall(HEAD + b"\r\n")
        assert read_health(sock).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        assert sock.recv(65536) == b""  # closed, without a reply: HTTP lets a server close an idle connection
        assert TIMEOUT * 0.9 < time.monotonic() - start < TIMEOUT + 1.5


def test_slow_headers_on_a_kept_alive_connection_time_out(guarded):
    """uvicorn stops its keep-alive timer at a next request's first byte; the header deadline starts there."""
    with socket.create_connection(guarded.address, timeout=5) as sock:
        sock.sendall(HEAD + b"\r\n")
        assert read_health(sock).startswith(b"HTTP/1.1 200")
        sock.sendall(HEAD)
        start = time.monotonic()
        reply = read_reply(sock)
        assert TIMEOUT * 0.9 < time.monotonic() - start < TIMEOUT + 1.5
    assert_error(*reply, 408, "request_timeout")


def test_new_client_served_beyond_the_connection_cap(pipe):
    """At the cap, a new connection closes the one that has waited longest for a request."""
    with start_server(pipe, model_name="tiny", header_timeout=30, max_connections=4) as srv:
        address = ("127.0.0.1", int(srv.url.rsplit(":", 1)[1]))
        idle = []
        for _ in range(4):
            idle.append(socket.create_connection(address, timeout=5))
            idle[-1].sendall(b"GET /health HTTP/1.1\r\n")
            time.sleep(0.05)  # the server sees them in this order
        start = time.monotonic()
        assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
        assert time.monotonic() - start < 2
        assert read_reply(idle[0]) == (0, {}, b"")  # the oldest was closed to make room
        for sock in idle[1:]:
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):
                sock.recv(1)  # the others are still open
        for sock in idle:
            sock.close()


HALF_OPEN, SERVER_FDS = 1100, 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sets and reads the server's limits in /proc")
def test_new_client_served_while_1100_half_open_connections_are_held(checkpoint):
    """The red team's attack: without a cap, 1,100 half-open connections took every descriptor of a server
    under `ulimit -n 1024` and a new client's /health timed out. The header timeout here is long, so only
    the cap can keep the server reachable."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = HALF_OPEN + 200
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"this test opens {HALF_OPEN} sockets; the hard descriptor limit here is {hard} (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    held = []
    try:
        with ServeProcess(checkpoint, "--header-timeout", "60", "--idle-timeout", "60", fd_limit=SERVER_FDS) as srv:
            limits = Path(f"/proc/{srv.proc.pid}/limits").read_text()
            assert any(line.startswith("Max open files") and line.split()[3:5] == [str(SERVER_FDS)] * 2
                       for line in limits.splitlines()), limits
            for _ in range(HALF_OPEN):
                sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                held.append(sock)
            start = time.monotonic()
            assert httpx.get(srv.url + "/health", timeout=15).status_code == 200
            assert time.monotonic() - start < 15
            assert srv.proc.poll() is None
            assert len(os.listdir(f"/proc/{srv.proc.pid}/fd")) < SERVER_FDS
    finally:
        for sock in held:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
