"""Overload: a server with room for 4 sequences (2 running + 2 queued) gets 8 long requests at once. The
ones beyond its capacity get 503 with Retry-After at once; the accepted ones all complete."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from llavakit.config import EngineConfig

from .harness import metric, start_server


@pytest.fixture(scope="module")
def small_server(pipe):
    with start_server(pipe, EngineConfig(max_num_seqs=2, num_kv_blocks=64, max_model_len=256),
                      model_name="tiny", max_queue=2, retry_after=3) as srv:
        yield srv


def test_twice_the_capacity(small_server):
    assert small_server.service.capacity == 4
    body = {"messages": [{"role": "user", "content": "Count to a hundred."}], "max_tokens": 150, "ignore_eos": True,
            "temperature": 0}

    async def burst():
        async with httpx.AsyncClient(base_url=small_server.url, timeout=120) as http:
            return await asyncio.gather(*[http.post("/v1/chat/completions", json=body) for _ in range(8)])

    responses = asyncio.run(burst())
    accepted = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 503]
    assert len(accepted) + len(refused) == 8
    assert len(accepted) >= 4 and refused
    for r in refused:
        assert r.headers["Retry-After"] == "3"
        assert r.json()["error"]["code"] == "overloaded" and r.json()["error"]["type"] == "server_error"
    answers = {r.json()["choices"][0]["message"]["content"] for r in accepted}
    assert len(answers) == 1 and all(r.json()["usage"]["completion_tokens"] == 150 for r in accepted)
    assert metric(small_server.url, 'llavakit_requests_rejected_total{reason="queue_full"}') == len(refused)
    assert metric(small_server.url, "llavakit_requests_in_flight") == 0
    after = httpx.post(small_server.url + "/v1/chat/completions", json={**body, "max_tokens": 3})
    assert after.status_code == 200
