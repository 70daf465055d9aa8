"""SIGTERM under load, on `llavakit serve` in its own process: the streams in flight run to their end,
new requests are refused (connection refused, or 503 in the moment before the socket closes), and the
process exits within the shutdown timeout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx

from .harness import free_socket

STREAMS, TOKENS, TIMEOUT = 4, 450, 20


def _stream(url: str, started: threading.Event, results: list) -> None:
    body = {"messages": [{"role": "user", "content": "Go on."}], "max_tokens": TOKENS, "ignore_eos": True,
            "temperature": 0, "stream": True}
    events = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(line[5:].strip())
                started.set()
    results.append((events, time.monotonic()))


def _wait_healthy(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not come up")


def test_sigterm_drains_in_flight_requests(checkpoint):
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "llavakit", "serve", "--model", str(checkpoint), "--port",
                             str(port), "--device", "cpu", "--dtype", "float32", "--num-kv-blocks", "128",
                             "--shutdown-timeout", str(TIMEOUT), "--served-model-name", "tiny",
                             "--log-level", "warning"],
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _wait_healthy(url, proc)
        results: list = []
        starts = [threading.Event() for _ in range(STREAMS)]
        threads = [threading.Thread(target=_stream, args=(url, e, results)) for e in starts]
        for t in threads:
            t.start()
        assert all(e.wait(30) for e in starts)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.1)
        try:
            late = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]},
                              timeout=5)
            assert late.status_code == 503 and late.json()["error"]["code"] == "overloaded"
        except httpx.ConnectError:
            pass  # the listening socket is already closed: refused, as it should be
        refused = time.monotonic()
        for t in threads:
            t.join(60)
        proc.wait(TIMEOUT + 5)
        assert time.monotonic() - signalled < TIMEOUT
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert len(results) == STREAMS
    assert max(end for _, end in results) > refused  # the refusal happened while streams were in flight
    for events, _ in results:
        assert events[-1] == "[DONE]"
        usage = json.loads(events[-2])["usage"]
        assert usage["completion_tokens"] == TOKENS
