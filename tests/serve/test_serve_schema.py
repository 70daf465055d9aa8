"""schemathesis against the server's own OpenAPI schema: generated requests, valid and invalid, never get a
5xx. A short context (64 tokens) keeps every generation quick; name lookups are confined to this machine
so that a generated image URL cannot send traffic anywhere."""

from __future__ import annotations

import ipaddress
import socket

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from llavakit.config import EngineConfig
from llavakit.serve.config import server_fetch_policy

from .harness import API_KEY, AUTH, start_server

EXAMPLES = 25  # per route and mode: enough to reach every field's limits, quick on a 64-token context


def _loopback_only(real):
    def getaddrinfo(host, *args, **kwargs):
        infos = real(host, *args, **kwargs) if host in ("localhost", "127.0.0.1") or _is_loopback(host) else []
        if not infos:
            raise socket.gaierror(socket.EAI_NONAME, "name resolution is disabled in this test")
        return infos
    return getaddrinfo


def _is_loopback(host) -> bool:
    try:
        return ipaddress.ip_address(str(host)).is_loopback
    except ValueError:
        return False


@pytest.fixture(scope="module")
def schema_server(pipe):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", _loopback_only(socket.getaddrinfo))
        fetch = server_fetch_policy(64 * 1024, total_timeout=1.0, connect_timeout=0.5)
        with start_server(pipe, EngineConfig(num_kv_blocks=64, max_model_len=64), model_name="tiny",
                          api_key=API_KEY, max_images_per_request=2, fetch=fetch) as srv:
            yield srv


@pytest.fixture(scope="module")
def api_schema(schema_server):
    return schemathesis.openapi.from_url(schema_server.url + "/openapi.json", headers=AUTH)


ROUTES = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
          ("POST", "/generate"), ("POST", "/generate_stream"), ("POST", "/v2/models/{model}/generate"),
          ("GET", "/health"), ("GET", "/metrics")]


def test_the_schema_lists_every_route(api_schema):
    listed = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert listed == set(ROUTES)


# Invalid requests only exist for routes that take input.
CASES = [(m, p, mode) for m, p in ROUTES for mode in GenerationMode if mode is GenerationMode.POSITIVE or m == "POST"]


@pytest.mark.parametrize("method, path, mode", CASES, ids=[f"{m} {p} {mode.value}" for m, p, mode in CASES])
def test_no_server_errors(api_schema, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def check(case):
        case.call_and_validate(headers=AUTH, timeout=30, checks=[not_a_server_error])

    check()
